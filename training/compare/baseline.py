"""The dense baseline: flatten -> one or two hidden dense layers -> classes.

A dense layer gives every pixel its own weight to every unit: it has no notion of neighbouring
pixels, nor of a stroke being the same stroke a few pixels to the left. The comparison gives it
at least as many parameters as the CNN, so a difference under shifts comes from the
architecture, not from a smaller budget of weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from training.errors import ConfigError
from training.model import ACTIVATION_MODULES, ImageClassifier

DENSE_LAYERS = (1, 2)
"""How many hidden layers the baseline may have."""


@dataclass(frozen=True)
class DenseConfig:
    """What :class:`DenseNet` is made of; stored in the comparison's checkpoints."""

    in_channels: int = 1
    """Input channels: 1 for grayscale, 3 for RGB."""
    image_size: int = 28
    """Input height and width in pixels (square)."""
    num_classes: int = 10
    """Output units (logits)."""
    hidden_units: tuple[int, ...] = (235, 235)
    """Widths of the hidden dense layers."""
    activation: str = "relu"
    """Nonlinearity after each hidden layer (the CNN's)."""
    dropout: float = 0.3
    """Dropout after each hidden layer (the CNN's head dropout)."""

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": "dense", **asdict(self)}

    @property
    def inputs(self) -> int:
        """Values of the flattened image."""
        return self.in_channels * self.image_size**2

    def describe(self) -> str:
        """``flatten 784 -> 235 -> 235 -> 10``."""
        widths = [self.inputs, *self.hidden_units, self.num_classes]
        return "flatten " + " -> ".join(str(w) for w in widths)


def dense_parameters(inputs: int, hidden_units: Sequence[int], num_classes: int) -> int:
    """Weights and biases of ``inputs -> hidden_units... -> num_classes``."""
    widths = [inputs, *hidden_units, num_classes]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def check_dense_layers(layers: int) -> None:
    if layers not in DENSE_LAYERS:
        raise ConfigError(
            f"--dense-layers {layers}: the dense baseline has 1 or 2 hidden layers; "
            f"choose one of: {', '.join(map(str, DENSE_LAYERS))}"
        )


def size_dense_baseline(
    target_parameters: int, *, inputs: int, num_classes: int, layers: int = 2
) -> tuple[int, ...]:
    """The narrowest ``layers`` equal hidden widths with at least ``target_parameters``."""
    check_dense_layers(layers)
    low, high = 1, 1
    while dense_parameters(inputs, (high,) * layers, num_classes) < target_parameters:
        low, high = high, high * 2
    while low < high:  # the smallest width in [low, high] that reaches the target
        middle = (low + high) // 2
        if dense_parameters(inputs, (middle,) * layers, num_classes) < target_parameters:
            low = middle + 1
        else:
            high = middle
    return (high,) * layers


class DenseNet(nn.Module):
    """Normalised float images [N, C, H, W] -> logits [N, num_classes], no convolutions."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATION_MODULES:
            raise ConfigError(
                f"unknown activation '{config.activation}'; "
                f"choose one of: {', '.join(ACTIVATION_MODULES)}"
            )
        self.config = config
        layers: list[nn.Module] = [nn.Flatten()]
        features = config.inputs
        for units in config.hidden_units:
            layers += [
                nn.Linear(features, units),
                ACTIVATION_MODULES[config.activation](),
                nn.Dropout(config.dropout),
            ]
            features = units
        layers.append(nn.Linear(features, config.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_dense_classifier(
    config: DenseConfig, mean: Sequence[float], std: Sequence[float]
) -> ImageClassifier:
    """The baseline behind the same normalisation as the CNN: raw uint8 pixels -> logits."""
    return ImageClassifier(DenseNet(config), mean, std)
