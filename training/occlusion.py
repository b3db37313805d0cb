"""Occlusion sensitivity lives in contract/occlusion.py: the server's Explain RPC and the
training report compute it with the same code. Re-exported here for training's callers."""

from contract.occlusion import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FILL,
    DEFAULT_PATCH,
    DEFAULT_STRIDE,
    Occlusion,
    Predict,
    check_fill,
    check_image,
    check_settings,
    count_positions,
    occluded_batch,
    occlusion_map,
    patch_starts,
    pixel_map,
    softmax,
    typical_fill,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_FILL", "DEFAULT_PATCH", "DEFAULT_STRIDE", "Occlusion",
    "Predict", "check_fill", "check_image", "check_settings", "count_positions",
    "occluded_batch", "occlusion_map", "patch_starts", "pixel_map", "softmax", "typical_fill",
]  # fmt: skip
