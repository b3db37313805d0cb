"""The user's own images: ``<data-dir>/<class>/<any/depth/image>``, one subfolder per class.

Classes are the subfolder names in sorted order. Every non-hidden file below a class folder is
an image candidate, in any format Pillow reads; each one is decoded and turned into model input
with :func:`training.preprocessing.prepare_image` (convert, then bilinear resize), the function
the service applies to the images it classifies.

A file that does not decode stops loading with an error naming it, unless ``skip_bad_images``
is set: then it is skipped with a warning, and the count is logged and stored in the metadata.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.errors import DatasetError
from training.preprocessing import COLOR_MODES, GRAYSCALE_MODES, prepare_image

logger = logging.getLogger(__name__)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class ImageFolder:
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    color_mode: str
    skipped_files: list[str]


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) pairs; raises DatasetError on a bad layout."""
    if not root.exists():
        raise DatasetError(
            f"data directory '{root}' does not exist; pass --data-dir pointing at a folder with "
            f"one subfolder of images per class"
        )
    if not root.is_dir():
        raise DatasetError(f"data directory '{root}' is not a directory")
    classes = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DatasetError(
            f"data directory '{root}' is empty: it has no class subfolders; expected "
            f"'{root}/<class>/<image>', e.g. '{root}/cat/1.png' and '{root}/dog/2.jpg'"
        )
    if len(classes) < 2:
        raise DatasetError(
            f"data directory '{root}' has one class folder ('{classes[0]}'); a classifier "
            f"needs at least two"
        )
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = _files_below(root / name)
        if not found:
            raise DatasetError(f"class folder '{root / name}' has no images")
        files += [(path, index) for path in found]
    return classes, files


def _files_below(folder: Path) -> list[Path]:
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [Path(directory) / n for n in sorted(names) if not n.startswith(".")]
    return found


def _decode(path: Path, color_mode: str, image_size: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return prepare_image(image, color_mode, image_size, image_size)


def infer_color_mode(files: list[Path]) -> str:
    """L when every readable file is stored in a grayscale mode, else RGB (headers only)."""
    for path in files:
        try:
            with Image.open(path) as image:
                if image.mode not in GRAYSCALE_MODES:
                    return "RGB"
        except _DECODE_ERRORS:
            continue  # reported when the file is decoded
    return "L"


DEFAULT_SIZES = {"L": 28, "RGB": 32}
"""Input size when none is given: that of the preset for the colour mode (small, deep)."""


def load_image_folder(
    root: Path, image_size: int | None, color_mode: str = "auto", skip_bad_images: bool = False
) -> ImageFolder:
    """Decodes, converts and resizes every image below ``root`` into uint8 ``[N, C, S, S]``."""
    if color_mode != "auto" and color_mode not in COLOR_MODES:
        raise DatasetError(
            f"unknown color mode '{color_mode}'; choose one of: auto, {', '.join(COLOR_MODES)}"
        )
    classes, files = find_images(root)
    if color_mode == "auto":
        color_mode = infer_color_mode([path for path, _ in files])
        logger.info("color mode inferred from the images: %s", color_mode)
    size = image_size or DEFAULT_SIZES[color_mode]
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for path, label in files:
        try:
            arrays.append(_decode(path, color_mode, size))
        except _DECODE_ERRORS as error:
            if not skip_bad_images:
                raise DatasetError(
                    f"cannot decode image '{path}': {error}; remove the file or pass "
                    f"--skip-bad-images"
                ) from error
            logger.warning("skipping '%s': it does not decode (%s)", path, error)
            skipped.append(str(path))
            continue
        labels.append(label)
    if skipped:
        logger.warning("skipped %d of %d files that do not decode", len(skipped), len(files))
    for index, name in enumerate(classes):
        if index not in labels:
            raise DatasetError(f"class folder '{root / name}' has no images that decode")
    logger.info("read %d images in %d classes from '%s'", len(labels), len(classes), root)
    return ImageFolder(
        np.stack(arrays), np.array(labels, dtype=np.int64), classes, color_mode, skipped
    )
