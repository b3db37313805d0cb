"""What a classification answers, shared by the classifier and the protocol converters: one
top-k over any per-class scores (Classify's probabilities, the KServe classification
extension's raw outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoredClass:
    """One class of one image: its label, index and score (a softmax probability for Classify,
    the raw output value for the KServe classification extension)."""

    label: str
    index: int
    score: float


def top_k(scores: np.ndarray, k: int, labels: Sequence[str]) -> list[list[ScoredClass]]:
    """The k best classes of each row of `scores` [N, classes], highest first (ties: lower
    index first); k is capped at the class count."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [
        [ScoredClass(labels[i], int(i), float(scores[row, i])) for i in order[row]]
        for row in range(scores.shape[0])
    ]
