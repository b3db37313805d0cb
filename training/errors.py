"""Domain exceptions of the training package.

The CLI turns a :class:`TrainingError` into a one-line message and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class DatasetError(TrainingError):
    """The data set is unknown, missing, empty or unreadable."""


class ConfigError(TrainingError):
    """A combination of options that cannot work (e.g. an input too small for the network)."""


class ExportError(TrainingError):
    """The ONNX export failed its checks (structure or numerical parity)."""


class RepositoryError(TrainingError):
    """The model repository cannot be read or written as the contract requires."""
