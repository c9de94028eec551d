"""The new layers grafted onto a cut trunk: a linear classifier, or a small MLP with batch norm and dropout."""

from __future__ import annotations

from torch import nn

from graft.config import parse_head


def build_head(in_features: int, num_classes: int, spec: str = "linear", dropout: float = 0.0) -> nn.Sequential:
    """A fresh head: ``linear`` or ``mlp:W1[,W2...]`` (Linear → BatchNorm1d → ReLU per hidden layer).

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
    classifier = nn.Linear(width, num_classes)
    nn.init.xavier_uniform_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    layers.append(classifier)
    return nn.Sequential(*layers)
