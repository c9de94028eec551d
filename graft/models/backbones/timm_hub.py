"""timm models named the ecosystem's way: ``hf-hub:timm/NAME`` (a Hugging Face repository) and ``local-dir:PATH``
(a folder with timm's ``config.json`` and ``model.safetensors``, as ``graft export --format timm`` writes).

Both go through timm's own loaders, so a folder or repository that timm opens, graft opens the same way. Offline, a
hub repository is read from the local Hugging Face cache (its snapshot folder is a ``local-dir``); nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

from graft.errors import GraftError
from graft.models.backbones.base import (
    Backbone,
    Preprocessing,
    _sha256,
    load_trunk_weights,
    read_weights_file,
    run_weights_path,
)
from graft.models.backbones.timm_source import cached_hub_file, hub_reachable

__all__ = ["WEIGHT_FILES", "HubSource", "LocalDirSource"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's folder loader looks for, in its order


def _create(timm_name: str, pretrained: bool, weights_file: str | None, shown: str, weights: str) -> Backbone:
    """The backbone timm builds from ``timm_name`` (``local-dir:...`` or ``hf-hub:...``) without its classifier."""
    import timm

    try:
        net = timm.create_model(timm_name, pretrained=pretrained and not weights_file, num_classes=0)
    except Exception as error:  # noqa: BLE001 - timm raises RuntimeError, FileNotFoundError, hub errors, ...
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise GraftError(f"could not create backbone '{shown}' ({reason})") from None
    preprocessing = Preprocessing.from_timm_cfg(net.pretrained_cfg)  # the folder's own config.json
    if weights_file:
        path = run_weights_path(Path(weights_file))
        state, _ = read_weights_file(path)
        load_trunk_weights(net, state, str(path))
        return Backbone(shown, net, preprocessing, f"file:{path} sha256={_sha256(path)[:16]}")
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
        return _create(f"local-dir:{folder}", pretrained, weights_file, f"local-dir:{name}", f"local-dir:{folder}")


class HubSource:
    """``hf-hub:OWNER/NAME[@REVISION]``: a timm model repository on the Hugging Face hub, or in its local cache."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        repo = name.partition("@")[0]
        config = cached_hub_file(repo, ("config.json",))
        cached = config is not None and (not pretrained or weights_file or cached_hub_file(repo, WEIGHT_FILES))
        if cached and "@" not in name:  # the cached snapshot is a local folder: read it there, nothing is fetched
            snapshot = Path(config).parent
            return _create(f"local-dir:{snapshot}", pretrained, weights_file, f"hf-hub:{name}", f"hub:{repo}")
        if not hub_reachable():
            raise GraftError(f"hf-hub:{name}: not in the local Hugging Face cache and the hub is unreachable; "
                             f"pre-download it with `hf download {repo}` where there is a network, or pass "
                             "local-dir:FOLDER")
        return _create(f"hf-hub:{name}", pretrained, weights_file, f"hf-hub:{name}", f"hub:{repo}")
