"""Light augmentation on whole batches: a small random affine per image (and optional flips).

One ``affine_grid`` + ``grid_sample`` per batch is far cheaper than per-image transforms on a
2-core machine. The random parameters are drawn on the CPU from a seeded ``torch.Generator``, so
a run is reproducible and does not depend on the device's random number generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.errors import ConfigError

AUGMENTATIONS = ("none", "affine", "affine-hflip")


@dataclass(frozen=True)
class AffineAugment:
    """Random rotation, scaling and translation of each image of a batch (zero padding)."""

    max_rotation_deg: float = 10.0
    """Rotation drawn uniformly from [-max, max] degrees."""
    max_scale_change: float = 0.1
    """Scale drawn uniformly from [1 - change, 1 + change]."""
    max_translation: float = 0.1
    """Shift drawn uniformly from [-max, max] of the image size, per axis."""
    horizontal_flip: bool = False
    """Mirror half of the images left-right (photos yes, digits no)."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images`` float ``[N, C, H, W]`` -> the same shape, each image moved a little."""
        n = images.shape[0]
        uniform = torch.rand(n, 5, generator=generator) * 2 - 1  # in [-1, 1)
        angle = uniform[:, 0] * math.radians(self.max_rotation_deg)
        scale = 1 + uniform[:, 1] * self.max_scale_change
        # affine_grid works in [-1, 1] coordinates: a shift of f image sizes is 2 f.
        shift = uniform[:, 2:4] * 2 * self.max_translation
        flip = torch.ones(n)
        if self.horizontal_flip:
            flip = torch.where(uniform[:, 4] < 0, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
                torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        ).to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", align_corners=False)


def make_augment(name: str) -> AffineAugment | None:
    if name == "none":
        return None
    if name == "affine":
        return AffineAugment()
    if name == "affine-hflip":
        return AffineAugment(horizontal_flip=True)
    raise ConfigError(f"unknown augmentation '{name}'; choose one of: {', '.join(AUGMENTATIONS)}")
