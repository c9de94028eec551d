"""Models in the formats the ecosystem loads: a timm folder, a Hugging Face hub repository, and the upload.

``export_timm(run, out)`` writes ``config.json`` (architecture, num_classes, label_names, pretrained_cfg) and
``model.safetensors`` under timm's own tensor names, so ``timm.create_model("local-dir:OUT", pretrained=True)``
rebuilds the trained classifier; the folder is loaded back with timm and its logits checked against graft's before
the export counts as done. ``hf=True`` adds a README.md model card: the same folder is then a hub repository, which
``push`` uploads with ``huggingface_hub``.

Only a run that *is* a timm classifier can be written so: a timm backbone used whole (default cut node, its own
average pool) under a linear (or one-logit sigmoid) head. Anything else names the ONNX / torch.export forms.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graft.deploy.model_card import hf_model_card
from graft.deploy.parity import RUNTIME_TOLERANCE, check_parity, parity_inputs
from graft.errors import GraftError
from graft.models.backbones import lab
from graft.models.grafted import GraftModel
from graft.models.heads import BinaryLogit
from graft.models.run_folder import load, read_card, refuse_label_sets
from graft.models.surgery import DEFAULT_NODE
from graft.utils.files import atomic_write, file_sha256, read_json_object, save_weights, write_json
from graft.utils.outputs import MANIFEST, output_folder
from graft.utils.text import display_name

__all__ = ["EXPORT_RECORD", "HUB_FILES", "TIMM_PREFIXES", "export_timm", "exported_files", "push",
           "timm_classifier"]

TIMM_PREFIXES = ("hf-hub", "local-dir")  # backbone names with a source prefix that are still timm models
EXPORT_RECORD = "export.json"  # what the export wrote, with each file's size and SHA-256: push's proof of origin
HUB_FILES = ("README.md", "config.json", "model.safetensors")  # a --format hf folder's files besides the record
MAX_EXPORT_RECORD_BYTES = 1 << 20  # a record is a few KB; a larger one is not graft's
_OTHER_FORMS = "export --format onnx or --format torch instead (they hold any graft model)"


def _refuse(why: str) -> GraftError:
    return GraftError(f"this run has no timm equivalent ({why}); {_OTHER_FORMS}")


def _final_linear(head: nn.Sequential, card: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one linear layer that computes the head in eval mode (dropout is the identity there)."""
    layers = [layer for layer in head if not isinstance(layer, nn.Dropout)]
    if len(layers) != 1 or card["head"] not in ("linear", "sigmoid"):
        raise _refuse(f"head '{card['head']}': timm classifiers are one linear layer")
    layer = layers[0]
    if isinstance(layer, BinaryLogit):  # logits [0, z]: a two-row linear layer whose first row is zero
        weight = torch.cat([torch.zeros_like(layer.linear.weight), layer.linear.weight])
        return weight, torch.cat([torch.zeros_like(layer.linear.bias), layer.linear.bias])
    return layer.weight, layer.bias


def timm_classifier(model: GraftModel, card: dict) -> nn.Module:
    """The run as a plain timm model with ``num_classes`` outputs and the trained weights under timm's names.

    Raises:
        GraftError: for a run timm cannot represent (another backbone source, an inner cut, avgmax pool, MLP head).
    """
    import timm

    backbone = card["backbone"]
    prefix = backbone.partition(":")[0] if ":" in backbone else ""
    if backbone.partition("?")[0] in lab.ARCHITECTURES or (prefix and prefix not in TIMM_PREFIXES):
        raise _refuse(f"backbone '{backbone}' is not a timm model")
    if card["cut_at"] != DEFAULT_NODE:
        raise _refuse(f"cut at the inner node '{card['cut_at']}'; timm models end at their own pooled features")
    if card["pool"] != "avg":
        raise _refuse(f"pool '{card['pool']}'; graft writes timm's average pool only")
    weight, bias = _final_linear(model.head, card)
    trunk = model.trunk.net
    arch = trunk.pretrained_cfg.get("architecture")
    model_args = {k: v for k, v in getattr(trunk, "_model_args", {}).items() if k not in ("num_classes", "pretrained")}
    net = timm.create_model(arch, pretrained=False, num_classes=len(model.classes), **model_args)
    source_cfg = {k: v for k, v in trunk.pretrained_cfg.items() if k != "tag"}  # the tag named the source weights
    net.pretrained_cfg = {**source_cfg, **net.pretrained_cfg, "architecture": arch}
    net.pretrained_cfg.pop("tag", None)
    missing, unexpected = net.load_state_dict(trunk.state_dict(), strict=False)
    classifier = net.get_classifier()
    head_keys = {name for name, _ in net.named_parameters() if name not in dict(trunk.named_parameters())}
    if unexpected or not isinstance(classifier, nn.Linear) or set(missing) != head_keys:
        raise _refuse(f"the trunk of '{arch}' does not map onto timm's model one to one")
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return net.eval()


def _data_config(model: GraftModel) -> dict:
    prep = model.preprocessing
    return {"input_size": (3, *prep.input_size), "mean": tuple(prep.mean), "std": tuple(prep.std),
            "interpolation": prep.interpolation, "crop_pct": prep.crop_pct, "crop_mode": "center"}


def _write_config(net: nn.Module, model: GraftModel, temp: str) -> None:
    """timm's config.json, less ``model_args.num_classes``: the root ``num_classes`` already says it, and
    transformers' TimmWrapper passes both to ``timm.create_model`` (a TypeError: 'multiple values')."""
    import json

    from timm.models._hub import save_config_for_hf  # timm 1.0: not re-exported from timm.models

    save_config_for_hf(net, temp, model_config={"label_names": list(model.classes)}, data_config=_data_config(model))
    config = json.loads(Path(temp).read_text(encoding="utf-8"))
    arguments = config.get("model_args")
    if isinstance(arguments, dict):
        for key in ("num_classes", "pretrained"):
            arguments.pop(key, None)
        if not arguments:
            del config["model_args"]
    Path(temp).write_text(json.dumps(config, indent=2), encoding="utf-8")


def export_timm(run_dir: str | Path, out_dir: str | Path, hf: bool = False, data: str | None = None,
                overwrite: bool = False, repo_id: str | None = None, loaded: tuple | None = None) -> dict:
    """Writes the run as a timm folder (``hf``: plus a hub model card) and checks timm loads it with equal logits.

    Args:
        repo_id: the hub repository the model card's example loads from (default: OWNER/FOLDER-NAME).
        loaded: (model, parity inputs, their description) when the caller has them already (an export of several
            formats loads the run once).

    Returns:
        What export.json records: the files, the parity on real images, and the check timm itself ran.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise GraftError(f"{out_dir}: --output is the run folder itself; choose another folder (default: RUN/export)")
    card = read_card(run_dir)
    refuse_label_sets(card, run_dir, "graft push")
    model = loaded[0] if loaded else load(run_dir, "cpu").float().eval()
    net = timm_classifier(model, card)  # refused before anything is written
    output_folder(out_dir, "--output", ((data, "data"),), overwrite=overwrite)
    inputs, described = loaded[1:] if loaded else parity_inputs(model, run_dir, data)
    save_weights(out_dir / "model.safetensors", net, {"format": "pt"})
    atomic_write(out_dir / "config.json", lambda temp: _write_config(net, model, temp))
    files = ["config.json", "model.safetensors"]
    if hf:
        text = hf_model_card(run_dir, card, repo_id or f"OWNER/{out_dir.resolve().name}",
                             net.pretrained_cfg.get("license"))
        atomic_write(out_dir / "README.md", lambda temp: Path(temp).write_text(text, encoding="utf-8"))
        files.append("README.md")
    difference, labels = _timm_round_trip(out_dir, model, inputs)
    if labels != list(model.classes):
        raise GraftError(f"{out_dir}: timm reads the class names as {labels!r:.80}; please report this")
    # an hf folder is uploaded whole: its record names folders by their own names, never the user's absolute paths
    where = Path(out_dir.name) if hf else out_dir
    result = {"run": run_dir.name if hf else str(run_dir), "format": "hf" if hf else "timm",
              "files": [*files, EXPORT_RECORD], "digests": {name: _file_record(out_dir / name) for name in files},
              "parity_max_abs_logit_diff": {"timm": check_parity("timm local-dir", difference, RUNTIME_TOLERANCE)},
              "parity_inputs": _folder_names_only(described) if hf else described,
              "load_with": f'timm.create_model("local-dir:{where}", pretrained=True)'}
    write_json(out_dir / EXPORT_RECORD, result)
    return result


def _folder_names_only(described: str) -> str:
    """"N images from /home/me/data/pets" → "N images from pets": what the parity check read, without the path."""
    count, found, source = described.partition(" from ")
    return f"{count}{found}{Path(source).name}" if found else described


def _file_record(path: Path) -> dict:
    """What push checks a file against: its size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _timm_round_trip(folder: Path, model: GraftModel, inputs: torch.Tensor) -> tuple[float, list[str]]:
    """Max |Δlogit| between graft's model and what plain timm builds from ``folder``, and timm's label names."""
    import timm

    try:
        reloaded = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    except Exception as error:  # noqa: BLE001 - whatever timm raises, the folder is not loadable: say so
        raise GraftError(f"{folder}: timm cannot load the exported folder ({str(error).splitlines()[0][:200]}); "
                         f"please report this; {_OTHER_FORMS}") from None
    with torch.no_grad():
        difference = (reloaded(inputs).float() - model(inputs).float()).abs().max().item()
    return difference, list(reloaded.pretrained_cfg.get("label_names") or [])


def exported_files(folder: Path, run_dir: str | Path) -> list[str]:
    """The files of a ``--format hf`` folder graft exported, each checked against the size and SHA-256 its
    export.json records: what ``push`` uploads, and nothing else.

    Raises:
        GraftError: export.json is missing or lists no digests, or the folder holds a file it does not list (a
            user's ``.env.local``), a changed file, a link or a sub-folder, or lacks a listed file.
    """
    fix = f"run `graft export {run_dir} --format hf -o FOLDER` and push that folder"
    record_path = folder / EXPORT_RECORD
    record = {} if record_path.is_symlink() else read_json_object(record_path, MAX_EXPORT_RECORD_BYTES)
    digests = record.get("digests")
    if record.get("format") != "hf" or not isinstance(digests, dict) or not set(HUB_FILES) <= set(digests):
        raise GraftError(f"{display_name(str(folder))}: not a folder graft exported for the hub (no {EXPORT_RECORD} "
                         f"with its files' digests); {fix}")
    present = {entry.name for entry in folder.iterdir()} - {EXPORT_RECORD, MANIFEST}
    for name in sorted(present | set(digests)):
        path, expected = folder / name, digests.get(name)
        shown = display_name(str(path))
        if name not in present:
            raise GraftError(f"{shown}: listed in {EXPORT_RECORD} but missing; {fix}")
        if not isinstance(expected, dict) or path.is_symlink() or not path.is_file():
            raise GraftError(f"{shown}: not a file graft exported ({EXPORT_RECORD} does not list it); graft uploads "
                             f"only what it exported; {fix}")
        if expected.get("bytes") != path.stat().st_size or expected.get("sha256") != file_sha256(path):
            raise GraftError(f"{shown}: changed since graft exported it (size or SHA-256 differs from "
                             f"{EXPORT_RECORD}); {fix}")
    return [*sorted(digests), EXPORT_RECORD]


def push(run_dir: str | Path, repo_id: str, private: bool = False, folder: str | Path | None = None, api=None,
         log=None) -> str:
    """Uploads the run as a Hugging Face hub repository (the ``--format hf`` folder) and returns its URL.

    Only a folder graft exported is uploaded, and only the files its export.json lists with matching digests
    (``exported_files``): a folder of the user's own is refused, never published.

    Args:
        folder: an existing ``--format hf`` export to upload; default: exported now to RUN/hf (a missing or empty
            folder is exported to first).
        api: an ``huggingface_hub.HfApi``-like object (tests pass a fake); default: a real one.
    """
    say = log or (lambda message: None)
    if "/" not in repo_id.strip("/") or repo_id.count("/") != 1:
        raise GraftError(f"repository id '{repo_id}' must be OWNER/NAME, e.g. your-name/pets-resnet50")
    folder = Path(folder) if folder else Path(run_dir) / "hf"
    if not folder.exists() or (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
        export_timm(run_dir, folder, hf=True, overwrite=False, repo_id=repo_id)
        say(f"exported the run to {folder}")
    elif not folder.is_dir():
        raise GraftError(f"{display_name(str(folder))}: --folder names a file, not a folder graft exported; run "
                         f"`graft export {run_dir} --format hf -o FOLDER` and push that folder")
    files = exported_files(folder, run_dir)
    if api is None:
        from graft.models.backbones.timm_source import hub_reachable

        if not hub_reachable():
            raise GraftError(f"the Hugging Face hub is unreachable (offline); the folder to upload is ready in "
                             f"{folder}: run `graft push` again with a network, or `hf upload {repo_id} {folder}`")
        from huggingface_hub import HfApi

        api = HfApi(library_name="graft")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", allow_patterns=files,
                          commit_message=f"graft: upload {Path(run_dir).name}", ignore_patterns=[".graft-*"])
    except Exception as error:  # noqa: BLE001 - auth, network, permissions: one line with the reason
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise GraftError(f"upload to {repo_id} failed ({reason}); log in with `hf auth login` or set HF_TOKEN"
                         ) from None
    return str(getattr(url, "url", None) or f"https://huggingface.co/{repo_id}")
