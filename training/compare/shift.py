"""The test split moved by whole pixels, and the accuracy of a model on it.

A shift by ``k`` pixels to the right moves every pixel ``k`` columns right; the ``k`` columns it
leaves empty on the left take the background value, and what crosses the right edge is lost.
No interpolation: the shifted image holds exactly the original pixels, moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DIRECTIONS: dict[str, tuple[int, int]] = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
}
"""Unit moves (rows, columns) of the image content in each of the four directions."""

SHIFTS = (0, 1, 2, 3, 4)
"""Shifts in pixels the comparison measures."""


def background_value(images: np.ndarray) -> np.ndarray:
    """Per channel, the median of the images' outermost pixels: ``[C]`` (0 for MNIST)."""
    border = np.concatenate(
        [
            images[:, :, 0, :],
            images[:, :, -1, :],
            images[:, :, :, 0],
            images[:, :, :, -1],
        ],
        axis=2,
    )  # [N, C, 2W + 2H]
    return np.median(border.transpose(1, 0, 2).reshape(images.shape[1], -1), axis=1).astype(
        images.dtype
    )


def shift_images(
    images: np.ndarray, rows: int, columns: int, fill: np.ndarray | float = 0
) -> np.ndarray:
    """``images`` ``[N, C, H, W]`` with the content moved ``rows`` down and ``columns`` right
    (negative: up, left); the vacated pixels take ``fill`` (a scalar or one value per channel).
    """
    height, width = images.shape[-2:]
    shifted = np.empty_like(images)
    shifted[...] = np.asarray(fill, dtype=images.dtype).reshape(-1, 1, 1)
    if abs(rows) >= height or abs(columns) >= width:
        return shifted
    target_rows = slice(max(rows, 0), height + min(rows, 0))
    source_rows = slice(max(-rows, 0), height + min(-rows, 0))
    target_columns = slice(max(columns, 0), width + min(columns, 0))
    source_columns = slice(max(-columns, 0), width + min(-columns, 0))
    shifted[..., target_rows, target_columns] = images[..., source_rows, source_columns]
    return shifted


def shift_in(
    images: np.ndarray, direction: str, pixels: int, fill: np.ndarray | float
) -> np.ndarray:
    """``images`` moved ``pixels`` in one of :data:`DIRECTIONS`."""
    rows, columns = DIRECTIONS[direction]
    return shift_images(images, rows * pixels, columns * pixels, fill)


@dataclass(frozen=True)
class ShiftAccuracy:
    """Accuracy on the test split moved by each of ``shifts`` pixels, per direction."""

    shifts: tuple[int, ...]
    by_direction: dict[str, list[float]]
    """Direction -> accuracy at each shift (the same unshifted accuracy at shift 0)."""

    def mean(self) -> list[float]:
        """Accuracy at each shift averaged over the directions."""
        return [float(v) for v in np.mean(list(self.by_direction.values()), axis=0)]

    def drops(self) -> list[float]:
        """Accuracy lost at each shift, against the unshifted accuracy (mean over directions)."""
        mean = self.mean()
        return [mean[0] - value for value in mean]


def accuracy_under_shifts(
    logits_of: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    shifts: Sequence[int] = SHIFTS,
    fill: np.ndarray | float | None = None,
) -> ShiftAccuracy:
    """Runs ``logits_of`` on ``images`` shifted by each of ``shifts`` in each direction.

    ``fill`` defaults to :func:`background_value` of ``images``.
    """
    if fill is None:
        fill = background_value(images)
    by_direction: dict[str, list[float]] = {direction: [] for direction in DIRECTIONS}
    unshifted: float | None = None
    for pixels in shifts:
        for direction in DIRECTIONS:
            if pixels == 0 and unshifted is not None:
                by_direction[direction].append(unshifted)
                continue
            moved = shift_in(images, direction, pixels, fill)
            accuracy = float(np.mean(logits_of(moved).argmax(axis=1) == labels))
            if pixels == 0:
                unshifted = accuracy
            by_direction[direction].append(accuracy)
    return ShiftAccuracy(tuple(shifts), by_direction)


def _change(before: float, after: float) -> str:
    kept = f", {after / before:.0%} of it kept" if before > 0 else ""
    return f"{100 * (before - after):.1f} points ({before:.4f} -> {after:.4f}{kept})"


def _pixels(shifts: Sequence[int]) -> str:
    return ", ".join(f"{k} px" for k in shifts)


def shift_verdict(cnn: ShiftAccuracy, dense: ShiftAccuracy, tolerance: float = 0.0) -> str:
    """What the numbers say about the claim "the CNN degrades less under shifts", in words.

    Degradation at a shift is the accuracy lost against the model's own unshifted accuracy.
    At each shift the CNN degrades less, or more, when the two losses differ by more than
    ``tolerance``; otherwise it is a tie. The report passes one test image's worth (1/N), so
    a single image that flips is not read as evidence either way.
    """
    shifts = [k for k in cnn.shifts if k > 0]
    if not shifts:
        return "No shift other than 0 was measured, so the claim was not tested."
    position = {k: i for i, k in enumerate(cnn.shifts)}
    # Accuracies are multiples of 1/N: a difference of exactly one image must not count as
    # more than one image through float rounding.
    beyond = tolerance + 1e-9
    cnn_drops, dense_drops = cnn.drops(), dense.drops()
    excess = {k: cnn_drops[position[k]] - dense_drops[position[k]] for k in shifts}
    less = [k for k in shifts if excess[k] < -beyond]
    more = [k for k in shifts if excess[k] > beyond]
    ties = [k for k in shifts if k not in less and k not in more]
    largest = position[shifts[-1]]
    cnn_mean, dense_mean = cnn.mean(), dense.mean()
    lines = [
        f"Averaged over the four directions, a shift of {shifts[-1]} px costs the CNN "
        f"{_change(cnn_mean[0], cnn_mean[largest])} and the dense network "
        f"{_change(dense_mean[0], dense_mean[largest])}."
    ]
    tie = (
        f"at {_pixels(ties)} the two losses differ by at most {100 * tolerance:.2g} points, a tie"
        if ties
        else ""
    )
    if not more and not less:
        lines.append(
            f"No shift separates them ({tie}): the numbers neither support nor "
            "contradict the claim."
        )
    elif not more:
        lines.append(
            f"The CNN degrades less than the dense network at {_pixels(less)}"
            + (f"; {tie}" if ties else "")
            + ". No shift contradicts the claim: the numbers support it."
        )
    else:
        lines.append(
            f"The numbers contradict the claim at {_pixels(more)}, where the CNN degrades more "
            f"than the dense network (by {', '.join(f'{100 * excess[k]:.1f}' for k in more)} "
            f"points)"
            + (f"; it holds at {_pixels(less)}" if less else "")
            + (f"; {tie}" if ties else "")
            + "."
        )
    exceptions = []
    for direction in DIRECTIONS:
        c, d = cnn.by_direction[direction], dense.by_direction[direction]
        for k in shifts:
            worse = (c[0] - c[position[k]]) - (d[0] - d[position[k]])
            if worse > beyond:
                exceptions.append(f"{direction} {k} px (by {100 * worse:.1f} points)")
    if exceptions:
        lines.append(
            "Per direction, the CNN degrades more than the dense network at: "
            + ", ".join(exceptions)
            + "."
        )
    else:
        lines.append(
            "Per direction, the CNN never degrades more than the dense network"
            + (f" by more than {100 * tolerance:.2g} points." if tolerance > 0 else ".")
        )
    return " ".join(lines)
