"""The settings of one training run (torch-free, so the CLI builds them without importing torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from training.data import DataConfig
from training.errors import ConfigError
from training.model_config import PRESETS, Preset


@dataclass(frozen=True)
class TrainConfig:
    """The arguments of one run; stored in every checkpoint and in ``convserve.training``."""

    data: DataConfig = field(default_factory=DataConfig)
    """Which images, and how they are split."""
    preset: str = "auto"
    """Architecture preset (PRESETS); auto: small for grayscale, deep for RGB, each with its own
    preset's epochs."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that replace the preset's (e.g. blocks, dropout)."""
    epochs: int | None = None
    """Epochs to train; not given: the preset's number."""
    batch_size: int | None = None
    """Images per optimiser step; not given: the preset's."""
    lr: float | None = None
    """Peak learning rate (the one-cycle maximum); not given: the preset's."""
    optimizer: str = "adamw"
    """adamw, adam or sgd (Nesterov momentum)."""
    weight_decay: float = 0.05
    """Weight decay (decoupled for AdamW)."""
    momentum: float = 0.9
    """SGD momentum."""
    schedule: str = "onecycle"
    """Learning-rate schedule per batch: onecycle, cosine, step (x0.1 at 50% and 75%), constant."""
    label_smoothing: float = 0.1
    """Label smoothing of the training loss."""
    augment: str = "affine"
    """none, affine (rotation/scale/shift, for digits) or affine-hflip (adds mirroring)."""
    seed: int = 0
    """Seed of the weights, the batch order, the augmentation and dropout."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    repository: str = "model_repository"
    """The model repository to write the new version into."""
    model_name: str = "mnist_cnn"
    """The model's directory inside the repository."""
    checkpoint_dir: str = "runs"
    """Each run's checkpoints go to <checkpoint_dir>/<model_name>/<run>/{last,best}.pt."""
    resume: str | None = None
    """A last.pt to continue from (its data, model and optimiser settings are used)."""
    report: bool = True
    """Write <version>/report/: figures, index.md and index.html (one self-contained page)."""
    progress: bool = True
    """Show a tqdm progress bar per epoch."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        kept["data"] = DataConfig(**values.get("data", {}))
        return cls(**kept)

    def _preset(self) -> Preset:
        # `auto` is resolved to small or deep once the data is known (train.with_concrete_preset).
        return PRESETS.get(self.preset, PRESETS["small"])

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self._preset().epochs

    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else self._preset().batch_size

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self._preset().lr


def resumed_config(stored: TrainConfig, given: TrainConfig) -> TrainConfig:
    """A resumed run keeps its own data/model/optimiser settings; where it goes comes from CLI."""
    epochs = stored.resolved_epochs()
    if given.epochs is not None and given.epochs != epochs and stored.schedule != "constant":
        raise ConfigError(
            f"the checkpoint's run was planned for {epochs} epochs and its '{stored.schedule}' "
            f"schedule cannot be stretched to {given.epochs}; resume without --epochs, or "
            f"start a new run"
        )
    return replace(
        stored,
        epochs=given.epochs if given.epochs is not None else epochs,
        device=given.device,
        repository=given.repository,
        model_name=given.model_name,
        checkpoint_dir=given.checkpoint_dir,
        resume=given.resume,
        report=given.report,
        progress=given.progress,
    )
