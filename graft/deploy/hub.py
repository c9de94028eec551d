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

from graft.deploy.export import RUNTIME_TOLERANCE, _check, parity_inputs
from graft.deploy.model_card import hf_model_card
from graft.errors import GraftError
from graft.models.backbones import lab
from graft.models.grafted import GraftModel
from graft.models.heads import BinaryLogit
from graft.models.run_folder import load, read_card
from graft.models.surgery import DEFAULT_NODE
from graft.utils.files import atomic_write, save_weights, write_json
from graft.utils.outputs import output_folder

__all__ = ["TIMM_PREFIXES", "export_timm", "push", "timm_classifier"]

TIMM_PREFIXES = ("hf-hub", "local-dir")  # backbone names with a source prefix that are still timm models
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
    from timm.models._hub import save_config_for_hf  # timm 1.0: not re-exported from timm.models

    save_config_for_hf(net, temp, model_config={"label_names": list(model.classes)}, data_config=_data_config(model))


def export_timm(run_dir: str | Path, out_dir: str | Path, hf: bool = False, data: str | None = None,
                overwrite: bool = False, repo_id: str | None = None) -> dict:
    """Writes the run as a timm folder (``hf``: plus a hub model card) and checks timm loads it with equal logits.

    Args:
        repo_id: the hub repository the model card's example loads from (default: OWNER/FOLDER-NAME).

    Returns:
        What export.json records: the files, the parity on real images, and the check timm itself ran.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise GraftError(f"{out_dir}: --output is the run folder itself; choose another folder (default: RUN/export)")
    model = load(run_dir, "cpu").float().eval()
    card = read_card(run_dir)
    net = timm_classifier(model, card)  # refused before anything is written
    output_folder(out_dir, "--output", ((data, "data"),), overwrite=overwrite)
    inputs, described = parity_inputs(model, run_dir, data)
    save_weights(out_dir / "model.safetensors", net, {"format": "pt"})
    atomic_write(out_dir / "config.json", lambda temp: _write_config(net, model, temp))
    files = ["config.json", "model.safetensors"]
    if hf:
        text = hf_model_card(run_dir, card, repo_id or f"OWNER/{out_dir.resolve().name}")
        atomic_write(out_dir / "README.md", lambda temp: Path(temp).write_text(text, encoding="utf-8"))
        files.append("README.md")
    difference, labels = _timm_round_trip(out_dir, model, inputs)
    if labels != list(model.classes):
        raise GraftError(f"{out_dir}: timm reads the class names as {labels!r:.80}; please report this")
    result = {"run": str(run_dir), "format": "hf" if hf else "timm", "files": [*files, "export.json"],
              "parity_max_abs_logit_diff": {"timm": _check("timm local-dir", difference, RUNTIME_TOLERANCE)},
              "parity_inputs": described, "load_with": f'timm.create_model("local-dir:{out_dir}", pretrained=True)'}
    write_json(out_dir / "export.json", result)
    return result


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


def push(run_dir: str | Path, repo_id: str, private: bool = False, folder: str | Path | None = None, api=None,
         log=None) -> str:
    """Uploads the run as a Hugging Face hub repository (the ``--format hf`` folder) and returns its URL.

    Args:
        folder: an existing ``--format hf`` export to upload; default: exported now to RUN/hf.
        api: an ``huggingface_hub.HfApi``-like object (tests pass a fake); default: a real one.
    """
    say = log or (lambda message: None)
    if "/" not in repo_id.strip("/") or repo_id.count("/") != 1:
        raise GraftError(f"repository id '{repo_id}' must be OWNER/NAME, e.g. your-name/pets-resnet50")
    folder = Path(folder) if folder else Path(run_dir) / "hf"
    if not (folder / "config.json").is_file():
        export_timm(run_dir, folder, hf=True, overwrite=True, repo_id=repo_id)
        say(f"exported the run to {folder}")
    if api is None:
        from graft.models.backbones.timm_source import hub_reachable

        if not hub_reachable():
            raise GraftError(f"the Hugging Face hub is unreachable (offline); the folder to upload is ready in "
                             f"{folder}: run `graft push` again with a network, or `hf upload {repo_id} {folder}`")
        from huggingface_hub import HfApi

        api = HfApi(library_name="graft")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"graft: upload {Path(run_dir).name}", ignore_patterns=[".graft-*"])
    except Exception as error:  # noqa: BLE001 - auth, network, permissions: one line with the reason
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise GraftError(f"upload to {repo_id} failed ({reason}); log in with `hf auth login` or set HF_TOKEN"
                         ) from None
    return str(getattr(url, "url", None) or f"https://huggingface.co/{repo_id}")

