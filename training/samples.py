"""Held-out test images written as PNG files: something real to send to the server.

``python -m training samples --out samples --count 10`` writes the first images of the test
split (never trained on), one class after the other, as ``<i>-label-<label>.png``, in the
model's colour mode and size.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import Split


def write_samples(split: Split, classes: list[str], out: Path, count: int) -> list[Path]:
    """Writes ``count`` images of ``split``, classes taken in turn, as PNGs; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    # Rank of each image within its class; sorting by (rank, class) interleaves the classes.
    rank = np.zeros(len(split), dtype=np.int64)
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        rank[members] = np.arange(len(members))
    order = np.lexsort((split.labels, rank))[:count]
    paths = []
    for position, index in enumerate(order):
        pixels = split.images[index]  # [C, H, W] uint8
        image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", classes[int(split.labels[index])])
        path = out / f"{position:04d}-label-{label}.png"
        image.save(path)
        paths.append(path)
    return paths
