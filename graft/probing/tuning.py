"""The eager extraction forward's batch size and memory format on the CPU, measured once per machine and network.

Which batch runs fastest on a CPU depends on its caches and cores, not on a rule: on a 2-core machine
EfficientNet-Lite0 at 224 px ran 95 / 82 / 47 images/s at batch 1 / 8 / 32 in channels-last, 85 / 43 / 30 in NCHW.
So before its first eager extraction a network is timed on random inputs at a few settings (about one to three
seconds), and the fastest is written to ``CACHE/tuning/eager-DIGEST.json``, the digest naming the network's graph
(architecture, nodes, pooling, input size; not its weights, whose values do not change its speed), torch's version
and threads and the machine's processor. The file is graft's own, read
back as data: anything but one of the candidate settings is ignored and measured again.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn

from graft.data.prefetch import usable_cores
from graft.errors import GraftError
from graft.models.onnx_engine import engine_digest
from graft.utils.files import read_json_object, write_json
from graft.utils.modes import evaluating

__all__ = ["CANDIDATES", "TUNING_FOLDER", "eager_setting", "machine_signature"]

log = logging.getLogger(__name__)

TUNING_FOLDER = "tuning"
CANDIDATES = ((1, True), (8, True), (32, True), (8, False))  # (batch size, channels-last)
TIMED_IMAGES = 16  # images per candidate after one warm-up batch: enough to rank them, cheap enough to do once


def machine_signature() -> str:
    """What the measurement depends on besides the network: processor, cores, torch's version and threads."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:  # Linux: the processor's name
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}|{usable_cores()}|{torch.__version__}|{torch.get_num_threads()}"


def _images_per_s(module: nn.Module, images: torch.Tensor, batch: int, channels_last: bool) -> float:
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    batches = [images[first:first + batch].contiguous(memory_format=layout) for first in range(0, len(images), batch)]
    with torch.inference_mode():
        module(batches[0])  # warm-up: the allocator and the kernels' first-call costs
        start = time.perf_counter()
        count = 0
        for part in batches:
            module(part)
            count += len(part)
            if count >= TIMED_IMAGES:
                break
    return count / max(time.perf_counter() - start, 1e-9)


def _read(path: Path) -> tuple[int, bool] | None:
    data = read_json_object(path, max_bytes=4096)
    setting = (data.get("batch_size"), data.get("channels_last"))
    if setting in CANDIDATES and type(setting[0]) is int and type(setting[1]) is bool:  # JSON true is no batch size
        return setting
    return None


def eager_setting(module: nn.Module, input_size, cache: Path, *parts) -> tuple[int, bool]:
    """(batch size, channels-last) for ``module``'s eager forward on the CPU: read from ``cache``'s tuning file named
    by ``parts`` (what the network's graph depends on) and the machine, else measured now and written there."""
    path = Path(cache) / TUNING_FOLDER / f"eager-{engine_digest(*parts, tuple(input_size), machine_signature())}.json"
    found = _read(path)
    if found is not None:
        return found
    images = torch.randn(max(batch for batch, _ in CANDIDATES), 3, *input_size,
                         generator=torch.Generator().manual_seed(0))
    with evaluating(module):
        speeds = {setting: _images_per_s(module, images, *setting) for setting in CANDIDATES}
    best = max(speeds, key=speeds.get)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"batch_size": best[0], "channels_last": best[1], "machine": machine_signature(),
                          "images_per_s": {f"{batch}{'' if last else ' nchw'}": round(value, 1)
                                           for (batch, last), value in speeds.items()}})
    except (GraftError, OSError) as error:  # a read-only cache still extracts; it measures again next time
        log.warning("warning: the eager extraction setting was not recorded (%s)", str(error).splitlines()[0][:300])
    return best
