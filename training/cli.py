"""The command line: ``python -m training {train,compare,evaluate,export-arch,samples} --help``.

- ``python -m training train --repository model_repository --model-name mnist_cnn``
- ``python -m training compare --out runs/compare`` (dense baseline vs CNN: training.compare)
- ``python -m training evaluate --model model_repository/mnist_cnn/1``
- ``python -m training export-arch resnet18 --num-classes 10 --input-size 32 --channels 3
  --repository model_repository --model-name resnet18``
- ``python -m training samples --out samples --count 10``

Heavy modules (torch, onnx) are imported inside the commands, so ``--help`` and
``train --if-missing`` on an existing model answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.data import DATASETS, DEFAULT_DATA_DIR, PUBLIC_DATASETS, DataConfig
from training.errors import ConfigError, TrainingError
from training.model_config import ACTIVATIONS, HEADS, POOLINGS, PRESETS, preset_help

logger = logging.getLogger(__name__)


def _blocks(text: str) -> tuple[tuple[int, ...], ...]:
    """``32,32/64,64`` -> ((32, 32), (64, 64)): '/' between blocks, ',' between convolutions."""
    try:
        return tuple(tuple(int(c) for c in block.split(",")) for block in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --blocks '{text}': write conv widths like 32,32/64,64/128"
        ) from None


def _units(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(u) for u in text.split(",") if u.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --hidden '{text}': e.g. 256,128") from None


def _add_data_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    # evaluate passes defaults=False: what it does not override comes from the model's metadata.
    d = DataConfig() if defaults else None
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=d and d.dataset,
        help=f"one of: {', '.join(DATASETS)} (default: mnist5k, embedded)",
    )
    group.add_argument(
        "--data-dir",
        default=d and d.data_dir,
        help=f"public data set folder or ImageFolder root (default: {DEFAULT_DATA_DIR})",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download mnist, fashion-mnist or cifar10",
    )
    group.add_argument(
        "--split-seed",
        type=int,
        default=d and d.split_seed,
        help="seed of the stratified train/val/test split (default: 0)",
    )
    group.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="use at most this many images (stratified), for quick runs",
    )
    if defaults:
        group.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
        group.add_argument(
            "--test-fraction",
            type=float,
            default=DataConfig.test_fraction,
            help="test share for mnist5k and imagefolder (default: 0.2)",
        )
        group.add_argument(
            "--image-size",
            type=int,
            default=None,
            help="imagefolder: resize to this square size (default: 28 for grayscale, 32 for RGB)",
        )
        group.add_argument("--color-mode", default="auto", help="imagefolder: auto, L or RGB")
        group.add_argument(
            "--skip-bad-images",
            action="store_true",
            help="imagefolder: skip (and count) files that do not decode instead of failing",
        )


def _add_model_and_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--preset",
        default=TrainConfig.preset,
        help=f"auto (small for grayscale, deep for RGB) or {preset_help()}",
    )
    model.add_argument("--blocks", type=_blocks, help="conv widths per block, e.g. 32,32/64,64")
    model.add_argument("--kernel-size", type=int, help="3 or 5")
    model.add_argument("--activation", help=", ".join(ACTIVATIONS))
    model.add_argument("--no-batch-norm", dest="batch_norm", action="store_const", const=False)
    model.add_argument("--pooling", help=", ".join(POOLINGS))
    model.add_argument("--head", help=", ".join(HEADS))
    model.add_argument(
        "--hidden", type=_units, help="hidden dense widths, e.g. 256,128 ('' for none)"
    )
    model.add_argument("--dropout", type=float)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: the preset's ("
        + ", ".join(f"{n} {p.epochs}" for n, p in PRESETS.items())
        + ")",
    )
    optim.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    optim.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    optim.add_argument("--optimizer", default=TrainConfig.optimizer, help="adamw, adam or sgd")
    optim.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    optim.add_argument("--momentum", type=float, default=TrainConfig.momentum, help="sgd only")
    optim.add_argument(
        "--schedule", default=TrainConfig.schedule, help="onecycle, cosine, step, constant"
    )
    optim.add_argument("--label-smoothing", type=float, default=TrainConfig.label_smoothing)
    optim.add_argument(
        "--augment",
        default=TrainConfig.augment,
        help="none, affine (small rotation/scale/shift) or affine-hflip",
    )
    optim.add_argument(
        "--seed", type=int, default=TrainConfig.seed, help="seed of weights, batches, augmentation"
    )
    optim.add_argument("--device", default=TrainConfig.device, help="auto, cpu or cuda")


def _add_train_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=[common],
        help="train a CNN and export it as the next version",
        description="Train a CNN, export it to ONNX and write it into the model repository as "
        "the next version, with a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_arguments(parser)
    _add_model_and_optimisation_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--repository", default=TrainConfig.repository)
    out.add_argument("--model-name", default=TrainConfig.model_name)
    out.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing (exit 0) when the repository already has a version",
    )
    out.add_argument(
        "--checkpoint-dir",
        default=TrainConfig.checkpoint_dir,
        help="each run's checkpoints go to <dir>/<model-name>/<UTC time>-<pid>-<hex>/last.pt "
        "and best.pt",
    )
    out.add_argument("--resume", default=None, help="continue from this last.pt")
    out.add_argument("--no-report", dest="report", action="store_false")
    out.add_argument("--no-progress", dest="progress", action="store_false")


def _add_compare_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "compare",
        parents=[common],
        help="train a dense baseline beside the CNN and report what the convolutions buy",
        description="Train the CNN and a dense baseline with at least as many parameters on the "
        "same split, seed and budget; export both; compare accuracy (ONNX Runtime), training "
        "time and accuracy under shifts; show weight sharing, the hierarchy and the mistakes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_arguments(parser)
    _add_model_and_optimisation_arguments(parser)
    group = parser.add_argument_group("comparison")
    group.add_argument(
        "--dense-layers", type=int, default=2, help="hidden layers of the dense baseline: 1 or 2"
    )
    group.add_argument(
        "--out",
        type=Path,
        default=Path("runs/compare"),
        help="where index.md and the figures go (without --repository)",
    )
    group.add_argument(
        "--repository",
        dest="publish_to",
        metavar="REPOSITORY",
        default=None,
        help="also publish the CNN as the next version of <repository>/<model-name>, with "
        "compare/ beside its report/",
    )
    group.add_argument("--model-name", default=TrainConfig.model_name)
    group.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(
        repository=TrainConfig.repository,
        checkpoint_dir=TrainConfig.checkpoint_dir,
        resume=None,
        report=True,
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
    )
    evaluate.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model.onnx, a version dir, or a model dir (latest version)",
    )
    _add_data_arguments(evaluate, defaults=False)

    arch = subparsers.add_parser(
        "export-arch",
        parents=[common],
        help="export an untrained torchvision architecture (e.g. resnet18) into the repository",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    samples.add_argument("--out", type=Path, default=Path("samples"))
    samples.add_argument("--count", type=int, default=10)
    _add_data_arguments(samples)
    return parser


def _data_config(args: argparse.Namespace, image_size: int | None = None) -> DataConfig:
    return DataConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        image_size=image_size if image_size is not None else args.image_size,
        color_mode=args.color_mode,
        skip_bad_images=args.skip_bad_images,
        max_samples=args.max_samples,
    )


def train_config(args: argparse.Namespace) -> Any:
    from training.train import TrainConfig

    overrides = {
        "blocks": args.blocks,
        "kernel_size": args.kernel_size,
        "activation": args.activation,
        "batch_norm": args.batch_norm,
        "pooling": args.pooling,
        "head": args.head,
        "hidden_units": args.hidden,
        "dropout": args.dropout,
    }
    image_size = args.image_size
    if image_size is None and args.preset in PRESETS:
        image_size = PRESETS[args.preset].config.image_size
    data = _data_config(args, image_size)
    return TrainConfig(
        data=data,
        preset=args.preset,
        model_overrides={k: v for k, v in overrides.items() if v is not None},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        seed=args.seed,
        device=args.device,
        repository=args.repository,
        model_name=args.model_name,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        report=args.report,
        progress=args.progress,
    )


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
    run_dir = run_directory(Path(args.checkpoint_dir), args.model_name)
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
    values = {**stored, "download": args.download}
    for key in ("dataset", "data_dir", "split_seed", "max_samples"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    check_held_out_split(stored, values)
    dataset = load_data(DataConfig(**values))
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
    print(f"wall time: {time.monotonic() - started:.1f} s")
    return 0


def _run_samples(args: argparse.Namespace) -> int:
    from training.data import load_data
    from training.samples import write_samples

    dataset = load_data(_data_config(args))
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
        return _run_export_arch(args, started)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train answers its own (with the run's --resume path)
        return 130
