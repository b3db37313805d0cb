"""``python -m training quantize``: an INT8 copy of a published model, with its accuracy proven.

- ``python -m training quantize --repository model_repository --model mnist_cnn``
  (the latest version of ``mnist_cnn`` -> the next version of the sibling ``mnist_cnn_int8``)
- ``python -m training quantize --repository model_repository --model resnet18 --calibration
  random`` (an untrained model has no training images: calibrate on random pixels)

ONNX Runtime static quantization, QDQ format, calibrated on the model's own training split; the
test accuracy of FP32 and INT8 measured through ONNX Runtime and written side by side into
``report/quantization.md`` and the ``convserve.quantization`` metadata (docs/quantization.md).
This module is the command line and its settings only (cheap to import, for ``--help``); the
work is in :mod:`training.quantize_run`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALIBRATION_SOURCES = ("train", "random")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
SIBLING_SUFFIX = "_int8"


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize, how, and where the INT8 version goes."""

    repository: Path
    """The model repository holding the source model; the INT8 model is published into it too."""
    model: str
    """The source (FP32) model's name in the repository."""
    version: int | None = None
    """The source version to quantize; None: its latest."""
    to_model: str | None = None
    """The model the INT8 version is published under; None: ``<model>_int8``, a sibling."""
    calibration: str = "train"
    """Calibration images: ``train`` (the model's training split) or ``random`` (uint8 noise,
    for untrained models only: their accuracy means nothing)."""
    calibration_images: int = 512
    """How many images calibrate the activation ranges (a seeded sample of the training split)."""
    calibration_method: str = "minmax"
    """How a tensor's range is chosen from its calibration values: minmax, entropy, percentile."""
    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""
    reduce_range: bool = False
    """7-bit weights: for CPUs without VNNI, whose 8-bit kernels can saturate."""
    max_accuracy_drop: float = 0.5
    """Refuse to publish when INT8 loses more test accuracy than this, in percentage points."""
    seed: int = 0
    """Seed of the calibration sample (and of the random pixels)."""
    data_dir: str | None = None
    """Where the data set is, when not where the model was trained from."""
    download: bool = False
    """Let torchvision download a public data set that is not in the data directory."""

    @property
    def target_model(self) -> str:
        return self.to_model or f"{self.model}{SIBLING_SUFFIX}"

    def command(self) -> str:
        """The command line that makes the same version again (for the report)."""
        parts = ["python -m training quantize", f"--repository {self.repository}"]
        parts.append(f"--model {self.model}")
        defaults = QuantizeConfig(self.repository, self.model)
        for flag, value, default in (
            ("--version", self.version, None),
            ("--to-model", self.to_model, None),
            ("--calibration", self.calibration, defaults.calibration),
            ("--calibration-images", self.calibration_images, defaults.calibration_images),
            ("--calibration-method", self.calibration_method, defaults.calibration_method),
            ("--max-accuracy-drop", self.max_accuracy_drop, defaults.max_accuracy_drop),
            ("--seed", self.seed, defaults.seed),
            ("--data-dir", self.data_dir, None),
        ):
            if value != default:
                parts.append(f"{flag} {value}")
        parts += ["--per-tensor"] * (not self.per_channel) + ["--reduce-range"] * self.reduce_range
        return " ".join(parts)


def add_parser(subparsers: Any, common: argparse.ArgumentParser | None = None) -> None:
    """Adds the ``quantize`` subcommand to ``python -m training``'s subparsers."""
    parser = subparsers.add_parser(
        "quantize",
        parents=[common] if common is not None else [],
        help="publish an INT8 copy of a model (static QDQ quantization), accuracy measured",
        description="Quantize a published model version to INT8 with ONNX Runtime static "
        "quantization (QDQ), calibrated on its training split; measure FP32 and INT8 test "
        "accuracy through ONNX Runtime; publish it as the next version of a sibling model "
        "(default <model>_int8). See docs/quantization.md.",
    )
    d = QuantizeConfig(Path("model_repository"), "")
    source = parser.add_argument_group("source")
    source.add_argument(
        "--repository", type=Path, default=d.repository, help="default: %(default)s"
    )
    source.add_argument("--model", required=True, help="the FP32 model's name, e.g. mnist_cnn")
    source.add_argument("--version", type=int, default=None, help="default: the latest")
    source.add_argument(
        "--to-model",
        default=None,
        help="publish under this model name (default: <model>_int8; the model's own name makes "
        "INT8 its next, latest version)",
    )
    calib = parser.add_argument_group("calibration")
    calib.add_argument(
        "--calibration",
        choices=CALIBRATION_SOURCES,
        default=d.calibration,
        help="train: a sample of the model's training split (never its test split); random: "
        "uint8 noise, for an untrained model (default: %(default)s)",
    )
    calib.add_argument(
        "--calibration-images", type=int, default=d.calibration_images, help="default: %(default)s"
    )
    calib.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=d.calibration_method,
        help="how each activation's range is chosen (default: %(default)s)",
    )
    calib.add_argument(
        "--seed", type=int, default=d.seed, help="of the calibration sample (default: %(default)s)"
    )
    calib.add_argument("--data-dir", default=None, help="default: the one the model was trained on")
    calib.add_argument("--download", action="store_true", help="fetch a public data set")
    quant = parser.add_argument_group("quantization")
    quant.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="one scale per weight tensor instead of one per output channel",
    )
    quant.add_argument(
        "--reduce-range", action="store_true", help="7-bit weights, for CPUs without VNNI"
    )
    quant.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=d.max_accuracy_drop,
        help="publish nothing when INT8 loses more test accuracy than this, in percentage points "
        "(default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    return QuantizeConfig(
        repository=Path(args.repository),
        model=args.model,
        version=args.version,
        to_model=args.to_model,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
        calibration_method=args.calibration_method,
        per_channel=args.per_channel,
        reduce_range=args.reduce_range,
        max_accuracy_drop=args.max_accuracy_drop,
        seed=args.seed,
        data_dir=args.data_dir,
        download=args.download,
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m training quantize``; raises TrainingError for a problem the user fixes."""
    from training.quantize_run import quantize_version

    started = time.monotonic()
    result = quantize_version(config_from_args(args))
    print(f"wrote version {result.version} of {result.model}: {result.path}")
    print(f"source: {result.source_model} version {result.source_version}")
    for line in result.accuracy_lines():
        print(line)
    print(f"report: {result.report}")
    print(f"wall time: {time.monotonic() - started:.1f} s")
    return 0
