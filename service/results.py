"""What a classification answers, shared by the classifier and the protocol converters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoredClass:
    """One class of one image: its label, index and softmax probability."""

    label: str
    index: int
    score: float
