"""Training: the epoch loop with checkpoints (:func:`fit`), and
:func:`main`, which goes data -> CNN -> training -> ONNX export -> model repository + report.

``python -m training train --repository model_repository --model-name mnist_cnn``
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from training import checkpoint as ckpt
from training.augment import make_augment
from training.config import TrainConfig, resumed_config
from training.data import Dataset, channel_stats, load_data
from training.engine import (
    EpochResult,
    evaluate,
    make_deterministic,
    make_loader,
    make_optimizer,
    make_scheduler,
    resolve_device,
    seeded_generator,
    train_one_epoch,
)
from training.model import ImageClassifier, build_classifier
from training.model_config import ModelConfig, resolve_config
from training.publish import PublishedVersion, publish_classifier

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    best_state: dict[str, torch.Tensor]


def _cpu_copy(classifier: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}


def is_better(validated: EpochResult, best: dict[str, Any]) -> bool:
    """Higher validation accuracy wins; on a tie (a small validation split saturates near
    100%), the lower validation loss."""
    if validated.accuracy != best["val_accuracy"]:
        return validated.accuracy > best["val_accuracy"]
    return validated.loss < best["val_loss"]


def fit(
    classifier: ImageClassifier,
    dataset: Dataset,
    config: TrainConfig,
    device: torch.device,
    checkpoint_dir: Path,
    resume_state: dict[str, Any] | None = None,
) -> FitResult:
    """Trains for the planned epochs, validating after each; keeps the best weights."""
    epochs = config.resolved_epochs()
    # NHWC convolutions and pooling are ~15% faster on the CPU (oneDNN) and on CUDA.
    classifier.to(memory_format=torch.channels_last)
    loader_generator = seeded_generator(config.seed)
    augment_generator = seeded_generator(config.seed + 1)
    loader = make_loader(
        dataset.train.images, dataset.train.labels, config.resolved_batch_size(), loader_generator
    )
    lr = config.resolved_lr()
    optimizer = make_optimizer(
        classifier, config.optimizer, lr, config.weight_decay, config.momentum
    )
    scheduler = make_scheduler(optimizer, config.schedule, lr, epochs * len(loader))
    augment = make_augment(config.augment)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {
        "epoch": 0,
        "val_accuracy": -1.0,
        "val_loss": float("inf"),
        "model": _cpu_copy(classifier),
    }
    first_epoch = 1
    if resume_state is not None:
        classifier.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        history = list(resume_state["history"])
        best = resume_state["best"]
        first_epoch = int(resume_state["epoch"]) + 1
        ckpt.restore_rng_state(resume_state["rng"], loader_generator, augment_generator)
        logger.info("resuming after epoch %d of %d", first_epoch - 1, epochs)
    for epoch in range(first_epoch, epochs + 1):
        started = time.monotonic()
        trained = train_one_epoch(
            classifier,
            loader,
            optimizer,
            scheduler,
            device,
            augment,
            augment_generator,
            config.label_smoothing,
            f"epoch {epoch}/{epochs}",
            config.progress,
        )
        validated = evaluate(classifier, dataset.val.images, dataset.val.labels, device)
        row = {
            "epoch": epoch,
            "train_loss": trained.loss,
            "train_accuracy": trained.accuracy,
            "val_loss": validated.loss,
            "val_accuracy": validated.accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.monotonic() - started,
        }
        history.append(row)
        logger.info(
            "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
            epoch,
            epochs,
            trained.loss,
            trained.accuracy,
            validated.loss,
            validated.accuracy,
            row["seconds"],
        )
        identity = {
            "config": config.to_dict(),
            "model_config": classifier.network_config(),
            "classes": dataset.classes,
            "color_mode": dataset.color_mode,
        }
        if is_better(validated, best):
            best = {
                "epoch": epoch,
                "val_accuracy": validated.accuracy,
                "val_loss": validated.loss,
                "model": _cpu_copy(classifier),
            }
            ckpt.save_checkpoint(
                {**identity, "epoch": epoch, "model": best["model"]}, checkpoint_dir / ckpt.BEST
            )
        ckpt.save_checkpoint(
            {
                **identity,
                "epoch": epoch,
                "model": _cpu_copy(classifier),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best": best,
                "rng": ckpt.rng_state(loader_generator, augment_generator),
            },
            checkpoint_dir / ckpt.LAST,
        )
    return FitResult(history, int(best["epoch"]), float(best["val_accuracy"]), best["model"])


def with_concrete_preset(config: TrainConfig, dataset: Dataset) -> TrainConfig:
    """`auto` replaced by the preset it stands for on this data (small for grayscale, deep for
    RGB), so that the run gets that preset's epochs, batch size and learning rate, and its
    checkpoint and record name it."""
    if config.preset != "auto":
        return config
    return replace(config, preset="small" if dataset.channels == 1 else "deep")


def resolve_model_config(config: TrainConfig, dataset: Dataset) -> ModelConfig:
    return resolve_config(
        with_concrete_preset(config, dataset).preset,
        **{
            **config.model_overrides,
            "in_channels": dataset.channels,
            "image_size": dataset.image_size,
            "num_classes": len(dataset.classes),
        },
    )


def training_record(
    config: TrainConfig, dataset: Dataset, result: FitResult, device: torch.device, seconds: float
) -> dict[str, Any]:
    """``convserve.training``: the run's arguments and what came of them."""
    return {
        **config.to_dict(),
        "epochs": config.resolved_epochs(),
        "batch_size": config.resolved_batch_size(),
        "lr": config.resolved_lr(),
        "best_epoch": result.best_epoch,
        "best_val_accuracy": round(result.best_val_accuracy, 6),
        "train_seconds": round(seconds, 1),
        "device": str(device),
        "split_sizes": {
            "train": len(dataset.train),
            "val": len(dataset.val),
            "test": len(dataset.test),
        },
        "skipped_files": len(dataset.skipped_files),
        "torch": torch.__version__,
    }


@dataclass
class PreparedRun:
    """What every training run starts from: its settings (`auto` resolved), device, data and
    the network's configuration with the training split's channel statistics."""

    config: TrainConfig
    device: torch.device
    dataset: Dataset
    model_config: ModelConfig
    mean: list[float]
    std: list[float]


def prepare_run(config: TrainConfig) -> PreparedRun:
    """Seeds everything, picks the device, loads the data and resolves the network."""
    make_deterministic(config.seed)
    device = resolve_device(config.device)
    dataset = load_data(config.data)
    logger.info("data: %s", dataset.summary())
    config = with_concrete_preset(config, dataset)
    mean, std = channel_stats(dataset.train.images)
    return PreparedRun(config, device, dataset, resolve_model_config(config, dataset), mean, std)


def main(config: TrainConfig, run_dir: Path | None = None) -> PublishedVersion:
    """Trains, exports and publishes one new version; returns where it went.

    Checkpoints go to ``run_dir`` (default: a new :func:`training.checkpoint.run_directory`),
    which must not exist yet: every run, a resumed one too, has a directory of its own.
    """
    started = time.monotonic()
    resume_state = None
    if config.resume:
        resume_state = ckpt.load_checkpoint(Path(config.resume))
        config = resumed_config(TrainConfig.from_dict(resume_state["config"]), config)
    run = prepare_run(config)
    config, device, dataset, model_config = run.config, run.device, run.dataset, run.model_config
    classifier = build_classifier(model_config, run.mean, run.std).to(device)
    logger.info("model: %s on %s", model_config, device)
    if run_dir is None:
        run_dir = ckpt.run_directory(Path(config.checkpoint_dir), config.model_name)
    run_dir.mkdir(parents=True, exist_ok=False)
    logger.info("checkpoints of this run: %s", run_dir)
    result = fit(classifier, dataset, config, device, run_dir, resume_state)
    classifier.load_state_dict(result.best_state)
    return publish_classifier(
        classifier,
        dataset,
        training_record(config, dataset, result, device, time.monotonic() - started),
        Path(config.repository),
        config.model_name,
        history=result.history,
        write_report=config.report,
    )
