"""The comparison's figures, drawn with matplotlib's ``Figure`` and the Agg canvas (no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from training.compare.probes import ChannelPatches, ReceptiveField, interior
from training.compare.shift import DIRECTIONS, ShiftAccuracy, shift_in
from training.report_figures import save_figure, show_image

if TYPE_CHECKING:
    from training.compare.run import Contender, EquivarianceDemo

COLORS = {"CNN": "tab:blue", "dense": "tab:orange"}


def plot_side_by_side(contenders: list[tuple[Contender, float]], path: Path) -> None:
    """Bars: parameters, test accuracy (ONNX Runtime), training time; ``(contender, accuracy)``."""
    names = [c.name for c, _ in contenders]
    colors = [COLORS.get(name, "gray") for name in names]
    panels: list[tuple[str, list[float], str]] = [
        ("parameters", [float(c.parameters) for c, _ in contenders], "{:,.0f}"),
        ("test accuracy (ONNX Runtime)", [a for _, a in contenders], "{:.4f}"),
        ("training time (s)", [c.train_seconds for c, _ in contenders], "{:.1f}"),
    ]
    figure = Figure(figsize=(12, 3.6))
    for axis, (title, values, template) in zip(figure.subplots(1, 3), panels, strict=True):
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, [template.format(v) for v in values], fontsize=9)
        axis.set_title(title)
        axis.margins(y=0.15)
        if title.startswith("test accuracy"):
            axis.set_ylim(max(0.0, min(values) - 0.1), 1.0)
    save_figure(figure, path)


def plot_shift_examples(
    image: np.ndarray, fill: np.ndarray, shifts: tuple[int, ...], path: Path
) -> None:
    """One test image moved by each shift in each direction: what the shifted test split holds."""
    figure = Figure(figsize=(1.3 * len(shifts) + 0.8, 1.3 * len(DIRECTIONS) + 0.5))
    axes = figure.subplots(len(DIRECTIONS), len(shifts), squeeze=False)
    for row, direction in enumerate(DIRECTIONS):
        for column, pixels in enumerate(shifts):
            axis = axes[row, column]
            show_image(axis, shift_in(image[np.newaxis], direction, pixels, fill)[0])
            if row == 0:
                axis.set_title(f"{pixels} px", fontsize=9)
            if column == 0:
                axis.set_ylabel(direction, fontsize=9)
    figure.suptitle("a test digit as the shifted test splits hold it (background filled in)")
    save_figure(figure, path)


def plot_shift_accuracy(shifted: dict[str, ShiftAccuracy], path: Path) -> None:
    """Accuracy against shift: mean over the four directions, then each direction."""
    panels = ["mean of the 4 directions", *DIRECTIONS]
    figure = Figure(figsize=(4 * len(panels), 3.8))
    axes = figure.subplots(1, len(panels), sharey=True)
    for axis, panel in zip(axes, panels, strict=True):
        for name, accuracy in shifted.items():
            values = accuracy.mean() if panel not in DIRECTIONS else accuracy.by_direction[panel]
            axis.plot(accuracy.shifts, values, "o-", color=COLORS.get(name), label=name)
        axis.set_title(panel if panel not in DIRECTIONS else f"shifted {panel}")
        axis.set_xlabel("shift (pixels)")
        axis.set_xticks(list(next(iter(shifted.values())).shifts))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (ONNX Runtime)")
    axes[0].legend()
    save_figure(figure, path)


def plot_equivariance(demo: EquivarianceDemo, classes: list[str], path: Path) -> None:
    """Digit, its map, shifted digit, its map, the first map moved, and their difference."""
    (first, p_first), (second, p_second) = demo.predictions
    difference = np.abs(demo.maps[1] - demo.maps[2])
    low, high = float(demo.maps.min()), float(demo.maps.max())
    panels = [
        (demo.image, f"test digit\nprediction {classes[first]} ({p_first:.2f})"),
        (demo.maps[0], f"channel {demo.channel} map"),
        (
            demo.shifted,
            f"{demo.rows} px down, {demo.columns} px right\n"
            f"prediction {classes[second]} ({p_second:.2f})",
        ),
        (demo.maps[1], "map of the shifted digit"),
        (demo.maps[2], "first map, moved"),
        (difference, "|difference|; box: interior"),
    ]
    figure = Figure(figsize=(2.6 * len(panels), 3.2))
    axes = figure.subplots(1, len(panels))
    for number, (axis, (picture, title)) in enumerate(zip(axes, panels, strict=True)):
        if picture.ndim == 3:
            show_image(axis, picture)
        else:
            scale = (0.0, max(high, 1e-12)) if number == len(panels) - 1 else (low, high)
            axis.imshow(picture, cmap="viridis", vmin=scale[0], vmax=scale[1])
            axis.set_xticks([])
            axis.set_yticks([])
        axis.set_title(title, fontsize=9)
    rows, columns = interior(
        difference.shape[0], difference.shape[1], demo.rows, demo.columns, demo.margin
    )
    axes[-1].add_patch(
        Rectangle(
            (columns.start - 0.5, rows.start - 0.5),
            columns.stop - columns.start,
            rows.stop - rows.start,
            fill=False,
            edgecolor="red",
        )
    )
    figure.suptitle(
        f"first-layer channel {demo.channel}: max |difference| inside the box {demo.error:.2g} "
        f"(map values up to {demo.scale:.3g})"
    )
    save_figure(figure, path)


def plot_patches(
    block: int, field: ReceptiveField, channels: list[ChannelPatches], path: Path
) -> None:
    """Rows: channels; columns: the test-image patches exciting the channel most."""
    columns = max(len(c.patches) for c in channels)
    figure = Figure(figsize=(1.3 * columns + 1.0, 1.4 * len(channels) + 0.6))
    axes = figure.subplots(len(channels), columns, squeeze=False)
    for row, found in enumerate(channels):
        for column in range(columns):
            axis = axes[row, column]
            if column >= len(found.patches):
                axis.axis("off")
                continue
            show_image(axis, found.patches[column])
            axis.set_title(f"{found.activations[column]:.2f}", fontsize=8)
        axes[row, 0].set_ylabel(f"channel {found.channel}", fontsize=9)
    figure.suptitle(
        f"block {block}: strongest patches, receptive field {field.size}x{field.size} px"
    )
    save_figure(figure, path)
