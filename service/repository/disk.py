"""The model repository on disk (docs/model-repository.md) and the spec each model carries.

`ModelRepository.scan()` lists the models, each with every numbered version directory (complete
or not, with a fingerprint of its files) and its config.json; which versions are served is the
model manager's choice (service/repository/policy.py). `spec_from_metadata()` turns a model's
`convserve.*` metadata into a `ModelSpec`: its labels and how an image becomes its input.
Nothing here loads a session.

A model directory, a version's directory or files, or config.json, that resolves outside the
repository (a symlink out of it) is refused: the model fails to load with a message naming the
path and where it leads, and the other models serve. Whoever can write into the repository can
still choose what is served; this only keeps the server from reading files elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.layout import (
    FORMAT_KEY,
    INPUT_NAME,
    LABELS_FILE,
    LABELS_KEY,
    METADATA_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    PREPROCESSING_KEY,
    SUPPORTED_FORMATS,
    VERSION_FILES,
    is_model_name,
    version_number,
)
from contract.preprocessing import COLOR_MODES, RESIZE_FILTERS
from service.errors import ConfigurationError, ModelLoadError
from service.repository.policy import CONFIG_FILE, ModelConfig, read_model_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """How an encoded image becomes one input row: the `convserve.preprocessing` metadata."""

    height: int
    width: int
    channels: int
    color_mode: str
    resize: str = "bilinear"
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME


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
class VersionDir:
    """One numbered directory of a model as scanned.

    `complete`: it holds a model.onnx (what the publishing rule guarantees once the directory
    has its name). `fingerprint`: the name, size and modification time of each file the server
    reads from it, so that a version whose files change while it loads, or after it failed,
    is noticed. `problem`: why it can never be served (a symlink out of the repository)."""

    number: int
    path: Path
    complete: bool
    fingerprint: tuple[tuple[str, int, int], ...] = ()
    problem: str = ""

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


@dataclass(frozen=True)
class ModelEntry:
    """One model directory as scanned: every numbered version directory, its config.json, and
    `problem` when the model cannot be served at all (a symlink out of the repository, a bad
    config.json)."""

    name: str
    directory: Path
    version_dirs: tuple[VersionDir, ...] = ()
    config: ModelConfig = field(default_factory=ModelConfig)
    problem: str = ""

    @property
    def versions(self) -> tuple[int, ...]:
        """The complete versions (with a model.onnx), ascending."""
        return tuple(v.number for v in self.version_dirs if v.complete)

    @property
    def incomplete(self) -> tuple[int, ...]:
        """Version directories without a model.onnx (a copy under way, a mistake)."""
        return tuple(v.number for v in self.version_dirs if not v.complete)

    @property
    def version(self) -> int | None:
        """The latest complete version (None: there is none)."""
        return self.versions[-1] if self.versions else None

    @property
    def model_path(self) -> Path:
        return self.directory / str(self.version) / MODEL_FILE

    def version_dir(self, number: int) -> VersionDir | None:
        return next((v for v in self.version_dirs if v.number == number), None)

    def describe_versions(self) -> str:
        """Every version directory found, e.g. `1, 2 (2 without model.onnx)`, or `none`."""
        found = ", ".join(str(v.number) for v in self.version_dirs) or "none"
        if not self.incomplete:
            return found
        return f"{found} ({', '.join(map(str, self.incomplete))} without {MODEL_FILE})"


class ModelRepository:
    """Reads `<root>/<model>/<version>/model.onnx` (and `<root>/<model>/config.json`),
    ignoring anything that is neither. Scanning only reads directories; nothing is loaded."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def scan(self) -> list[ModelEntry]:
        """The models in the repository, sorted by name. Raises when the root is unusable."""
        root = self._resolved_root()
        entries = [
            self._entry(child, root)
            for child in sorted(self.root.iterdir())
            if child.is_dir() and valid_model_name(child.name)
        ]
        return [entry for entry in entries if entry.version_dirs or entry.problem]

    def scan_model(self, name: str) -> ModelEntry | None:
        """One model's entry; None when the repository has no such model directory."""
        root = self._resolved_root()
        directory = self.root / name
        if not valid_model_name(name) or not directory.is_dir():
            return None
        return self._entry(directory, root)

    def _resolved_root(self) -> Path:
        if not self.root.is_dir():
            raise ConfigurationError(f"model repository {self.root} is not a directory")
        return self.root.resolve()

    def _entry(self, directory: Path, root: Path) -> ModelEntry:
        escape = outside_problem(directory, root, "model directory")
        if escape:  # its versions are not even listed: they are outside too
            return ModelEntry(directory.name, directory, problem=escape)
        version_dirs = tuple(
            sorted(
                (
                    _version_dir(child, root)
                    for child in directory.iterdir()
                    if version_number(child.name) is not None and child.is_dir()
                ),
                key=lambda v: v.number,
            )
        )
        escape = outside_problem(directory / CONFIG_FILE, root, "model config")
        if escape:
            return ModelEntry(directory.name, directory, version_dirs, problem=escape)
        try:
            config = read_model_config(directory)
        except ModelLoadError as error:
            return ModelEntry(directory.name, directory, version_dirs, problem=str(error))
        return ModelEntry(directory.name, directory, version_dirs, config)


def valid_model_name(name: str) -> bool:
    """A directory name the server takes for a model (hidden directories are not models)."""
    return is_model_name(name)


def _version_dir(path: Path, root: Path) -> VersionDir:
    number = int(path.name)
    for item, what in (
        (path, "version directory"),
        *((path / name, "model file") for name in VERSION_FILES),
    ):
        escape = outside_problem(item, root, what)
        if escape:
            return VersionDir(number, path, complete=False, problem=escape)
    fingerprint = []
    for name in VERSION_FILES:
        try:
            stat = (path / name).stat()
        except OSError:
            continue
        fingerprint.append((name, stat.st_size, stat.st_mtime_ns))
    complete = (path / MODEL_FILE).is_file()
    return VersionDir(number, path, complete, tuple(fingerprint))


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
    if PREPROCESSING_KEY in custom_metadata:
        return dict(custom_metadata)
    sidecar = version_dir / METADATA_FILE
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
    fmt = str(metadata.get(FORMAT_KEY, ""))
    if fmt not in SUPPORTED_FORMATS:
        raise ModelLoadError(
            f"convserve.format {fmt!r} is not supported; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    raw = _json(metadata, PREPROCESSING_KEY)
    if not isinstance(raw, dict):
        raise ModelLoadError("convserve.preprocessing must be a JSON object")
    try:
        preprocessing = Preprocessing(
            height=int(raw["height"]),
            width=int(raw["width"]),
            channels=int(raw["channels"]),
            color_mode=str(raw["color_mode"]),
            resize=str(raw.get("resize", "bilinear")).lower(),
            input_name=str(raw.get("input_name", INPUT_NAME)),
            output_name=str(raw.get("output_name", OUTPUT_NAME)),
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
    labels = _json(metadata, LABELS_KEY)
    if labels is None and (version_dir / LABELS_FILE).is_file():
        labels = (version_dir / LABELS_FILE).read_text().splitlines()
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
