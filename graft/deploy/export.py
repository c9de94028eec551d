"""Deployment: a folder that runs without graft's training stack.

``export(run, out)`` writes, each checked against the eager model on real images:

- ``model.onnx`` — dynamic batch axis, input ``images`` (N, 3, H, W float32, normalised), output ``logits``;
  verified with ONNX Runtime;
- ``model.pt2`` — a ``torch.export`` program (``torch.export.load(path).module()(images)``);
- ``model.safetensors`` + ``graft.json`` — the plain run folder format (``graft.load`` reads it);
- ``preprocessing.json`` — class names and preprocessing, all a consumer needs; ``predict_onnx.py`` — a standalone
  example that uses only NumPy, Pillow and ONNX Runtime;
- ``export.json`` — what was exported, the parity numbers, how many batch norms were folded and the latency change.

``--format timm`` and ``--format hf`` write a folder of their own instead, for plain timm and the Hugging Face hub
(see ``graft.deploy.hub``).
"""

from __future__ import annotations

import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graft.deploy.parity import PARITY_INPUTS, RUNTIME_TOLERANCE, check_parity, parity_inputs  # re-exported
from graft.deploy.standalone import STANDALONE_EXAMPLE, consumer_metadata, standalone_example  # re-exported
from graft.errors import GraftError
from graft.models.batchnorm import FoldResult, fold_batch_norms, max_logit_difference
from graft.models.grafted import GraftModel
from graft.models.onnx_engine import OPSET, export_onnx, onnx_session  # re-exported: deploy's public names
from graft.models.run_folder import load, read_card, refuse_label_sets
from graft.utils.files import atomic_write, write_json
from graft.utils.outputs import output_folder, record

__all__ = [
    "ECOSYSTEM_FORMATS",
    "FOLD_TOLERANCE",
    "FORMATS",
    "OPSET",
    "PARITY_INPUTS",
    "RUNTIME_TOLERANCE",
    "STANDALONE_EXAMPLE",
    "ExportResult",
    "call_times",
    "consumer_metadata",
    "export",
    "export_onnx",
    "export_program",
    "latency_ms",
    "onnx_session",
    "parity_inputs",
    "standalone_example"
]

FORMATS = ("onnx", "torch", "safetensors")
ECOSYSTEM_FORMATS = ("timm", "hf")  # folders plain timm / the Hugging Face hub load (graft.deploy.hub)
FOLD_TOLERANCE = 1e-4  # max |Δlogit| in float32 that folding may cause (the bound)


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)  # form → max |Δlogit| vs the eager model
    folded: FoldResult | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch-1 median per form
    inputs: str = ""
    quantization: dict | None = None  # --quantize int8: accuracy of each model, agreement, kept or refused

    def to_dict(self) -> dict:
        folded = None if self.folded is None else {
            "count": self.folded.count, "pairs": [list(p) for p in self.folded.folded],
            "skipped": [list(s) for s in self.folded.skipped]}
        return {"files": self.files, "parity_max_abs_logit_diff": self.parity, "fold_bn": folded,
                "latency_ms_batch1_median": self.latency_ms, "parity_inputs": self.inputs, "onnx_opset": OPSET,
                **({"quantization": self.quantization} if self.quantization else {})}


def call_times(forward, example: torch.Tensor, repeats: int = 30, warmup: int = 3) -> list[float]:
    """Seconds per call of ``forward(example)``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        forward(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(example)
        times.append(time.perf_counter() - start)
    return times


def latency_ms(forward, example: torch.Tensor, repeats: int = 30) -> float:
    """Median wall time of one forward, after warm-up, in milliseconds."""
    return statistics.median(call_times(forward, example, repeats)) * 1000


def export_program(model: nn.Module, example: torch.Tensor):
    """A ``torch.export`` program with a dynamic batch axis. Non-strict tracing first; strict (TorchDynamo) for
    models cut at an inner node, whose stop-hook only Dynamo follows."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    errors = []
    for strict in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=strict)
        except Exception as error:  # noqa: BLE001 - try the next strategy, report both if neither works
            errors.append(f"strict={strict}: {str(error).splitlines()[0][:200]}")
    raise GraftError(f"torch.export could not capture this model ({'; '.join(errors)}); export --format onnx")


def _save_program(program, path: str) -> None:
    with open(path, "wb") as handle:  # a file object: torch.export wants a .pt2 name, and the temp file has none
        torch.export.save(program, handle)


def export(run_dir: str | Path, out_dir: str | Path, formats: tuple[str, ...] = FORMATS, fold_bn: bool = True,
           data: str | None = None, overwrite: bool = False, log=None, quantize: str | None = None,
           force_quantize: bool = False, max_drop: float | None = None) -> ExportResult:
    """Exports a run folder for deployment and verifies every exported form on real images (see the module doc).

    Args:
        fold_bn: fold batch norms into the preceding conv/linear layers first (verified to 1e-4 in float32).
        data: images for the parity checks; default: the run's own data.
        quantize: ``"int8"``: also ``model.int8.onnx`` (``graft.deploy.quantize``), refused with a GraftError
            (after export.json records why) when it loses more than ``max_drop`` accuracy points (default 1),
            unless ``force_quantize``.
    """
    unknown = sorted(set(formats) - set(FORMATS) - set(ECOSYSTEM_FORMATS))
    if unknown:
        raise GraftError(f"export format(s) {', '.join(unknown)} not understood: choose from "
                         f"{', '.join(FORMATS + ECOSYSTEM_FORMATS)}")
    _check_quantize(quantize, formats)
    ecosystem = [form for form in dict.fromkeys(formats) if form in ECOSYSTEM_FORMATS]
    _check_label_sets(read_card(run_dir), run_dir, ecosystem, quantize)
    if ecosystem and len(set(formats)) == 1:  # timm or hf alone: the folder is theirs, as before
        return _export_ecosystem(run_dir, out_dir, ecosystem[0], data, overwrite)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise GraftError(f"{out_dir}: --output is the run folder itself; choose another folder (default: RUN/export)")
    model = load(run_dir, "cpu").float().eval()
    if ecosystem:  # a run timm cannot represent is refused before anything is written
        from graft.deploy.hub import timm_classifier

        timm_classifier(model, read_card(run_dir))
    output_folder(out_dir, "--output", ((data, "data"),), overwrite=overwrite)  # before the work: nothing wasted
    say = log or (lambda message: None)
    inputs, described = parity_inputs(model, run_dir, data)
    result = ExportResult(out_dir, inputs=described)
    if set(formats) & set(FORMATS):
        _export_own(run_dir, out_dir, formats, fold_bn, model, inputs, result, say)
    refusal = _quantize(run_dir, out_dir, model, data, quantize, force_quantize, max_drop, inputs, result, say)
    for form in ecosystem:  # each in a folder of its own: their model.safetensors holds timm's names, not graft's
        _export_ecosystem(run_dir, out_dir / form, form, data, overwrite, (model, inputs, described), result)
    if "export.json" not in result.files:
        result.files.append("export.json")
    write_json(out_dir / "export.json", {"run": str(run_dir), **result.to_dict()})
    if refusal:  # the float export is complete and export.json says what int8 measured; the int8 file is not there
        raise GraftError(refusal)
    return result


def _check_label_sets(card: dict, run_dir, ecosystem: list[str], quantize: str | None) -> None:
    """A multi-label run exports as ONNX, torch.export and safetensors (its logits, one sigmoid per class, with the
    thresholds in preprocessing.json and graft.json); what assumes one class per image is refused in one line."""
    if not card.get("multi_label"):
        return
    if ecosystem:
        refuse_label_sets(card, run_dir, f"graft export --format {ecosystem[0]}")
    if quantize:
        raise GraftError(f"{run_dir}: a multi-label model (label sets); --quantize {quantize} checks the int8 model's "
                         "accuracy on single labels: export without --quantize")


def _check_quantize(quantize: str | None, formats: tuple[str, ...]) -> None:
    """Before any work: a mode graft knows, and the ONNX model it quantizes among the formats."""
    if quantize is None:
        return
    from graft.deploy.quantize import QUANTIZE_MODES

    if quantize not in QUANTIZE_MODES:
        raise GraftError(f"--quantize {quantize!r} not understood: choose {', '.join(QUANTIZE_MODES)}")
    if "onnx" not in formats:
        raise GraftError(f"--quantize {quantize} quantizes the ONNX model: add onnx to --format")


def _quantize(run_dir: Path, out_dir: Path, model: GraftModel, data: str | None, quantize: str | None, force: bool,
              max_drop: float | None, inputs: torch.Tensor, result: ExportResult, say) -> str | None:
    """``--quantize int8`` on the (BN-folded) model.onnx just verified: the refusal line, or None when kept."""
    if quantize is None:
        return None
    from graft.deploy.quantize import INT8_FILE, MAX_DROP_POINTS, quantize_int8

    done = quantize_int8(run_dir, out_dir, model, data, onnx_session, force,
                         MAX_DROP_POINTS if max_drop is None else max_drop, log=say)
    result.quantization = done.record
    if done.refusal is None:
        session = onnx_session(out_dir / INT8_FILE)
        result.latency_ms["onnxruntime_int8"] = round(latency_ms(
            lambda x: session.run(None, {"images": x.numpy()}), inputs[:1]), 3)
        result.files.insert(result.files.index("model.onnx") + 1, INT8_FILE)
    return done.refusal


def _export_own(run_dir: Path, out_dir: Path, formats: tuple[str, ...], fold_bn: bool, model: GraftModel,
                inputs: torch.Tensor, result: ExportResult, say) -> None:
    """ONNX, torch.export and safetensors + graft.json into ``out_dir``, each checked against ``model``."""
    deployed: nn.Module = model
    eager_ms = latency_ms(model, inputs[:1])
    result.latency_ms["eager"] = round(eager_ms, 3)
    if fold_bn:
        deployed, result.folded = fold_batch_norms(model, inputs, FOLD_TOLERANCE)
        result.parity["fold_bn"] = check_parity("batch-norm folding", max_logit_difference(model, deployed, inputs),
                                                FOLD_TOLERANCE)
        result.latency_ms["folded"] = round(latency_ms(deployed, inputs[:1]), 3)
        say(f"folded {result.folded.count} batch norm(s) (max |Δlogit| {result.parity['fold_bn']:.1e}); batch-1 "
            f"latency {eager_ms:.2f} → {result.latency_ms['folded']:.2f} ms")
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = model(inputs).float()
    if "onnx" in formats:
        export_onnx(deployed, inputs[:2], out_dir / "model.onnx")
        session = onnx_session(out_dir / "model.onnx")
        logits = torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0])
        result.parity["onnx"] = check_parity("ONNX Runtime", (logits - expected).abs().max().item(), RUNTIME_TOLERANCE)
        result.latency_ms["onnxruntime"] = round(latency_ms(
            lambda x: session.run(None, {"images": x.numpy()}), inputs[:1]), 3)
        result.files.append("model.onnx")
    if "torch" in formats:
        program = export_program(deployed, inputs[:2])
        atomic_write(out_dir / "model.pt2", lambda temp: _save_program(program, temp))
        reloaded = torch.export.load(str(out_dir / "model.pt2")).module()
        with torch.no_grad():
            difference = (reloaded(inputs).float() - expected).abs().max().item()
        result.parity["torch_export"] = check_parity("torch.export", difference, RUNTIME_TOLERANCE)
        result.files.append("model.pt2")
    if "safetensors" in formats:
        for name in ("model.safetensors", "graft.json"):
            shutil.copyfile(run_dir / name, out_dir / name)
            record(out_dir / name)  # graft's file: --overwrite may replace it
        result.files += ["model.safetensors", "graft.json"]
    write_json(out_dir / "preprocessing.json", consumer_metadata(model))
    atomic_write(out_dir / "predict_onnx.py", lambda temp: Path(temp).write_text(standalone_example()))
    result.files += ["preprocessing.json", "predict_onnx.py", "export.json"]


def _export_ecosystem(run_dir, out_dir, form: str, data: str | None, overwrite: bool, loaded: tuple | None = None,
                      into: ExportResult | None = None) -> ExportResult:
    """``--format timm`` / ``hf``: a folder of their own (its model.safetensors holds timm's names, not graft's).
    With ``into`` (an export of several formats), its files and parity are added there, named by the folder."""
    from graft.deploy.hub import export_timm

    done = export_timm(run_dir, out_dir, hf=form == "hf", data=data, overwrite=overwrite, loaded=loaded)
    if into is None:
        return ExportResult(Path(out_dir), files=done["files"], parity=done["parity_max_abs_logit_diff"],
                            inputs=done["parity_inputs"])
    into.files += [f"{form}/{name}" for name in done["files"]]
    into.parity[form] = done["parity_max_abs_logit_diff"]["timm"]
    return into
