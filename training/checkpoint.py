"""Checkpoints: everything needed to continue a run exactly where it stopped.

``last.pt`` (written after every epoch) holds the model, optimiser, schedule, history, the best
weights so far, the configurations it was made with and every random generator's state, so
``--resume last.pt`` continues with the same batches, augmentations and dropout masks as an
uninterrupted run. ``best.pt`` holds the best weights (highest validation accuracy) with their
configuration. Both are written to a temporary file first and renamed into place.

Every run writes into its own directory, ``<checkpoint_dir>/<model_name>/<UTC time>-<pid>-<hex>``
(:func:`run_directory`): two trainings of one model at once must not overwrite each other's
``last.pt``, and ``--resume`` must not continue someone else's run. A resumed run is a new run
with a new directory; the ``last.pt`` it started from stays as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from training.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"


def run_directory(checkpoint_dir: Path, model_name: str) -> Path:
    """Where one run's checkpoints go; not created yet (:func:`training.train.main` makes it).

    Sorted by start time; the process id and a random suffix keep runs that start in the same
    second apart, and the directory is made with ``exist_ok=False`` so a clash fails loudly.
    """
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return checkpoint_dir / model_name / f"{started}-{os.getpid()}-{secrets.token_hex(3)}"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": FORMAT, **state}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist; --resume takes a last.pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        raise ConfigError(f"cannot read checkpoint '{path}': {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"'{path}' is not a checkpoint of this trainer (format {FORMAT})")
    if "optimizer" not in state:
        raise ConfigError(f"'{path}' holds weights only (best.pt); resume from last.pt")
    return state


def rng_state(loader: torch.Generator, augment: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "loader": loader.get_state(),
        "augment": augment.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: dict[str, Any], loader: torch.Generator, augment: torch.Generator
) -> None:
    torch.set_rng_state(state["torch"])
    loader.set_state(state["loader"])
    augment.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
