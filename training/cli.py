"""The command line: ``python -m training {train,compare,evaluate,export-arch,samples} --help``.

- ``python -m training train --repository model_repository --model-name mnist_cnn``
- ``python -m training compare --out runs/compare`` (dense baseline vs CNN: training.compare)
- ``python -m training evaluate --model model_repository/mnist_cnn/1``
- ``python -m training export-arch resnet18 --num-classes 10 --input-size 32 --channels 3
  --repository model_repository --model-name resnet18``
- ``python -m training samples --out samples --count 10``

The flags of the settings are generated from the configuration dataclasses
(:class:`TrainConfig`, :class:`DataConfig`, :class:`ModelConfig`) by :mod:`training.flags`: a
new field is a new flag. Only what is no setting (``--if-missing``, ``evaluate --model``, the
comparison's own options, ``export-arch``, ``samples``) is written out here.

Heavy modules (torch, onnx) are imported inside the commands, so ``--help`` and
``train --if-missing`` on an existing model answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training import flags, quantize
from training.config import TrainConfig
from training.data import DATASETS, PUBLIC_DATASETS, DataConfig
from training.errors import ConfigError, TrainingError
from training.model_config import PRESETS, ModelConfig, preset_help

logger = logging.getLogger(__name__)

FROM_THE_DATA = ("in_channels", "image_size", "num_classes")
"""ModelConfig fields the data set decides; every other one overrides the preset's."""
OUTPUT_FIELDS = ("repository", "model_name", "checkpoint_dir", "resume", "report", "progress")
"""TrainConfig fields of the 'output' group; the rest (but the preset) are 'optimisation'."""
NOT_COMPARED = ("repository", "checkpoint_dir", "resume", "report")
"""TrainConfig fields compare does not take: it has its own --repository and no checkpoints."""


def _names(cls: type) -> list[str]:
    return [item.name for item in dataclasses.fields(cls)]


def model_override_names() -> list[str]:
    return [name for name in _names(ModelConfig) if name not in FROM_THE_DATA]


def _extra_help() -> dict[str, str]:
    """What the fields' docstrings cannot hold: lists known at run time."""
    return {
        "dataset": f"One of: {', '.join(DATASETS)}.",
        "preset": preset_help(),
        **{
            name: "Presets: "
            + ", ".join(f"{n} {getattr(p, name):g}" for n, p in PRESETS.items())
            + "."
            for name in ("epochs", "batch_size", "lr")
        },
    }


def add_data_flags(
    parser: argparse.ArgumentParser, not_given: str | None = None, keep: Sequence[str] = ()
) -> None:
    """Every DataConfig field. ``not_given``: the value comes from elsewhere (said in the help)
    unless the flag is given, for every field but those in ``keep``, which keep their default."""
    group = parser.add_argument_group("data")
    names = _names(DataConfig)
    if not_given is None:
        flags.add_fields(group, DataConfig, extra_help=_extra_help())
        return
    for chosen, source in (([n for n in names if n not in keep], not_given), (keep, None)):
        flags.add_fields(
            group, DataConfig, names=chosen, not_given=source, extra_help=_extra_help()
        )


def add_training_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """The preset and its overrides, then every other TrainConfig field but those in ``skip``;
    a skipped field keeps its dataclass default."""
    model = parser.add_argument_group("model")
    flags.add_fields(model, TrainConfig, names=["preset"], extra_help=_extra_help())
    flags.add_fields(model, ModelConfig, names=model_override_names(), not_given="the preset's")
    flat = [
        item.name
        for item in dataclasses.fields(TrainConfig)
        if item.name not in ("data", "model_overrides", "preset", *skip)
    ]
    optimisation = parser.add_argument_group("optimisation")
    flags.add_fields(
        optimisation,
        TrainConfig,
        names=[name for name in flat if name not in OUTPUT_FIELDS],
        extra_help=_extra_help(),
    )
    output = parser.add_argument_group("output")
    flags.add_fields(output, TrainConfig, names=[name for name in flat if name in OUTPUT_FIELDS])
    parser.set_defaults(
        **{item.name: item.default for item in dataclasses.fields(TrainConfig) if item.name in skip}
    )


def _add_train_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=[common],
        help="train a CNN and export it as the next version",
        description="Train a CNN, export it to ONNX and write it into the model repository as "
        "the next version, with a report (Markdown and one self-contained HTML page).",
        formatter_class=flags.HelpFormatter,
    )
    add_data_flags(parser)
    add_training_flags(parser)
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing (exit 0) when the repository already has a version",
    )


def _add_compare_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "compare",
        parents=[common],
        help="train a dense baseline beside the CNN and report what the convolutions buy",
        description="Train the CNN and a dense baseline with at least as many parameters on the "
        "same split, seed and budget; export both; compare accuracy (ONNX Runtime), training "
        "time and accuracy under shifts; show weight sharing, the hierarchy and the mistakes.",
        formatter_class=flags.HelpFormatter,
    )
    add_data_flags(parser)
    add_training_flags(parser, skip=NOT_COMPARED)
    group = parser.add_argument_group("comparison")
    group.add_argument(
        "--dense-layers", type=int, default=2, help="hidden layers of the dense baseline: 1 or 2"
    )
    group.add_argument(
        "--out",
        type=Path,
        default=Path("runs/compare"),
        help="where index.md, index.html and the figures go (without --repository)",
    )
    group.add_argument(
        "--repository",
        dest="publish_to",
        metavar="REPOSITORY",
        default=None,
        help="also publish the CNN as the next version of <repository>/<model-name>, with "
        "compare/ beside its report/",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a CNN classifier, export it to ONNX, write it into a model repository.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(subparsers, common)
    _add_compare_parser(subparsers, common)

    evaluate = subparsers.add_parser(
        "evaluate",
        parents=[common],
        help="accuracy of an exported model (ONNX Runtime) on the test split",
        description="Run an exported model through ONNX Runtime on the test split of the data "
        "set it was trained on (from its metadata, unless overridden).",
        formatter_class=flags.HelpFormatter,
    )
    evaluate.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model.onnx, a version dir, or a model dir (latest version)",
    )
    add_data_flags(evaluate, not_given="the model's training metadata", keep=["download"])

    arch = subparsers.add_parser(
        "export-arch",
        parents=[common],
        help="export an untrained torchvision architecture (e.g. resnet18) into the repository",
        formatter_class=flags.HelpFormatter,
    )
    arch.add_argument("architecture", help="resnet18, resnet34 or resnet50")
    arch.add_argument("--num-classes", type=int, default=10)
    arch.add_argument("--input-size", type=int, default=32)
    arch.add_argument("--channels", type=int, default=3, help="1 (grayscale) or 3 (RGB)")
    arch.add_argument("--repository", default="model_repository")
    arch.add_argument("--model-name", default=None, help="default: the architecture's name")
    arch.add_argument("--seed", type=int, default=0)

    samples = subparsers.add_parser(
        "samples",
        parents=[common],
        help="write held-out test images as PNG files (to try the server with)",
        formatter_class=flags.HelpFormatter,
    )
    samples.add_argument("--out", type=Path, default=Path("samples"))
    samples.add_argument("--count", type=int, default=10)
    add_data_flags(samples)
    quantize.add_parser(subparsers, common)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe; the image size of ImageFolder follows the preset."""
    data: DataConfig = flags.values(args, DataConfig)
    if data.image_size is None and args.preset in PRESETS:
        data = dataclasses.replace(data, image_size=PRESETS[args.preset].config.image_size)
    overrides = flags.given(args, model_override_names())
    config: TrainConfig = flags.values(args, TrainConfig, data=data, model_overrides=overrides)
    return config


def _run_train(args: argparse.Namespace, started: float) -> int:
    from training.repository import check_model_name, latest_version

    check_model_name(args.model_name)
    if args.if_missing:
        latest = latest_version(Path(args.repository) / args.model_name)
        if latest is not None:
            print(
                f"{args.repository}/{args.model_name} already has version {latest}; "
                f"nothing to do (--if-missing)"
            )
            return 0
    from training.checkpoint import LAST, run_directory
    from training.train import main as train_main

    config = train_config(args)
    run_dir = run_directory(Path(config.checkpoint_dir), config.model_name)
    try:
        published = train_main(config, run_dir)
    except KeyboardInterrupt:
        if (run_dir / LAST).is_file():
            print(f"interrupted; continue with --resume {run_dir / LAST}", file=sys.stderr)
        else:
            print("interrupted before the first epoch ended; nothing to resume", file=sys.stderr)
        return 130
    print(f"wrote version {published.version}: {published.path}")
    if published.evaluation is not None:
        print(f"test accuracy (ONNX Runtime): {published.evaluation.accuracy:.4f}")
    if config.report:
        print(f"report: {published.path / 'report' / 'index.html'}")
    print(f"wall time: {time.monotonic() - started:.1f} s")
    return 0


SPLIT_KEYS = ("split_seed", "max_samples", "val_fraction", "test_fraction")
"""The data options that decide which images end up in the test split of mnist5k/imagefolder."""


def check_held_out_split(stored: dict[str, Any], values: dict[str, Any]) -> None:
    """Refuses to evaluate on a test split other than the one the model was trained beside.

    mnist5k and imagefolder draw train/val/test from one pool with the split seed (and, after
    --max-samples, from a seeded subsample): another seed or cap gives a "test split" that holds
    training images, and an inflated accuracy. The public data sets test on their official test
    set, which no split option moves into training, so there any override is allowed.
    """
    dataset = values.get("dataset")
    if not stored or dataset in PUBLIC_DATASETS or dataset != stored.get("dataset"):
        return
    defaults = DataConfig()
    changed = [
        key
        for key in SPLIT_KEYS
        if values.get(key, getattr(defaults, key)) != stored.get(key, getattr(defaults, key))
    ]
    if changed:
        trained = f"split seed {stored.get('split_seed', defaults.split_seed)}"
        if stored.get("max_samples") is not None:
            trained += f" and --max-samples {stored['max_samples']}"
        options = ", ".join("--" + key.replace("_", "-") for key in changed)
        raise ConfigError(
            f"the model was trained on {dataset} with {trained}; evaluating on another split "
            f"({options}) would include training images and overstate the accuracy; "
            f"drop {options} to evaluate on the model's own test split"
        )


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.data import load_data
    from training.onnx_eval import evaluate_onnx, read_metadata, training_arguments
    from training.repository import resolve_model_path

    path = resolve_model_path(args.model)
    metadata = read_metadata(path)
    stored = training_arguments(metadata).get("data", {})
    if not stored and args.dataset is None:
        raise ConfigError(f"'{path}' has no training metadata; pass --dataset (and --data-dir)")
    # What is given overrides the metadata; a download only when asked for here.
    data = {**stored, **flags.given(args, _names(DataConfig)), "download": args.download}
    check_held_out_split(stored, data)
    dataset = load_data(DataConfig(**data))
    evaluation = evaluate_onnx(path, dataset.test.images, dataset.test.labels, len(dataset.classes))
    print(f"model: {path}")
    print(f"data: {dataset.summary()} (test split)")
    if json.loads(metadata.get("convserve.labels") or "[]") not in ([], dataset.classes):
        print("note: the model's labels differ from the data set's class names")
    print(evaluation.to_text(dataset.classes))
    return 0


def _run_export_arch(args: argparse.Namespace, started: float) -> int:
    from training.arch import export_architecture

    published = export_architecture(
        args.architecture,
        num_classes=args.num_classes,
        input_size=args.input_size,
        channels=args.channels,
        repository=Path(args.repository),
        model_name=args.model_name or args.architecture,
        seed=args.seed,
    )
    print(f"wrote version {published.version}: {published.path}")
    print(f"wall time: {time.monotonic() - started:.1f} s")
    return 0


def _run_compare(args: argparse.Namespace, started: float) -> int:
    from dataclasses import replace

    from training.compare.run import run_comparison

    config = train_config(args)
    if args.publish_to is not None:
        config = replace(config, repository=args.publish_to)
    comparison = run_comparison(
        config,
        out=None if args.publish_to is not None else args.out,
        dense_layers=args.dense_layers,
    )
    if comparison.version is not None:
        print(f"wrote version {comparison.version.version}: {comparison.version.path}")
    for line in comparison.summary():
        print(line)
    print(f"report: {comparison.directory / 'index.md'}")
    print(f"page: {comparison.directory / 'index.html'}")
    print(f"wall time: {time.monotonic() - started:.1f} s")
    return 0


def _run_samples(args: argparse.Namespace) -> int:
    from training.data import load_data
    from training.samples import write_samples

    dataset = load_data(flags.values(args, DataConfig))
    paths = write_samples(dataset.test, dataset.classes, args.out, args.count)
    print(f"wrote {len(paths)} test images of {dataset.name} to {args.out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training ...``; returns the exit status (2 for a usage or data problem)."""
    started = time.monotonic()
    # OpenMP threads that spin while they wait steal the cores from whatever else runs on a small
    # machine (CI, other tests): beside one busy process an epoch took 7.1 s spinning and 4.3 s
    # passive; on a quiet machine the difference is noise. Read when torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = get_args_parser().parse_args(argv)
    # Our progress at INFO; other libraries (the ONNX exporter, matplotlib) only when they warn.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("training").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.command == "train":
            return _run_train(args, started)
        if args.command == "compare":
            return _run_compare(args, started)
        if args.command == "evaluate":
            return _run_evaluate(args)
        if args.command == "samples":
            return _run_samples(args)
        if args.command == "quantize":
            return quantize.run(args)
        return _run_export_arch(args, started)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train answers its own (with the run's --resume path)
        return 130
