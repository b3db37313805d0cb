"""The classic CNN: blocks of small convolutions, pooling that halves the resolution, dense head.

The network is described by a :class:`training.model_config.ModelConfig`, which every checkpoint
and every exported model carries, so the same network can be rebuilt from either.
:class:`ImageClassifier` wraps it with the input normalisation so that the trained module takes
raw pixels (uint8 in the exported graph) exactly as the service sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from training.model_config import ModelConfig

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}
POOLING_MODULES: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class ConvNet(nn.Module):
    """Normalised float images [N, C, H, W] -> logits [N, num_classes]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        activation = ACTIVATION_MODULES[config.activation]
        self.blocks = nn.ModuleList()
        channels = config.in_channels
        for widths in config.blocks:
            layers: list[nn.Module] = []
            for width in widths:
                layers.append(
                    nn.Conv2d(
                        channels,
                        width,
                        config.kernel_size,
                        padding=config.kernel_size // 2,
                        bias=not config.batch_norm,
                    )
                )
                if config.batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(activation())
                channels = width
            layers.append(POOLING_MODULES[config.pooling](2))
            self.blocks.append(nn.Sequential(*layers))
        head: list[nn.Module] = []
        if config.head == "global-avg":
            head.append(nn.AdaptiveAvgPool2d(1))
            features = channels
        else:
            features = channels * config.feature_size() ** 2
        head.append(nn.Flatten())
        for units in config.hidden_units:
            head += [nn.Linear(features, units), activation(), nn.Dropout(config.dropout)]
            features = units
        head.append(nn.Linear(features, config.num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block, for the report."""
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps


class ImageClassifier(nn.Module):
    """Raw pixels [N, C, H, W] in 0..255 (uint8 or float) -> logits.

    The cast, the scaling to [0, 1] and ``(x - mean) / std`` live here, so they are part of the
    exported graph and the service sends undecorated pixels.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalise(images))

    def network_config(self) -> dict[str, Any]:
        """The wrapped network's configuration as a dict (the CNN's or the dense baseline's)."""
        config = getattr(self.network, "config", None)
        return config.to_dict() if config is not None else {}

    @property
    def convnet(self) -> ConvNet:
        """The wrapped network, when it is this package's CNN (checkpoints, report)."""
        if not isinstance(self.network, ConvNet):
            raise TypeError(f"expected a ConvNet inside, got {type(self.network).__name__}")
        return self.network


def build_classifier(
    config: ModelConfig, mean: Sequence[float], std: Sequence[float]
) -> ImageClassifier:
    return ImageClassifier(ConvNet(config), mean, std)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
