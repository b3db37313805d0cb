"""The model repository on disk (docs/model-repository.md) and the spec each model carries.

`ModelRepository.scan()` lists the models and picks the version to serve (the latest, or a
pinned one); `spec_from_metadata()` turns a model's `convserve.*` metadata into a `ModelSpec`:
its labels and how an image becomes its input. Nothing here loads a session.

A model directory, or the served version's directory or files, that resolves outside the
repository (a symlink out of it) is refused: the model fails to load with a message naming the
path and where it leads, and the other models serve. Whoever can write into the repository can
still choose what is served; this only keeps the server from reading files elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ConfigurationError, ModelLoadError

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
VERSION_NAME = re.compile(r"[0-9]{1,18}")  # ASCII digits only: "²".isdigit() is true too
MODEL_FILE = "model.onnx"
# The files of a version directory the server reads (metadata.json and labels.txt: the
# fallbacks of read_metadata and spec_from_metadata).
VERSION_FILES = (MODEL_FILE, "metadata.json", "labels.txt")
SUPPORTED_FORMATS = ("1",)
RESIZE_FILTERS = ("bilinear", "nearest", "bicubic", "lanczos", "box", "hamming")
COLOR_MODES = {"L": 1, "RGB": 3}


@dataclass(frozen=True)
class Preprocessing:
    """How an encoded image becomes one input row: the `convserve.preprocessing` metadata."""

    height: int
    width: int
    channels: int
    color_mode: str
    resize: str = "bilinear"
    input_name: str = "images"
    output_name: str = "logits"


@dataclass(frozen=True)
class ModelSpec:
    """What the service knows about one model version besides its graph."""

    name: str
    version: int
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one input row."""
        p = self.preprocessing
        return (p.channels, p.height, p.width)


@dataclass(frozen=True)
class ModelEntry:
    """One model directory as scanned: its versions (directories with a model.onnx), the
    version directories without one (`incomplete`: a copy under way, a mistake), and the
    version chosen to serve (None: none fits)."""

    name: str
    directory: Path
    versions: tuple[int, ...]
    version: int | None
    problem: str = ""
    incomplete: tuple[int, ...] = ()

    @property
    def model_path(self) -> Path:
        return self.directory / str(self.version) / MODEL_FILE

    def describe_versions(self) -> str:
        """Every version directory found, e.g. `1, 2 (2 without model.onnx)`, or `none`."""
        found = ", ".join(map(str, sorted(self.versions + self.incomplete))) or "none"
        if not self.incomplete:
            return found
        return f"{found} ({', '.join(map(str, self.incomplete))} without {MODEL_FILE})"


class ModelRepository:
    """Reads `<root>/<model>/<version>/model.onnx`, ignoring anything that is not a version."""

    def __init__(self, root: Path, pinned_versions: Mapping[str, int] | None = None) -> None:
        self.root = root
        self.pinned_versions = dict(pinned_versions or {})

    def scan(self) -> list[ModelEntry]:
        """The models in the repository, sorted by name. Raises when the root is unusable."""
        if not self.root.is_dir():
            raise ConfigurationError(f"model repository {self.root} is not a directory")
        root = self.root.resolve()
        entries = [
            self._entry(child, root)
            for child in sorted(self.root.iterdir())
            if child.is_dir() and MODEL_NAME.match(child.name) and not child.name.startswith(".")
        ]
        entries = [
            entry
            for entry in entries
            if entry.versions or entry.problem or entry.name in self.pinned_versions
        ]
        unknown = sorted(set(self.pinned_versions) - {entry.name for entry in entries})
        if unknown:
            logger.warning("pinned models not in %s: %s", self.root, ", ".join(unknown))
        return entries

    def _entry(self, directory: Path, root: Path) -> ModelEntry:
        escape = outside_problem(directory, root, "model directory")
        if escape:  # its versions are not even listed: they are outside too
            return ModelEntry(directory.name, directory, (), None, problem=escape)
        entry = self._versions(directory)
        if entry.problem or entry.version is None:
            return entry
        version_dir = directory / str(entry.version)
        for path, what in (
            (version_dir, "version directory"),
            *((version_dir / name, "model file") for name in VERSION_FILES),
        ):
            escape = outside_problem(path, root, what)
            if escape:
                return dataclasses.replace(entry, problem=escape)
        return entry

    def _versions(self, directory: Path) -> ModelEntry:
        numbered = [
            child
            for child in directory.iterdir()
            if VERSION_NAME.fullmatch(child.name) and int(child.name) > 0 and child.is_dir()
        ]
        versions = tuple(sorted(int(c.name) for c in numbered if (c / MODEL_FILE).is_file()))
        incomplete = tuple(sorted({int(c.name) for c in numbered} - set(versions)))
        pinned = self.pinned_versions.get(directory.name)
        if pinned is None:
            latest = versions[-1] if versions else None
            return ModelEntry(directory.name, directory, versions, latest, incomplete=incomplete)
        entry = ModelEntry(directory.name, directory, versions, pinned, incomplete=incomplete)
        if pinned not in versions:
            problem = (
                f"pinned version {pinned} is not in the repository "
                f"(versions: {entry.describe_versions()})"
            )
            return dataclasses.replace(entry, problem=problem)
        return entry


def outside_problem(path: Path, root: Path, what: str) -> str:
    """Why `path` is refused, when it resolves outside `root` (resolved); "" when it stays
    inside or does not exist."""
    if not (path.is_symlink() or path.exists()):
        return ""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        return f"{what} {path} cannot be resolved ({error}); refused"
    if resolved.is_relative_to(root):
        return ""
    return (
        f"{what} {path} resolves to {resolved}, outside the model repository {root}; refused "
        "(a symlink out of the repository: docs/security.md)"
    )


def _json(metadata: Mapping[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"metadata {key} is not valid JSON: {error}") from None
    return value


def read_metadata(custom_metadata: Mapping[str, str], version_dir: Path) -> dict[str, Any]:
    """The model's metadata: the ONNX metadata_props, else metadata.json beside the model."""
    if "convserve.preprocessing" in custom_metadata:
        return dict(custom_metadata)
    sidecar = version_dir / "metadata.json"
    if sidecar.is_file():
        logger.warning("%s has no convserve.* metadata_props; using %s", version_dir, sidecar.name)
        loaded = json.loads(sidecar.read_text())
        if isinstance(loaded, dict):
            return loaded
    raise ModelLoadError(
        f"{version_dir / MODEL_FILE} has no convserve.preprocessing metadata and no metadata.json"
        " (see docs/model-repository.md)"
    )


def spec_from_metadata(
    name: str, version: int, metadata: Mapping[str, Any], version_dir: Path
) -> ModelSpec:
    """Validates the contract's metadata keys and builds the spec; raises ModelLoadError."""
    fmt = str(metadata.get("convserve.format", ""))
    if fmt not in SUPPORTED_FORMATS:
        raise ModelLoadError(
            f"convserve.format {fmt!r} is not supported; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    raw = _json(metadata, "convserve.preprocessing")
    if not isinstance(raw, dict):
        raise ModelLoadError("convserve.preprocessing must be a JSON object")
    try:
        preprocessing = Preprocessing(
            height=int(raw["height"]),
            width=int(raw["width"]),
            channels=int(raw["channels"]),
            color_mode=str(raw["color_mode"]),
            resize=str(raw.get("resize", "bilinear")).lower(),
            input_name=str(raw.get("input_name", "images")),
            output_name=str(raw.get("output_name", "logits")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelLoadError(
            f"convserve.preprocessing is incomplete or invalid: {error!r}"
        ) from None
    if COLOR_MODES.get(preprocessing.color_mode) != preprocessing.channels:
        raise ModelLoadError(
            f"color_mode {preprocessing.color_mode!r} with {preprocessing.channels} channels;"
            " expected L with 1 or RGB with 3"
        )
    if preprocessing.resize not in RESIZE_FILTERS:
        raise ModelLoadError(
            f"unknown resize {preprocessing.resize!r}; choose one of: {', '.join(RESIZE_FILTERS)}"
        )
    if raw.get("layout", "NCHW") != "NCHW" or raw.get("input_dtype", "uint8") != "uint8":
        raise ModelLoadError("only layout NCHW with input_dtype uint8 is supported")
    labels = _json(metadata, "convserve.labels")
    if labels is None and (version_dir / "labels.txt").is_file():
        labels = (version_dir / "labels.txt").read_text().splitlines()
    if not isinstance(labels, list) or not labels:
        raise ModelLoadError("no labels: convserve.labels is missing or empty")
    return ModelSpec(
        name=name,
        version=version,
        labels=tuple(str(label) for label in labels),
        preprocessing=preprocessing,
        metadata={
            str(k): v if isinstance(v, str) else json.dumps(v)
            for k, v in metadata.items()
            if str(k).startswith("convserve.")
        },
    )
