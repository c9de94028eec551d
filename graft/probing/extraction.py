"""Frozen-trunk features computed once and cached: the cheap path to linear probes and backbone comparisons.

A cache *space* holds the pooled features of one (architecture, weights, node, pooling, preprocessing, view); its
key hashes all of them, the weights by content. Inside a space, each image is keyed by path + size + mtime, so a
changed or added file is re-extracted and nothing else. Features live in float16 ``.npy`` shards (memory-mapped
on read), each written to a temp file, fsynced and renamed; ``index.json`` is rewritten the same way and last, so a
shard from a crashed run is never referenced, never read back half-written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from graft.data.datasets import loader_options
from graft.data.discovery import DatasetSplits
from graft.data.images import load_image
from graft.data.prefetch import DecodePlan, engine_plan, plan_batches
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing
from graft.models.onnx_engine import as_tuple, engine_digest, engine_module, resolve_engine
from graft.models.surgery import DEFAULT_NODE, Capture, GlobalPool, Trunk, first_tensor, modules_reached, parse_nodes
from graft.probing.cache import (
    SHARD_IMAGES,
    cache_folder,
    file_key,
    tensor_digests,
    view_spaces,
    weights_digest,
)
from graft.probing.featureset import SPLITS, FeatureSet, save_feature_set, split_features
from graft.probing.tuning import eager_setting
from graft.utils import distributed
from graft.utils.compiling import maybe_compile
from graft.utils.memory import out_of_memory_hint
from graft.utils.modes import evaluating
from graft.utils.outputs import check_output
from graft.utils.progress import Progress
from graft.utils.runtime import autocast, autocast_dtype, to_device

__all__ = [
    "FeatureExtractor", "FeatureSet", "SPLITS", "candidate_cuts", "extract_features", "extraction_batch_size",
    "extraction_loader", "node_digests", "save_feature_set", "split_features"
]

log = logging.getLogger(__name__)


class FeatureExtractor(nn.Module):
    """Pooled features at several nodes from ONE forward pass (hooks capture each node; the pass stops after the
    last one unless the backbone's own ``pre_logits`` features are wanted too).

    Args:
        net: a backbone with timm's contract (classifier removed).
        nodes: module names and/or ``pre_logits``.
        pool: ``avg`` or ``avgmax``, as in ``graft.models.surgery.Trunk``.
    """

    def __init__(self, net: nn.Module, nodes: list[str], pool: str = "avg"):
        super().__init__()
        self.net, self.nodes, self.pool_kind = net, list(nodes), pool
        parse_nodes(net, ",".join(self.nodes))  # an unknown node: the one-line error naming the closest real ones
        if DEFAULT_NODE in self.nodes and pool != "avg":
            Trunk(net, DEFAULT_NODE, pool)  # configures the backbone's own pooling exactly as a cut would
        self.pool = GlobalPool(pool, channels_last_layout=getattr(net, "output_fmt", "NCHW") == "NHWC")
        named = [node for node in self.nodes if node != DEFAULT_NODE]
        # the pass stops after the last named node unless the backbone's own pre_logits features are wanted too
        self._capture = Capture(net, named, stop=DEFAULT_NODE not in self.nodes) if named else None

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, outputs = self._capture.run(self._pre_logits, x) if self._capture else (self._pre_logits(x), {})
        features = {node: self.pool(first_tensor(outputs[node])) for node in self.nodes
                    if node != DEFAULT_NODE and node in outputs}
        if DEFAULT_NODE in self.nodes:
            features[DEFAULT_NODE] = pooled
        missing = [n for n in self.nodes if features.get(n) is None]
        if missing:
            raise GraftError(f"node '{missing[0]}' is not reached by the backbone's forward pass; choose another")
        return features


def candidate_cuts(backbone) -> list[str]:
    """Multi-node cuts worth probing for a backbone (or its list of stage nodes): the pooled features with the last
    one, two and three stages below them, e.g. ``blocks.5,pre_logits``, ``blocks.4,blocks.5,pre_logits``. Far
    domains (digits, medical, satellite) often do better with such mid-level features than with the top alone."""
    stages = list(getattr(backbone, "stage_nodes", backbone) or ())
    below = [node for node in stages if node != DEFAULT_NODE][:-1]  # the last stage feeds pre_logits directly
    return [",".join([*below[-count:], DEFAULT_NODE]) for count in (1, 2, 3) if len(below) >= count]


class _ViewDataset(Dataset):
    """Images for extraction: view 0 is the evaluation transform, view k > 0 a seeded training augmentation."""

    def __init__(self, paths: list[str], preprocessing: Preprocessing, view: int, hflip: bool = True):
        self.paths, self.view = paths, view
        self.transform = create_transform(preprocessing, train=view > 0, augment="standard", hflip=hflip)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.view:  # the same augmented view of the same file every time: cached views stay meaningful
            seed = int.from_bytes(hashlib.sha256(f"{self.paths[index]}|{self.view}".encode()).digest()[:4], "little")
            torch.manual_seed(seed)
        return self.transform(load_image(self.paths[index], None)), index


def extraction_batch_size(device: torch.device) -> int:
    """Inference batch for extraction: small on the CPU, where activations then stay in cache (measured on 2 cores:
    EfficientNet-Lite0 at 224 px ran 74 img/s at batch 16, 54 at 32, 34-44 at 64), large on an accelerator."""
    return 16 if device.type == "cpu" else 64


def extract_features(splits: DatasetSplits, extractor: nn.Module, preprocessing: Preprocessing, architecture: str,
                     cache_dir: str | os.PathLike | None = None, batch_size: int | None = None,
                     workers: int = -1, device: torch.device | str = "cpu", augment_views: int = 0,
                     hflip: bool = True, log=None, compile_mode: str = "off", engine: str = "auto",
                     decode: DecodePlan | None = None) -> dict[str, FeatureSet]:
    """Features of every image in ``splits`` at each of the extractor's nodes, from the cache where possible.

    Args:
        extractor: a ``FeatureExtractor`` (several nodes, one pass) or a ``Trunk`` (its single node).
        architecture: the backbone's name, part of the cache key (with a content hash of the weights).
        cache_dir: default ``$GRAFT_CACHE`` or ``~/.cache/graft/features``.
        batch_size: None picks ``extraction_batch_size(device)``, or for the eager engine on the CPU the batch size
            and memory format measured once per machine and network (``graft.probing.tuning``).
        augment_views: also cache this many augmented views of each training image.
        compile_mode: ``--compile``: torch.compile the extractor's forward (``graft.utils.compiling``; a failure
            warns and extracts eagerly). The cache key is unchanged: compiling does not change the weights.
        engine: ``auto`` (ONNX Runtime on the CPU when installed, else eager PyTorch), ``onnx`` or ``eager``
            (``graft.models.onnx_engine``). The trunk's ONNX file is cached beside the features and checked against
            eager on the first batch; the cache key is unchanged: both engines give the same features.
        decode: on the CPU with ``workers`` -1, how decoding threads and the forward share the cores; None: the
            ONNX engine follows ``graft.data.prefetch.decode_plan``, the eager one decodes on every core between
            forwards (``extraction_loader``). The features are the same whatever the plan.

    Returns:
        {node: FeatureSet}. ``stats`` tells how many images were extracted vs read, the images/s and the ``engine``
        that ran (``eager`` when the ONNX export failed its check).
    """
    if splits.shards is not None:  # a shard sample is a tar member, not a file the cache can key and reread
        raise GraftError(f"{splits.root}: features are extracted from image files, and tar shards hold none; pass the "
                         "folder (or CSV) the shards were written from")
    if not any(getattr(splits, split) for split in SPLITS):
        raise GraftError(f"{splits.root or 'the data'}: no images to extract features from")
    extractor = _as_multi(extractor)
    pool = extractor.pool_kind
    device = torch.device(device)
    engine = resolve_engine(engine, device)
    tune = batch_size is None and engine == "eager" and device.type == "cpu"  # measured once, before the first batch
    batch_size, channels_last = batch_size or extraction_batch_size(device), True
    cache = cache_folder(cache_dir)
    if splits.root:  # the cache is graft's to write and rebuild: never inside (or over) the user's data
        check_output(cache, "--cache", ((splits.root, "data"),))
    with out_of_memory_hint(batch_size):  # the digests' dry pass is the first forward: its OOM gets the same line
        digests = node_digests(extractor, preprocessing.input_size)
    all_paths = [p for split in SPLITS for p, _ in getattr(splits, split)]
    train_paths = [p for p, _ in splits.train]
    views = [(0, all_paths)] + [(v, train_paths) for v in range(1, augment_views + 1)]
    results: dict[str, dict[int, np.ndarray]] = {node: {} for node in extractor.nodes}
    stats = {"extracted": 0, "cached": 0, "seconds": 0.0, "engine": engine}
    onnx_path = None if engine == "eager" else cache / "onnx" / (engine_digest(
        architecture, sorted(digests.items()), extractor.nodes, pool, tuple(preprocessing.input_size)) + ".onnx")
    for view, paths in views:
        spaces = view_spaces(cache, architecture, digests, pool, preprocessing, view)
        keys = [file_key(p) for p in paths]
        missing = sorted({k for space in spaces.values() for k in space.lookup(keys)[1]})
        distributed.barrier()  # under torchrun: every rank has read the same index before any rank adds to it
        if missing:
            if tune:
                # keyed by the graph, not the weights: their values do not change its speed
                batch_size, channels_last = eager_setting(extractor, preprocessing.input_size, cache, architecture,
                                                          extractor.nodes, pool)
                tune = False
            by_key = dict(zip(keys, paths))
            mine = missing[distributed.rank()::distributed.world_size()]  # each rank writes its share's own shards
            start = time.perf_counter()
            with out_of_memory_hint(batch_size):
                dataset = _ViewDataset([by_key[k] for k in mine], preprocessing, view, hflip)
                loader, threads = extraction_loader(dataset, batch_size, workers, device, onnx_path is not None,
                                                    decode)
                stats["engine"] = _extract_into(spaces, loader, mine, extractor, view, device, compile_mode, log,
                                                onnx_path, threads, channels_last)
            stats["seconds"] += time.perf_counter() - start
            stats["extracted"] += len(missing)
        distributed.barrier()  # every share is in the index before anyone reads the features back
        stats["cached"] += len(keys) - len(missing)
        for node, space in spaces.items():
            found, still_missing = space.lookup(keys)
            if still_missing:
                raise GraftError(f"{space.root}: cache incomplete after extraction (concurrent deletion?); run again")
            results[node][view] = space.gather([found[k] for k in keys])
    stats["images_per_s"] = stats["extracted"] / stats["seconds"] if stats["seconds"] else None
    if log:
        log(f"features: {stats['extracted']} images extracted, {stats['cached']} read from the cache ({cache})")
    return {node: split_features(node, splits, results[node], augment_views, stats, digests[node])
            for node in extractor.nodes}


def node_digests(extractor: nn.Module, input_size) -> dict[str, str]:
    """{node: content hash of the weights its features depend on}: those of the modules a dry forward pass (batch 1,
    eval mode) reaches before the node's output exists — every reached module for ``pre_logits`` and for a cut
    trunk, whose pass ends at its cut. So a trunk cut (and pruned) at a node and a several-node extractor over the
    whole network share cache entries (auto's probe reads what advise extracted), and a change to a weight the node
    never sees leaves its features cached."""
    net = extractor.trunk.net if isinstance(extractor, _TrunkExtractor) else extractor.net
    multi = isinstance(extractor, FeatureExtractor)
    named = [node for node in extractor.nodes if node != DEFAULT_NODE] if multi else []
    parameter = next(net.parameters(), None)
    images = torch.zeros(1, 3, *input_size, device=parameter.device if parameter is not None else "cpu")
    with evaluating(extractor), torch.no_grad():
        everything, before = modules_reached(net, lambda: extractor(images), named)
    tensors = tensor_digests(net)  # each weight hashed once, not once per node
    return {node: weights_digest(net, before.get(node, everything), tensors) for node in extractor.nodes}


def _as_multi(extractor: nn.Module) -> nn.Module:
    if isinstance(extractor, Trunk):
        return _TrunkExtractor(extractor)
    return extractor


class _TrunkExtractor(nn.Module):
    """A cut Trunk seen as a one-node extractor: the cached features are exactly what the model's head receives."""

    def __init__(self, trunk: Trunk):
        super().__init__()
        self.trunk = trunk
        self.nodes = [trunk.node]
        self.pool_kind = trunk.pool_kind

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.trunk.node: self.trunk(x)}


def extraction_loader(dataset, batch_size: int, workers: int, device: torch.device, onnx: bool,
                      decode: DecodePlan | None = None) -> tuple:
    """(the batches of ``dataset``, ONNX Runtime's intra-op threads or None for torch's own).

    On an accelerator, or with ``workers`` given, a DataLoader (``loader_options``). On the CPU with automatic
    workers, threads decode as ``decode`` or ``graft.data.prefetch.engine_plan`` splits the cores. An augmented view
    is decoded by one thread: its seeded transforms draw from torch's global generator.
    """
    if device.type != "cpu" or workers != -1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(device, workers)), None
    plan = decode or engine_plan(onnx)
    loader = plan_batches(dataset, batch_size, plan, one_thread=bool(dataset.view))
    return loader, plan.compute_threads if onnx else None


def _extract_into(spaces, loader, keys, extractor, view: int, device: torch.device, compile_mode: str = "off",
                  log=None, onnx_path: Path | None = None, threads: int | None = None, channels_last: bool = True
                  ) -> str:
    """Extracts the images of ``loader`` (batches of (images, indices into ``keys``)) into the cache ``spaces``;
    returns the engine that ran (``onnx``, or ``eager`` when there was no ONNX file to use or it failed its check).
    ``threads``: ONNX Runtime's intra-op threads (None: torch's); ``channels_last``: the eager forward's layout."""
    dtype = autocast_dtype(device)
    forward, engine = None, "eager"  # built on the first batch: the ONNX engine is checked on real images
    pending: dict[str, list[np.ndarray]] = {node: [] for node in spaces}
    pending_keys: list[str] = []
    done = 0
    what = "features" + (f" (augmented view {view})" if view else "")
    with evaluating(extractor):
        extractor.to(device)
        extractor.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.inference_mode(), Progress(what, len(keys), "images", log, log is not None) as progress:
            for images, indices in loader:
                if forward is None:
                    forward, engine = _engine_forward(extractor, onnx_path, images, compile_mode, log, threads)
                with autocast(device, dtype):
                    outputs = forward(to_device(images, device, channels_last))
                for node, values in outputs.items():
                    pending[node].append(values.float().cpu().numpy().astype(np.float16))
                pending_keys += [keys[i] for i in indices.tolist()]
                if len(pending_keys) >= SHARD_IMAGES:
                    _flush(spaces, pending, pending_keys)
                    pending_keys = []
                done += len(indices)
                progress.update(done)
        if pending_keys:
            _flush(spaces, pending, pending_keys)
    return engine


class _NodeTuple(nn.Module):
    """An extractor's {node: features} as a tuple in node order: what an ONNX graph can return."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.extractor(x)
        return tuple(outputs[node] for node in self.extractor.nodes)


def _engine_forward(extractor: nn.Module, onnx_path: Path | None, images: torch.Tensor, compile_mode: str, log,
                    threads: int | None = None):
    """(the extraction forward, {node: features}; its engine): ONNX Runtime on the cached, verified export (checked
    on ``images``) when ``onnx_path`` is given and it matches; else eager PyTorch (``--compile`` applies there only)."""
    if onnx_path is not None:
        nodes = extractor.nodes
        names = tuple(f"features_{index}" for index in range(len(nodes)))
        module = engine_module(_NodeTuple(extractor), onnx_path, images, "extraction", log, names, threads)
        if not isinstance(module, _NodeTuple):
            return (lambda x: dict(zip(nodes, as_tuple(module(x))))), "onnx"
    return maybe_compile(extractor, compile_mode, "extraction", log), "eager"


def _flush(spaces, pending: dict[str, list[np.ndarray]], keys: list[str]) -> None:
    for node, space in spaces.items():
        space.add_shard(keys, np.concatenate(pending[node]))
        pending[node].clear()
