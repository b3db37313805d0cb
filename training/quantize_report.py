"""``<version>/report/quantization.md`` of an INT8 version: FP32 and INT8 side by side.

One small Markdown page, no figures: test accuracy of both through ONNX Runtime on the same
images, how often they agree, per-class accuracy, file sizes, how the version was made and the
command that makes it again. A version's ``report/index.md`` (training.report) links it when
present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_FILE = "quantization.md"


def _accuracy(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def _size(count: int) -> str:
    return f"{count / 1024:,.0f} KiB" if count < 1024 * 1024 else f"{count / 1024**2:,.1f} MiB"


def quantization_markdown(
    *,
    record: dict[str, Any],
    classes: list[str],
    per_class: dict[str, list[float]],
    target_model: str,
    fp32_bytes: int,
    int8_bytes: int,
    command: str,
) -> str:
    """The page's text (``record`` is the ``convserve.quantization`` metadata)."""
    source = record["source"]
    calibration = record["calibration"]
    fp32, int8 = record["fp32_test_accuracy"], record["int8_test_accuracy"]
    lines = [
        f"# INT8 of {source['model']} version {source['version']}",
        "",
        f"`{target_model}`: ONNX Runtime static quantization ({record['format']}) of "
        f"`{source['model']}` version {source['version']} (sha256 `{source['sha256'][:12]}...`).",
        "",
        f"| ONNX Runtime, {record['evaluated_on']}, {record['evaluation_images']:,} images "
        "| FP32 (source) | INT8 (this version) |",
        "|---|---:|---:|",
        f"| test accuracy | {_accuracy(fp32)} | {_accuracy(int8)} |",
        f"| top-1 agreement with FP32 | 1.0000 | {record['top1_agreement']:.4f} |",
        f"| model.onnx | {_size(fp32_bytes)} | {_size(int8_bytes)} |",
        "",
    ]
    if fp32 is not None and int8 is not None:
        lines += [f"INT8 - FP32: **{100 * (int8 - fp32):+.2f} points** of test accuracy.", ""]
    else:
        lines += [
            "The model was calibrated on random pixels (it has no training data), so its "
            "accuracy means nothing; the agreement shows how closely INT8 follows FP32.",
            "",
        ]
    if per_class:
        lines += ["## Per class", "", "| class | FP32 | INT8 |", "|---|---:|---:|"]
        for name, before, after in zip(classes, per_class["fp32"], per_class["int8"], strict=True):
            lines.append(f"| {name} | {before:.4f} | {after:.4f} |")
        lines.append("")
    lines += [
        "## How it was made",
        "",
        f"- {record['tool']}, {record['method']} quantization, {record['format']} format: "
        f"activations {record['activations']}, weights {record['weights']}"
        f"{' (7-bit: --reduce-range)' if record['reduce_range'] else ''}.",
        f"- Calibration: {calibration['images']} images, {calibration['from']}, seed "
        f"{calibration['seed']}, {calibration['method']} ranges"
        + (
            ". Never the test split."
            if calibration["source"] == "train"
            else " (the model has no training data)."
        ),
        f"- Quantized ops: {', '.join(record['quantized_ops']) or 'none'}; kept FP32: the "
        f"input cast and normalisation ({', '.join(record['fp32_nodes']) or 'none'}).",
        "- What ONNX Runtime runs after its fusions (this CPU): "
        + ", ".join(f"{op} x{count}" for op, count in record["runtime_graph"].items())
        + ".",
        f"- CPU 8-bit extensions where it was measured: "
        f"{', '.join(record['cpu_int8_features']) or 'none'}.",
        "",
        "Made with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "Speed (in-process images/s, INT8 against FP32, interleaved): "
        "`python -m training.quantize_bench <this version's directory>`; see "
        "docs/quantization.md.",
        "",
    ]
    return "\n".join(lines)


def write_quantization_report(directory: Path, **fields: Any) -> Path:
    """Writes ``quantization.md`` into ``directory`` (made if missing); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_FILE
    path.write_text(quantization_markdown(**fields))
    return path
