import copy

import pytest
import torch
from torch import nn

from graft.errors import GraftError
from graft.models.backbones.registry import create_backbone
from graft.models.grafted import GraftModel
from graft.models.heads import create_head
from graft.models.inspection import list_nodes, receptive_fields
from graft.models.surgery import (
    DEFAULT_NODE,
    Capture,
    StopForward,
    cut,
    freeze_trunk,
    keep_frozen_norms_eval,
    stage_groups,
    unfreeze_last,
)


def _net(name="test_resnet"):
    torch.manual_seed(0)
    return create_backbone(name, pretrained=False).net


def test_cut_at_an_inner_node_gives_its_documented_width():
    trunk, width = cut(_net(), "layer3", "avg", (64, 64))
    assert width == 192  # test_resnet's layer3 has 192 channels (layer4 only 96)
    assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 192)
    assert isinstance(trunk.net.layer4, nn.Identity), "modules after the cut are pruned"


def test_avgmax_pooling_concatenates():
    _, width = cut(_net(), "layer2", "avgmax", (64, 64))
    assert width == 2 * 48


def test_default_node_uses_the_backbones_own_head():
    trunk, width = cut(_net(), None, "avg", (64, 64))
    assert trunk.node == DEFAULT_NODE and width == 96
    _, doubled = cut(_net(), None, "avgmax", (64, 64))
    assert doubled == 192


@pytest.mark.parametrize("name, node", [("test_vit", "blocks.2"), ("test_convnext", "stages.1"),
                                        ("test_efficientnet", "blocks.3.0"), ("tv:resnet18", "model.layer2")])
def test_cut_works_on_every_family(name, node):
    trunk, width = cut(create_backbone(name, pretrained=False).net, node, "avg", (64, 64))
    assert trunk.eval()(torch.randn(1, 3, 64, 64)).shape == (1, width)


def test_cut_features_equal_the_hooked_activation():
    net = _net().eval()
    captured = {}
    net.layer2.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    x = torch.randn(2, 3, 64, 64)
    net.forward_features(x)
    trunk, _ = cut(_net().eval(), "layer2", "avg", (64, 64))
    assert torch.allclose(trunk.eval()(x), captured["out"].mean(dim=(2, 3)), atol=1e-6)


def test_capture_records_several_nodes_in_one_pass_and_stops_after_the_last():
    net = _net().eval()
    reached = []
    net.layer4.register_forward_pre_hook(lambda module, inputs: reached.append("layer4"))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with Capture(net, ["layer3", "layer2"]) as capture:
            result, outputs = capture.run(net.forward_features, images)
    assert result is None, "the pass was stopped"
    assert reached == [], "nothing after the last captured node ran"
    assert set(outputs) == {"layer2", "layer3"}
    assert outputs["layer2"].shape[1] == 48 and outputs["layer3"].shape[1] == 192
    assert not net._forward_hooks and not net.layer2._forward_hooks, "leaving the with block removes the hooks"


def test_capture_without_stop_lets_the_pass_finish():
    net = _net().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), Capture(net, ["layer2"], stop=False) as capture:
        result, outputs = capture.run(net.forward_features, images)
        assert torch.equal(result, net.forward_features(images))
    assert outputs["layer2"].shape[1] == 48


def test_a_nested_capture_lets_the_outer_stop_pass_to_its_owner():
    net = _net().eval()
    inner = Capture(net, ["layer4"], prepend=False)
    outer = Capture(net, ["layer2"])
    with torch.no_grad():
        result, outputs = outer.run(lambda x: inner.run(net.forward_features, x), torch.randn(1, 3, 64, 64))
    assert result is None and set(outputs) == {"layer2"}, "the inner capture re-raised the outer one's stop"
    with pytest.raises(StopForward), torch.no_grad():  # the inner capture's run does not swallow it either
        inner.run(lambda x: outer._record("layer2", None, None, x), torch.zeros(1))


def test_a_deep_copied_torchvision_cut_records_into_its_own_capture():
    trunk, width = cut(copy.deepcopy(create_backbone("tv:resnet18", pretrained=False).net), "model.layer2", "avg",
                       (64, 64))
    twin = copy.deepcopy(trunk).eval()
    assert twin(torch.randn(1, 3, 64, 64)).shape == (1, width)
    assert twin.net._capture is not trunk.net._capture


def test_unknown_node_says_how_to_list_them():
    with pytest.raises(GraftError, match="graft layers"):
        cut(_net(), "layer9")


class ThreeConvs(nn.Module):
    """The lecture's example: three 3x3 stride-1 convs (receptive field 7x7), plus a strided pair."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(3))
        self.pool = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1)

    def forward_features(self, x):
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.conv4(self.pool(x))

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


def test_receptive_fields_match_the_lectures_arithmetic():
    fields = receptive_fields(ThreeConvs(), ["conv1", "conv2", "conv3", "pool", "conv4"], (32, 32))
    # 3, 5, 7 for stacked 3x3s; a 2x2 stride-2 pool adds 1 → 8; a 3x3 after it adds 2 x 2 = 4 → 12
    assert fields == {"conv1": "3", "conv2": "5", "conv3": "7", "pool": "8", "conv4": "12"}


def test_list_nodes_shapes_and_stage_flags():
    backbone = create_backbone("test_resnet", pretrained=False)
    nodes = {n.name: n for n in list_nodes(backbone.net, (64, 64), stage_nodes=backbone.stage_nodes)}
    assert nodes["layer3"].shape == (192, 4, 4) and nodes["layer3"].stage
    assert nodes["act1"].receptive_field == "11"  # the deep stem: 3x3 stride 2, then two 3x3 → 3 + 4 + 4
    everything = list_nodes(backbone.net, (64, 64), stages_only=False, stage_nodes=backbone.stage_nodes)
    assert len(everything) > len(nodes) and any(n.name == "layer1.0.conv1" for n in everything)


def test_stage_groups_run_from_stem_to_top():
    groups = stage_groups(_net())
    assert groups[0][0].startswith("conv1") and groups[-1][0].startswith("layer4")
    assert len(groups) == 5


def test_unfreeze_last_k_stages():
    trunk, _ = cut(_net(), None, "avg", (32, 32))
    freeze_trunk(trunk)
    unfreeze_last(trunk, 2)
    trainable = {n.split(".")[1] for n, p in trunk.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_frozen_batch_norm_stays_in_eval_mode_after_train():
    trunk, width = cut(_net(), None, "avg", (32, 32))
    model = GraftModel(trunk, create_head(width, 3), ["a", "b", "c"], None)
    freeze_trunk(model.trunk)
    unfreeze_last(model.trunk, 1)
    model.train()
    norms = {n: m for n, m in model.trunk.net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(not m.training for n, m in norms.items() if not n.startswith("layer4"))
    assert all(m.training for n, m in norms.items() if n.startswith("layer4"))
    model.freeze_bn_stats = True
    model.train()
    assert not any(m.training for m in norms.values())
    assert model.head.training


def test_keep_frozen_norms_eval_counts():
    net = _net()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    net.train()
    assert keep_frozen_norms_eval(net) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
