"""Multi-node probe features (issue 14): ``--cut-at layer2,layer3,pre_logits`` concatenates pooled features."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, tiny_config

from graft.errors import GraftError
from graft.models.surgery import cut
from graft.probing.extraction import candidate_cuts


def _net():
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False, num_classes=0).eval()


def test_the_width_is_the_sum_of_the_nodes_widths():
    widths = {node: cut(_net(), node, "avg", (32, 32))[1] for node in ("layer2", "layer3", "pre_logits")}
    assert widths == {"layer2": 48, "layer3": 192, "pre_logits": 96}  # test_resnet's stage widths
    trunk, width = cut(_net(), "layer2,layer3,pre_logits", "avg", (32, 32))
    assert width == 48 + 192 + 96
    assert trunk.node == "layer2,layer3,pre_logits" and trunk.nodes == ["layer2", "layer3", "pre_logits"]
    _, with_max = cut(_net(), "layer2,pre_logits", "avgmax", (32, 32))
    assert with_max == 2 * (48 + 96)  # avgmax doubles every part, the backbone's own pooling included


def test_the_parts_are_each_nodes_features_in_the_order_listed():
    net = _net()
    images = torch.randn(2, 3, 32, 32)
    multi, _ = cut(net, "layer3,layer2", "avg", (32, 32))
    with torch.no_grad():
        joined = multi(images)
        alone = [cut(_net(), node, "avg", (32, 32))[0](images) for node in ("layer3", "layer2")]
    torch.testing.assert_close(joined, torch.cat(alone, dim=1))


@pytest.mark.parametrize("spec, message", [
    ("layer2,layr3", "no node 'layr3' in this backbone (--cut-at); did you mean layer3"),
    ("layer2,layer2", "lists node 'layer2' twice"),
    ("layer2,", "no node ''"),
])
def test_a_bad_node_list_is_one_line_naming_the_node(spec, message):
    with pytest.raises(GraftError) as caught:
        cut(_net(), spec, "avg", (32, 32))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_candidate_cuts_combine_the_stages_below_with_the_pooled_features():
    stages = ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert candidate_cuts(stages) == ["layer3,pre_logits", "layer2,layer3,pre_logits",
                                      "layer1,layer2,layer3,pre_logits"]
    assert candidate_cuts(["blocks.0"]) == []


@pytest.fixture(scope="module")
def multicut_run(shapes, tmp_path_factory):
    from graft.training.fitting import fit

    output = tmp_path_factory.mktemp("multicut") / "run"
    config = tiny_config(shapes, output, **{"train.strategy": "probe", "model.cut_at": "layer2,pre_logits"})
    return fit(config, verbose=False)


def test_the_probe_trains_on_the_concatenation_and_beats_chance(multicut_run):
    card = __import__("json").loads((multicut_run.run_dir / "graft.json").read_text())
    assert card["cut_at"] == "layer2,pre_logits"
    first_linear = next(m for m in multicut_run.model.head.modules() if isinstance(m, torch.nn.Linear))
    assert first_linear.in_features == 48 + 96
    assert multicut_run.metrics["val"]["accuracy"] >= 0.8  # three shape classes: chance is 1/3


def test_the_saved_model_reproduces_the_probes_logits(multicut_run, shapes):
    from graft.models.run_folder import load

    model = multicut_run.model.float().eval()
    loaded = load(multicut_run.run_dir, "cpu").float().eval()
    assert loaded.trunk.node == "layer2,pre_logits"
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_the_feature_cache_is_keyed_by_the_node_list(shapes, tmp_path):
    from graft.data.discovery import discover
    from graft.probing.extraction import extract_features

    splits = discover(str(shapes))
    cache = tmp_path / "cache"
    net = _net()
    preprocessing = timm.data.resolve_data_config(model=net)
    from graft.models.backbones.base import Preprocessing

    pre = Preprocessing((32, 32), tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
    first = extract_features(splits, cut(net, "layer2,pre_logits", "avg", (32, 32))[0], pre, TINY, cache)
    again = extract_features(splits, cut(_net(), "layer2,pre_logits", "avg", (32, 32))[0], pre, TINY, cache)
    other = extract_features(splits, cut(_net(), "layer3,pre_logits", "avg", (32, 32))[0], pre, TINY, cache)
    images = sum(len(getattr(splits, s)) for s in ("train", "val", "test"))
    assert first["layer2,pre_logits"].stats["extracted"] == images
    assert again["layer2,pre_logits"].stats == {**again["layer2,pre_logits"].stats, "extracted": 0, "cached": images}
    assert other["layer3,pre_logits"].stats["extracted"] == images  # another node list: another cache space
    assert first["layer2,pre_logits"].dim == 48 + 96 and other["layer3,pre_logits"].dim == 192 + 96
    np.testing.assert_array_equal(first["layer2,pre_logits"].features["train"],
                                  again["layer2,pre_logits"].features["train"])


def test_onnx_export_of_a_multi_node_cut_agrees(multicut_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from graft.deploy.export import export
    from graft.models.run_folder import load

    export(multicut_run.run_dir, tmp_path / "export", formats=("onnx",))
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = load(multicut_run.run_dir, "cpu").float().eval()(images).numpy()
    (exported,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    np.testing.assert_allclose(exported, eager, atol=1e-4)  # recomputed here, not the exporter's own parity number
