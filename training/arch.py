"""Untrained reference architectures from torchvision, exported through the same path.

``python -m training export-arch resnet18 --num-classes 10 --input-size 32 --channels 3
--repository model_repository --model-name resnet18`` gives the service's benchmark a
resnet18-sized model (randomly initialised from ``--seed``; no weights are downloaded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from training.errors import ConfigError
from training.model import ImageClassifier, count_parameters
from training.publish import PublishedVersion, publish_untrained

logger = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
# Normalisation of an untrained model: any fixed values do; these put pixels around [-2, 2].
MEAN, STD = 0.5, 0.25


def build_architecture(name: str, num_classes: int, channels: int) -> nn.Module:
    """A randomly initialised torchvision network taking ``channels`` input channels."""
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture '{name}'; choose one of: {', '.join(ARCHITECTURES)}"
        )
    from torchvision import models

    network: nn.Module = getattr(models, name)(weights=None, num_classes=num_classes)
    if channels != 3:
        conv = network.get_submodule("conv1")
        assert isinstance(conv, nn.Conv2d)
        # torchvision's ResNet stem: 7x7, stride 2, padding 3, no bias.
        network.conv1 = nn.Conv2d(
            channels, conv.out_channels, kernel_size=7, stride=2, padding=3, bias=False
        )
    return network


def export_architecture(
    name: str,
    *,
    num_classes: int,
    input_size: int,
    channels: int,
    repository: Path,
    model_name: str,
    seed: int = 0,
) -> PublishedVersion:
    if channels not in (1, 3):
        raise ConfigError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if input_size < 8:
        raise ConfigError(f"--input-size must be at least 8 pixels, got {input_size}")
    torch.manual_seed(seed)
    network = build_architecture(name, num_classes, channels)
    classifier = ImageClassifier(network, [MEAN] * channels, [STD] * channels).eval()
    parameters = count_parameters(classifier)
    logger.info(
        "%s: %d parameters, input %dx%dx%d", name, parameters, channels, input_size, input_size
    )
    return publish_untrained(
        classifier,
        labels=[str(i) for i in range(num_classes)],
        color_mode="L" if channels == 1 else "RGB",
        image_size=input_size,
        model_config={
            "architecture": name,
            "source": "torchvision.models",
            "pretrained": False,
            "num_classes": num_classes,
            "in_channels": channels,
            "image_size": input_size,
            "parameters": parameters,
        },
        repository=repository,
        model_name=model_name,
        seed=seed,
    )
