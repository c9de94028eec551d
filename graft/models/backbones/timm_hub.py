"""timm models named the ecosystem's way: ``hf-hub:timm/NAME`` (a Hugging Face repository) and ``local-dir:PATH``
(a folder with timm's ``config.json`` and ``model.safetensors``, as ``graft export --format timm`` writes).

Both go through timm's own loaders, so a folder or repository that timm opens, graft opens the same way. Offline, a
hub repository is read from the local Hugging Face cache (its snapshot folder is a ``local-dir``); nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

from graft.errors import GraftError
from graft.models.backbones.base import (
    Backbone,
    load_trunk_weights,
    read_weights_file,
    run_weights_path,
    timm_cfg_preprocessing,
)
from graft.models.backbones.timm_source import cached_hub_file, hub_reachable
from graft.utils.files import file_sha256

__all__ = ["WEIGHT_FILES", "HubSource", "LocalDirSource", "check_timm_config"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's folder loader looks for, in its order
MAX_CONFIG_BYTES = 1 << 20  # timm's config.json is a few KB
RATE_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
             "patch_drop_rate")  # model_args timm hands to dropout layers, which fail only at the first forward pass


def _read_config(path: Path, fix: str) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MB")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise GraftError(f"{path}: not readable JSON ({str(error) or type(error).__name__:.100}); {fix}") from None
    if not isinstance(raw, dict):
        raise GraftError(f"{path}: expected a JSON object, found {type(raw).__name__}; {fix}")
    return raw


def check_timm_config(path: Path) -> None:
    """Checks a timm ``config.json`` (read as data) before timm builds from it: a value that would fail only later,
    mid-training (``mean: "abc"``, a NaN, ``drop_rate: "x"``), is one line naming the file and the field.

    Raises:
        GraftError: for unreadable JSON, a missing architecture, bad preprocessing or bad model_args.
    """
    fix = "fix the field or export the folder again (`graft export RUN --format timm`)"
    raw = _read_config(path, fix)
    cfg, args = raw.get("pretrained_cfg", raw), raw.get("model_args", {})
    if not isinstance(cfg, dict) or not isinstance(args, dict):
        raise GraftError(f"{path}: pretrained_cfg and model_args must be JSON objects; {fix}")
    if not isinstance(raw.get("architecture"), str) or not raw["architecture"]:
        raise GraftError(f"{path}: architecture must name a timm model, got {raw.get('architecture')!r:.40}; {fix}")
    try:
        timm_cfg_preprocessing(cfg)
    except (TypeError, ValueError) as error:
        raise GraftError(f"{path}: pretrained_cfg is invalid ({error!s:.120}); {fix}") from None
    for key in RATE_ARGS:
        value = args.get(key, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise GraftError(f"{path}: model_args.{key} must be a number in [0, 1), got {value!r:.40}; {fix}")
    if args.get("in_chans", 3) != 3 or isinstance(args.get("in_chans"), bool):
        raise GraftError(f"{path}: model_args.in_chans must be 3 (graft feeds RGB images), got "
                         f"{args.get('in_chans')!r:.40}; {fix}")


def _create(timm_name: str, pretrained: bool, weights_file: str | None, shown: str, weights: str) -> Backbone:
    """The backbone timm builds from ``timm_name`` (``local-dir:...`` or ``hf-hub:...``) without its classifier."""
    import timm

    try:
        net = timm.create_model(timm_name, pretrained=pretrained and not weights_file, num_classes=0)
    except Exception as error:  # noqa: BLE001 - timm raises RuntimeError, FileNotFoundError, hub errors, ...
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise GraftError(f"could not create backbone '{shown}' ({reason})") from None
    try:  # the folder's own config.json as timm read it (a repository fetched now was not checked before)
        preprocessing = timm_cfg_preprocessing(net.pretrained_cfg)
    except (TypeError, ValueError) as error:
        raise GraftError(f"{shown}: its config.json has invalid preprocessing ({error!s:.120})") from None
    if weights_file:
        path = run_weights_path(Path(weights_file))
        state, _ = read_weights_file(path)
        load_trunk_weights(net, state, str(path))
        return Backbone(shown, net, preprocessing, f"file:{path} sha256={file_sha256(path)[:16]}")
    return Backbone(shown, net, preprocessing, weights if pretrained else "random")


class LocalDirSource:
    """``local-dir:PATH``: a folder holding timm's ``config.json`` (architecture, preprocessing) and weights."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise GraftError(f"local-dir:{name}: no config.json in that folder; pass a folder timm wrote (save_for_hf) "
                             "or `graft export RUN --format timm` made")
        if pretrained and not weights_file and not any((folder / file).is_file() for file in WEIGHT_FILES):
            raise GraftError(f"local-dir:{name}: no {' or '.join(WEIGHT_FILES)} in that folder; add the weights or "
                             "use --no-pretrained")
        check_timm_config(folder / "config.json")
        return _create(f"local-dir:{folder}", pretrained, weights_file, f"local-dir:{name}", f"local-dir:{folder}")


class HubSource:
    """``hf-hub:OWNER/NAME[@REVISION]``: a timm model repository on the Hugging Face hub, or in its local cache."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        repo = name.partition("@")[0]
        config = cached_hub_file(repo, ("config.json",))
        cached = config is not None and (not pretrained or weights_file or cached_hub_file(repo, WEIGHT_FILES))
        if cached and "@" not in name:  # the cached snapshot is a local folder: read it there, nothing is fetched
            snapshot = Path(config).parent
            check_timm_config(snapshot / "config.json")
            return _create(f"local-dir:{snapshot}", pretrained, weights_file, f"hf-hub:{name}", f"hub:{repo}")
        if not hub_reachable():
            raise GraftError(f"hf-hub:{name}: not in the local Hugging Face cache and the hub is unreachable; "
                             f"pre-download it with `hf download {repo}` where there is a network, or pass "
                             "local-dir:FOLDER")
        return _create(f"hf-hub:{name}", pretrained, weights_file, f"hf-hub:{name}", f"hub:{repo}")
