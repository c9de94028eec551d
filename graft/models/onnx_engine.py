"""ONNX Runtime as graft's inference engine: one mechanism for frozen trunks (feature extraction) and for whole
models (``predict --runtime onnx``, ``serve --runtime onnx``).

A module is exported once to ONNX (dynamic batch axis), checked against eager PyTorch on a few inputs (max |Δ| ≤
``ENGINE_TOLERANCE`` on every output) and then run by ONNX Runtime with as many intra-op threads as torch uses, or as
many as the caller's decoding plan leaves it (``graft.data.prefetch``). The ``.onnx`` file is cached under a name
that holds the digest of everything its graph depends on, so a cached file is graft's own and never stale; a damaged
one (it will not load, or no longer matches) is rebuilt. When the export, the check or the runtime fails,
``engine_module`` says so in one warning line and the caller runs eagerly: never a wrong number, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graft.config import ENGINES
from graft.errors import GraftError
from graft.utils.files import atomic_write, file_sha256
from graft.utils.outputs import claim

__all__ = [
    "CHECK_IMAGES", "ENGINES", "ENGINE_TOLERANCE", "EXPORTERS", "OPSET", "RUNTIMES", "RUNTIME_FOLDER", "OnnxModule",
    "as_tuple", "engine_digest", "engine_module", "export_onnx", "onnx_session", "onnxruntime_available",
    "resolve_engine", "run_forward",
]

OPSET = 18
RUNTIMES = ("auto", "torch", "onnx")  # predict/serve --runtime: torch is the eager engine
RUNTIME_FOLDER = "runtime"  # RUN/runtime/model-DIGEST.onnx: the run's export for --runtime onnx
ENGINE_TOLERANCE = 1e-4  # max |Δ| of any output vs eager PyTorch in float32, else the engine is refused
# TorchScript first: it exports EfficientNet-Lite0 in 1.3 s where the dynamo exporter takes 8.7 s (the same graph
# to 6e-6); dynamo when it raises (an op it lacks) or its trace does not match eager (a value baked into the graph)
EXPORTERS = ("torchscript", "dynamo")
CHECK_IMAGES = 2  # real inputs the export is checked on (with two seeded random ones): a few eager forwards per use

log = logging.getLogger(__name__)
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages; graft prints plain lines


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the exporter's own dependencies (onnx, onnxscript) can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def resolve_engine(engine: str, device: torch.device | str) -> str:
    """``onnx`` or ``eager`` for ``engine`` (one of ``ENGINES``, ``torch`` read as ``eager``) on ``device``: auto
    picks ONNX Runtime on the CPU when it is installed; an explicit ``onnx`` is refused off the CPU or uninstalled."""
    engine = "eager" if engine == "torch" else engine
    if engine not in ENGINES:
        raise GraftError(f"engine '{engine}' not understood: choose one of {', '.join(ENGINES)}")
    on_cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        return "onnx" if on_cpu and onnxruntime_available() else "eager"
    if engine == "onnx" and not on_cpu:
        raise GraftError(f"the ONNX Runtime engine runs on the CPU, not on {device}: use --device cpu, or the eager "
                         "engine on an accelerator")
    if engine == "onnx" and not onnxruntime_available():
        raise GraftError("the ONNX Runtime engine needs onnxruntime, onnx and onnxscript: pip install 'graft[export]'")
    return engine


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...] = ("logits",),
                exporters: tuple[str, ...] = EXPORTERS) -> str:
    """Writes ``model`` as ONNX to ``path`` (atomically): input ``images`` with a dynamic batch axis, outputs named
    ``output_names`` (the model returns a tensor, or a tuple of them in that order). Each of ``exporters`` is tried
    in turn until one does not raise (the last one's error is raised); returns the one that wrote the file."""
    for exporter in exporters:
        try:
            atomic_write(path, lambda temp: _export(exporter, model, example, temp, output_names))
            return exporter
        except GraftError:
            raise  # a missing package or an unwritable folder: the next exporter cannot help
        except Exception as error:  # noqa: BLE001 - an op one exporter lacks; the next one may have it
            if exporter == exporters[-1]:
                raise
            log.debug("the %s ONNX exporter failed (%s); trying the next one", exporter, error)
    raise GraftError(f"no ONNX exporter given for {path}: choose among {', '.join(EXPORTERS)}")


def _export(exporter: str, model: nn.Module, example: torch.Tensor, temp: str, output_names: tuple[str, ...]) -> None:
    names = {"input_names": ["images"], "output_names": list(output_names), "opset_version": OPSET, "verbose": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: graft chose it on purpose
        if exporter == "torchscript":
            axes = {name: {0: "batch"} for name in ("images", *output_names)}
            with _native_stdout_silenced():  # it prints its whole IR graph when an op is missing: the error says it
                torch.onnx.export(model, (example,), temp, dynamo=False, dynamic_axes=axes, **names)
            return
        try:
            import onnx  # noqa: F401 - the exporter needs it; fail here with the fix, not deep inside torch.onnx
            import onnxscript  # noqa: F401
        except ImportError:
            raise GraftError("ONNX export needs onnx and onnxscript: pip install 'graft[export]'") from None
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(model, (example,), temp, dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
                          **names)


@contextlib.contextmanager
def _native_stdout_silenced():
    """File descriptor 1 points at the null device: what native code writes there (torch's C++ ONNX log) is dropped.
    Python's own buffered lines are flushed first, so none of them is lost or reordered."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onnx_session(path: Path, threads: int | None = None, spin: bool = True):
    """An ONNX Runtime CPU session for ``path``; ``threads``: intra-op threads (default: ONNX Runtime's own);
    ``spin`` False: idle intra-op threads sleep at once rather than spin, leaving the cores to threads that decode
    beside the forward (``graft.data.prefetch``)."""
    try:
        import onnxruntime
    except ImportError:
        raise GraftError("running the ONNX file needs onnxruntime: pip install 'graft[export]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX Runtime session called like the module it was exported from: float32 images in, a tensor (one output)
    or a tuple of tensors out, on the CPU. It holds no parameters; ``.eval()`` and ``.to()`` change nothing."""

    def __init__(self, session, path: Path):
        super().__init__()
        self.session, self.path = session, path
        self.output_names = [output.name for output in session.get_outputs()]

    def forward(self, images: torch.Tensor):
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())  # channels-last tensors come in too
        outputs = [torch.from_numpy(value) for value in self.session.run(None, {"images": array})]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def engine_digest(*parts) -> str:
    """A short hex digest of what an exported graph depends on (architecture, weight digests, nodes, pooling, input
    size...), with the opset and torch's version: the cached file's name."""
    text = "|".join(str(part) for part in (*parts, OPSET, torch.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    """A module's output as a tuple of tensors (one tensor: a 1-tuple)."""
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _difference(eager: nn.Module, candidate: OnnxModule, inputs: torch.Tensor) -> float:
    with torch.inference_mode():
        expected = as_tuple(eager(inputs))
        got = as_tuple(candidate(inputs))
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        return float("inf")
    return max((e.float().cpu() - g).abs().max().item() for e, g in zip(expected, got))


def _verified(module: nn.Module, path: Path, inputs: torch.Tensor, names: tuple[str, ...], rebuild: bool,
              threads: int | None = None) -> tuple[OnnxModule | None, str]:
    """(the session module, "") when ``path`` (exported first when missing or ``rebuild``) matches ``module`` on
    ``inputs`` and two seeded random ones; else (None, why). A fresh export that does not match is made again by the
    next of ``EXPORTERS``. ``threads``: the session's intra-op threads (default torch's); given, decoding threads
    share the cores (``graft.data.prefetch``), so idle session threads do not spin."""
    exporters = EXPORTERS if rebuild or not path.is_file() else ()
    while True:
        if exporters:
            path.parent.mkdir(parents=True, exist_ok=True)
            used = export_onnx(module, inputs[:2] if len(inputs) > 1 else torch.cat([inputs, inputs]), path, names,
                               exporters)
            exporters = exporters[exporters.index(used) + 1:]  # what is left should this graph not match
        candidate, reason = _checked(module, path, inputs, threads)
        if candidate is not None or not exporters:
            return candidate, reason


def _checked(module: nn.Module, path: Path, inputs: torch.Tensor, threads: int | None) -> tuple[OnnxModule | None, str]:
    session = onnx_session(path, threads or torch.get_num_threads(), spin=threads is None)
    candidate = OnnxModule(session, path)
    # also on inputs the export never saw: a value traced into the graph as a constant shows up there
    unseen = torch.randn(2, *inputs.shape[1:], generator=torch.Generator().manual_seed(0))
    difference = _difference(module, candidate, torch.cat([inputs, unseen]))
    if not difference <= ENGINE_TOLERANCE:  # also catches NaN
        return None, f"max |Δ| {difference:.1e} > {ENGINE_TOLERANCE:.0e} vs eager PyTorch"
    return candidate, ""


def engine_module(module: nn.Module, path: Path, inputs: torch.Tensor, what: str, warn=None,
                  output_names: tuple[str, ...] = ("logits",), threads: int | None = None) -> nn.Module:
    """``module`` run by ONNX Runtime from the cached ``path`` (exported there first), or ``module`` itself.

    The cached file is loaded and checked on the first ``CHECK_IMAGES`` of ``inputs``; one that does not load or no
    longer matches is rebuilt once. A module that cannot be exported, or whose export does not match eager to
    ``ENGINE_TOLERANCE``, is run eagerly after one warning line (``warn``, default logging's) naming ``what`` and the reason.
    ``threads``: ONNX Runtime's intra-op threads when decoding threads share the cores (``graft.data.prefetch``'s
    plan; the session then does not spin); default: as many as torch uses.
    """
    module.eval()
    inputs = inputs[:CHECK_IMAGES].detach().float().cpu().contiguous()
    reason = ""
    for rebuild in (False, True):
        try:
            candidate, reason = _verified(module, path, inputs, output_names, rebuild, threads)
        except GraftError as error:
            candidate, reason = None, str(error)
            if not onnxruntime_available():
                break  # missing packages: a rebuild cannot help
        except Exception as error:  # noqa: BLE001 - a damaged file or an exporter failure: rebuild, then eager
            first = (_COLOURS.sub("", str(error)).strip().splitlines() or [""])[0][:200]
            candidate, reason = None, f"{type(error).__name__}: {first}"
        if candidate is not None:
            return candidate
    (warn or log.warning)(f"warning: ONNX Runtime not used for {what} ({reason}); running eager PyTorch instead")
    return module


def run_forward(model: nn.Module, run_dir: str | Path, runtime: str, device: torch.device | str, input_size,
                warn=None, threads: int | None = None) -> nn.Module:
    """The forward of a run's model for ``predict``/``serve`` ``--runtime`` (one of ``RUNTIMES``): ``model`` itself
    (torch, or auto without ONNX Runtime or off the CPU), else ONNX Runtime on the run's verified export, made on first
    use into ``RUN/runtime/`` (recorded in the run's manifest, so ``--overwrite`` owns it) under the digest of the
    run's weights and card. A run folder that cannot be written, or an export that does not match, runs eagerly after
    one warning line. ``threads``: ONNX Runtime's intra-op threads (default: torch's)."""
    if resolve_engine(runtime, device) == "eager":
        return model
    run_dir = Path(run_dir)
    digest = engine_digest(*(file_sha256(run_dir / name) for name in ("model.safetensors", "graft.json")),
                           tuple(input_size))
    try:
        (run_dir / RUNTIME_FOLDER).mkdir(exist_ok=True)
        folder = claim(run_dir / RUNTIME_FOLDER, "--runtime")
    except (GraftError, OSError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        (warn or log.warning)(f"warning: ONNX Runtime not used for {run_dir} (cannot write its export there: {first});"
                              " running eager PyTorch instead")
        return model
    inputs = torch.randn(4, 3, *input_size, generator=torch.Generator().manual_seed(1))
    return engine_module(model, folder / f"model-{digest}.onnx", inputs, str(run_dir), warn, threads=threads)
