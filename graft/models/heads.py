"""The new layers grafted onto a cut trunk: a linear classifier, or a small MLP with batch norm and dropout."""

from __future__ import annotations

import torch
from torch import nn

from graft.config import parse_head
from graft.errors import GraftError

__all__ = ["BinaryLogit", "create_head", "divide_logits"]


class BinaryLogit(nn.Module):
    """One logit z for two classes, as the lecture's cats-vs-dogs net (sigmoid output): returned as the logits
    [0, z], whose softmax is exactly [1 - sigmoid(z), sigmoid(z)] and whose cross-entropy is the binary one, so the
    rest of graft (losses, metrics, export) needs no special case."""

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.linear(x)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def create_head(in_features: int, num_classes: int, spec: str = "linear", dropout: float = 0.0) -> nn.Sequential:
    """A fresh head: ``linear``, ``sigmoid`` (two classes, one logit) or ``mlp:W1[,W2...]`` (Linear → BatchNorm1d →
    ReLU per hidden layer).

    Initialisation follows the lecture: Kaiming-normal for layers followed by a ReLU, Xavier-uniform for the final
    linear layer (no non-linearity after it); biases start at zero.
    """
    layers: list[nn.Module] = []
    width = in_features
    for hidden in parse_head(spec):
        linear = nn.Linear(width, hidden, bias=False)  # the BN right after makes a bias redundant
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    if spec == "sigmoid" and num_classes != 2:
        raise GraftError(f"head 'sigmoid' is for two classes (one logit), this data has {num_classes}: use linear")
    classifier = BinaryLogit(width) if spec == "sigmoid" else nn.Linear(width, num_classes)
    linear = classifier.linear if spec == "sigmoid" else classifier
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    layers.append(classifier)
    return nn.Sequential(*layers)


def divide_logits(head: nn.Sequential, temperature: float) -> None:
    """Temperature scaling folded into the head: its final linear layer's weight and bias divided by
    ``temperature``, so every logit is (the predicted class never changes; softmax probabilities soften or sharpen)."""
    final = head[-1]
    linear = final.linear if isinstance(final, BinaryLogit) else final
    if not isinstance(linear, nn.Linear):
        raise GraftError(f"the head ends in {type(final).__name__}, not a linear layer: no temperature to fold in")
    with torch.no_grad():
        linear.weight.div_(temperature)
        linear.bias.div_(temperature)
