"""Warm reruns of ``graft features`` without timm: the cache spaces found from a recorded request, not a network.

A cold run builds the backbone (importing timm), hashes the weights each node depends on and extracts. It then
records beside the cache, in ``warm/<request key>.json``, what a rerun needs to name the same spaces: each node's
weights digest, the preprocessing, and an identity of the weights that can be checked without building anything —
the SHA-256 of the weights file (packaged, in the Hugging Face cache, or given) or, for a seeded random
initialisation, nothing beyond the request, whose key holds the seed and the torch, timm and graft versions.

A rerun of the same request (backbone, nodes, pooling, image size, views, seed) works that identity out again from
the files as they are now and reads the features when it matches and every image is cached. Anything else — another
weights file under the same name, a record that is damaged or names another request, an image not cached — takes the
full path, which records again. The space keys are computed from the recorded digests exactly as the full path
computes them, so a change to the node, pooling or preprocessing misses the cache either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from importlib import metadata
from pathlib import Path

import torch

from graft.data.discovery import DatasetSplits
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing, run_weights_path
from graft.models.backbones.registry import BARE_NAMES
from graft.models.backbones.timm_source import PACKAGED_WEIGHTS, cached_hub_file, hub_reachable
from graft.probing.cache import cache_folder, file_key, view_spaces
from graft.probing.featureset import SPLITS, FeatureSet, split_features
from graft.utils import distributed
from graft.utils.files import atomic_write, file_sha256, read_json_object
from graft.utils.outputs import check_output
from graft.utils.versions import __version__

__all__ = ["RECORDS", "cached_features", "record_path", "recorded_features", "warm_request", "weights_identity"]

log = logging.getLogger(__name__)

RECORDS = "warm"  # the records' folder inside the cache
RECORD_FORMAT = 1
MAX_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes
DIGEST = re.compile(r"[0-9a-f]{64}")


def warm_request(backbone: str, nodes: list[str], image_size: int | None, pool: str, pretrained: bool,
                 augment_views: int, seed: int = 0, weights_file: str | None = None) -> dict | None:
    """What a ``graft features`` run asked for, with the versions that decide the network and its preprocessing;
    None for a backbone the warm path does not cover (only timm names are: their weights are a file or a seed)."""
    if ":" in backbone or BARE_NAMES.get(backbone.partition("?")[0], "timm") != "timm":
        return None
    try:
        timm_version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        return None
    weights = str(run_weights_path(Path(weights_file)).resolve()) if weights_file and pretrained else None
    return {"format": RECORD_FORMAT, "graft": __version__, "torch": torch.__version__, "timm": timm_version,
            "backbone": backbone, "nodes": list(nodes), "image_size": image_size, "pool": pool,
            "pretrained": bool(pretrained), "augment_views": int(augment_views), "seed": int(seed),
            "weights_file": weights}


def record_path(cache: Path, request: dict) -> Path:
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:24]
    return cache / RECORDS / f"{key}.json"


def weights_identity(request: dict, hub_id: str | None) -> dict | None:
    """The weights the full path would load now, found the way ``TimmSource`` finds them but without timm:
    {"source", "sha256"}; None when that cannot be told without building the network (no hub id, or the hub is
    reachable and could hold newer weights than the local cache)."""
    if not request["pretrained"]:
        return {"source": "random"}  # seeded: the seed and the versions are in the request
    if request["weights_file"]:
        path = Path(request["weights_file"])
        # the preprocessing comes from the file's metadata or from one of these beside it: each one's bytes count
        beside = (path, path.parent / "graft.json", path.with_suffix(".json"), path.parent / "config.json")
        return {"source": "file", "sha256": [file_sha256(file) if file.is_file() else None for file in beside]}
    if not hub_id:
        return None
    cached = cached_hub_file(hub_id)
    if cached is not None:
        return None if hub_reachable() else {"source": "hub", "hub_id": hub_id, "sha256": file_sha256(cached)}
    arch, _, tag = request["backbone"].partition(".")
    packaged = PACKAGED_WEIGHTS.get(arch)
    if packaged is None or tag not in ("", packaged.tag):
        return None
    import importlib

    try:
        path = packaged.locate(importlib.import_module(packaged.module))
    except ImportError:
        return None
    return {"source": "package", "hub_id": hub_id, "sha256": file_sha256(path)}


def _loaded_source(weights: str) -> str:
    """The kind of a ``Backbone.weights`` description: random, hub, package or file."""
    return weights.partition(":")[0]


def remember(cache: Path, request: dict, weights: str, hub_id: str | None, preprocessing: Preprocessing,
             sets: dict[str, FeatureSet]) -> None:
    """Records a cold run for its reruns; nothing when the weights' identity cannot be checked without timm or is
    not the one that was loaded (a file replaced during the run)."""
    identity = weights_identity(request, hub_id)
    if identity is None or identity["source"] != _loaded_source(weights):
        return
    record = {"request": request, "weights": identity, "hub_id": hub_id, "preprocessing": preprocessing.to_dict(),
              "digests": {node: features.digest for node, features in sets.items()}}
    if not all(DIGEST.fullmatch(digest) for digest in record["digests"].values()):
        return
    path = record_path(cache, request)
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(record, indent=1), encoding="utf-8"))


def _read_record(cache: Path, request: dict) -> tuple[Preprocessing, dict[str, str]] | None:
    """(preprocessing, {node: digest}) from the request's record when it is sound and its weights are still the
    ones on disk; None otherwise (a damaged record is said once and left to be rewritten)."""
    path = record_path(cache, request)
    if not path.is_file():
        return None
    record = read_json_object(path, MAX_RECORD_BYTES)
    try:
        digests, hub_id = record["digests"], record["hub_id"]
        if record["request"] != request or not isinstance(digests, dict) or list(digests) != request["nodes"]:
            raise ValueError("it names another request")
        if not all(isinstance(d, str) and DIGEST.fullmatch(d) for d in digests.values()):
            raise ValueError("a node digest is not a SHA-256")
        if hub_id is not None and not isinstance(hub_id, str):
            raise ValueError("hub_id is not text")
        preprocessing = Preprocessing.from_dict(record["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        log.warning("%s: damaged warm-rerun record (%s); extracting the full way", path, error)
        return None
    if weights_identity(request, hub_id) != record["weights"]:
        return None  # other weights under the same name: the full path hashes them
    return preprocessing, digests


def recorded_features(splits: DatasetSplits, request: dict, cache: Path, say=None) -> dict[str, FeatureSet] | None:
    """{node: FeatureSet} read from the cache through the request's record, or None when the full path must run
    (no sound record, other weights, or an image not cached)."""
    if splits.shards is not None or not any(getattr(splits, split) for split in SPLITS):
        return None  # the full path says what is wrong with such data
    found = _read_record(cache, request)
    if found is None:
        return None
    preprocessing, digests = found
    all_paths = [p for split in SPLITS for p, _ in getattr(splits, split)]
    views = [(0, all_paths)] + [(v, [p for p, _ in splits.train]) for v in range(1, request["augment_views"] + 1)]
    results: dict[str, dict[int, object]] = {node: {} for node in digests}
    for view, paths in views:
        keys = [file_key(p) for p in paths]
        for node, space in view_spaces(cache, request["backbone"], digests, request["pool"], preprocessing,
                                       view).items():
            located, missing = space.lookup(keys)
            if missing:
                return None
            results[node][view] = space.gather([located[k] for k in keys])
    stats = {"extracted": 0, "cached": sum(len(paths) for _, paths in views), "seconds": 0.0, "engine": "cache",
             "images_per_s": None}
    if say:
        say(f"features: 0 images extracted, {stats['cached']} read from the cache ({cache})")
    return {node: split_features(node, splits, results[node], request["augment_views"], stats, digests[node])
            for node in digests}


def cached_features(splits: DatasetSplits, backbone: str, nodes: list[str], image_size: int | None = None,
                    pool: str = "avg", pretrained: bool = True, cache_dir=None, device: str = "auto",
                    batch_size: int | None = None, workers: int = -1, log=None, augment_views: int = 0,
                    compile_mode: str = "off", engine: str = "auto", seed: int = 0,
                    weights_file: str | None = None) -> dict[str, FeatureSet]:
    """``stage_features``'s {node: FeatureSet}, read without timm or the network when a recorded earlier run names
    the same request and weights and every image is cached; else extracted the full way (and recorded)."""
    cache = cache_folder(cache_dir)
    if splits.root:  # refused here as the full path refuses it: the cache is never inside (or over) the data
        check_output(cache, "--cache", ((splits.root, "data"),))
    request = warm_request(backbone, nodes, image_size, pool, pretrained, augment_views, seed, weights_file)
    if request is not None and distributed.world_size() == 1:
        sets = recorded_features(splits, request, cache, log)
        if sets is not None:
            return sets
    from graft.probing.leaderboard import stage_features  # imports torchvision: only when extracting

    net, preprocessing, sets = stage_features(splits, backbone, nodes, image_size, pool, pretrained, cache_dir,
                                              device, batch_size, workers, log, seed, augment_views, weights_file,
                                              compile_mode, engine)
    if request is not None and distributed.is_main():
        cfg = getattr(net.net, "pretrained_cfg", None)  # timm 1.0: a dict; older timm: a PretrainedCfg
        hub_id = cfg.get("hf_hub_id") if isinstance(cfg, dict) else getattr(cfg, "hf_hub_id", None)
        try:
            remember(cache, request, net.weights, hub_id if isinstance(hub_id, str) else None, preprocessing, sets)
        except (OSError, GraftError) as error:  # the features are right; only the next rerun's shortcut is lost
            log.warning("could not record the warm-rerun shortcut in %s (%s)", cache, error)
    return sets
