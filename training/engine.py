"""The training loop's parts: determinism, batches, optimiser, schedule, an epoch, evaluation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset
from tqdm import tqdm

from training.augment import AffineAugment
from training.errors import ConfigError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "step", "constant")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{name}'; choose one of: auto, cpu, cuda")
    return torch.device(name)


CUDA_NONDETERMINISTIC_OPS = (
    "adaptive_avg_pool2d backward (--head gap)",
    "nll_loss (inside cross_entropy)",
)
"""Kernels of our training step that PyTorch flags as having no deterministic CUDA version."""


def make_deterministic(seed: int) -> None:
    """Same seed + data + device = same weights: seeded RNGs and deterministic kernels.

    On the CPU two runs give bit-identical weights (tested). On CUDA every kernel is
    deterministic (cuDNN convolutions pick deterministic algorithms, cuBLAS gets a fixed
    workspace) except :data:`CUDA_NONDETERMINISTIC_OPS`, which PyTorch runs with a UserWarning
    "... does not have a deterministic implementation": their float sums may differ in the
    last bits between runs. ``warn_only=True`` on purpose: strict mode would make those layers
    raise on CUDA instead of training.
    """
    # cuBLAS is deterministic only with a fixed workspace, and reads this before its first use
    # (which comes later: the model moves to the device after this call). A value the user set
    # wins; the CPU ignores it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def make_loader(
    images: np.ndarray, labels: np.ndarray, batch_size: int, generator: torch.Generator
) -> DataLoader:
    """Shuffled batches of whole tensors, ordered by ``generator`` (one fetch per batch).

    The last incomplete batch is dropped: a batch of one would break batch normalisation.
    """
    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    batch_size = min(batch_size, len(dataset))
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True
        )
    raise ConfigError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule stepped once per batch, planned for ``total_steps`` batches."""
    lr_scheduler = torch.optim.lr_scheduler
    if name == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name == "step":
        milestones = [total_steps // 2, total_steps * 3 // 4]
        return lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    if name == "constant":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"unknown schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")


@dataclass
class EpochResult:
    loss: float
    accuracy: float


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    augment: AffineAugment | None,
    augment_generator: torch.Generator,
    label_smoothing: float,
    description: str,
    progress: bool = True,
) -> EpochResult:
    """One pass over the training batches, with a tqdm bar showing loss and accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    # disable=None: no bar when stderr is not a terminal (logs of a container, CI).
    bar = tqdm(
        loader, desc=description, unit="batch", disable=None if progress else True, leave=False
    )
    for images, labels in bar:
        inputs = images.to(device).float()
        labels = labels.to(device)
        if augment is not None:
            inputs = augment(inputs, augment_generator)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    bar.close()
    return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1))


@torch.inference_mode()
def predict(
    model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 500
) -> np.ndarray:
    """Logits float32 ``[N, classes]`` for uint8 images, in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        outputs.append(model(batch).float().cpu())
    return torch.cat(outputs).numpy()


def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> EpochResult:
    """Loss and accuracy of the PyTorch model on one split (no label smoothing)."""
    logits = torch.from_numpy(predict(model, images, device))
    targets = torch.from_numpy(labels)
    loss = float(F.cross_entropy(logits, targets))
    accuracy = float((logits.argmax(dim=1) == targets).float().mean())
    return EpochResult(loss, accuracy)
