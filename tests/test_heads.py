import math

import pytest
import torch
from torch import nn

from graft.models.heads import create_head


def test_linear_head_is_xavier_with_zero_bias():
    torch.manual_seed(0)
    head = create_head(400, 10)
    (linear,) = head
    bound = math.sqrt(6 / (400 + 10))
    assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(linear.bias) == 0


def test_mlp_head_layers_and_kaiming_init():
    torch.manual_seed(0)
    head = create_head(256, 5, "mlp:512,128", dropout=0.3)
    kinds = [type(layer) for layer in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].bias is None  # BN follows: the bias would be cancelled
    assert head[0].weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert head(torch.randn(4, 256)).shape == (4, 5)
