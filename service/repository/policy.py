"""Which versions of a model are served, and with which batching: the per-model configuration.

A version policy has Triton's `version_policy` meaning, written as a short text both in the
server's settings and in a model's `config.json`:

- `latest N`: the N highest-numbered versions (default `latest 1`);
- `all`: every version;
- `specific 1,3`: exactly these versions.

The policy chooses among the versions that can be served: complete on disk, and not known to
fail (a broken new version never pushes out a working one, docs/model-repository.md).

`<repository>/<model>/config.json` (optional) overrides, for that model, the version policy and
the batching settings; a bad key or value fails that model's load with a message naming the key
and what is allowed. JSON rather than Triton's `config.pbtxt`: the training package already
writes JSON beside the model (metadata.json), and reading it needs no protobuf text parser.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from contract.layout import CONFIG_FILE
from service.errors import ModelLoadError

POLICY_KINDS = ("latest", "all", "specific")
PolicyKind = Literal["latest", "all", "specific"]
ControlMode = Literal["none", "poll", "explicit"]
CONTROL_MODES: tuple[ControlMode, ...] = ("none", "poll", "explicit")


@dataclass(frozen=True)
class VersionPolicy:
    """`latest N`, `all` or `specific V,...` (Triton's version_policy)."""

    kind: PolicyKind = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest 2`, `latest` (= latest 1), `all`, `specific 1,3`; ValueError otherwise."""
        words = text.strip().split(maxsplit=1)
        kind = words[0].lower() if words else ""
        argument = words[1].strip() if len(words) > 1 else ""
        if kind == "latest":
            count = _positive(argument or "1", text)
            return cls("latest", count=count)
        if kind == "all" and not argument:
            return cls("all")
        if kind == "specific" and argument:
            numbers = [_positive(part.strip(), text) for part in argument.split(",")]
            return cls("specific", versions=tuple(sorted(set(numbers))))
        raise ValueError(
            f"bad version policy {text!r}; expected one of: latest N, all, specific V[,V...] "
            "(e.g. 'latest 2', 'specific 1,3')"
        )

    def select(self, available: Iterable[int]) -> set[int]:
        """The versions of `available` this policy serves."""
        versions = sorted(set(available))
        if self.kind == "all":
            return set(versions)
        if self.kind == "specific":
            return set(versions) & set(self.versions)
        return set(versions[-self.count :])

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {self.count}"
        if self.kind == "specific":
            return "specific " + ",".join(map(str, self.versions))
        return "all"


def _positive(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(
            f"bad version policy {whole!r}: {text!r} is not a positive integer; "
            "expected one of: latest N, all, specific V[,V...]"
        )
    return int(text)


@dataclass(frozen=True)
class Batching:
    """One model's dynamic batching settings (the server's settings unless config.json says
    otherwise)."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    queue_capacity: int = 512
    max_concurrent_batches: int = 0  # 0: auto (OnnxModel.prepare_slots)
    inline_run_max_us: int = 1000

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    @property
    def inline_run_max_s(self) -> float:
        return self.inline_run_max_us / 1e6


# config.json keys -> (what the value must be, the smallest allowed value)
BATCHING_KEYS: Mapping[str, int] = {
    "max_batch_size": 1,
    "max_queue_delay_us": 0,
    "queue_capacity": 1,
    "max_concurrent_batches": 0,
    "inline_run_max_us": 0,
}
CONFIG_KEYS = ("version_policy", *BATCHING_KEYS)


@dataclass(frozen=True)
class ModelConfig:
    """What one model's config.json says; None / empty: the server's settings apply."""

    version_policy: VersionPolicy | None = None
    batching: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def policy_or(self, default: VersionPolicy) -> VersionPolicy:
        return self.version_policy if self.version_policy is not None else default

    def batching_over(self, default: Batching) -> Batching:
        return dataclasses.replace(default, **dict(self.batching))


def read_model_config(model_dir: Path) -> ModelConfig:
    """The model's config.json (an empty ModelConfig without one); ModelLoadError naming the
    key and the allowed values when it is not valid."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from None
    return parse_model_config(raw, path)


def parse_model_config(raw: Any, path: Path | str) -> ModelConfig:
    """Validates a config.json object (see `read_model_config`)."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object with keys: {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise ModelLoadError(
            f"{path}: unknown key {', '.join(map(repr, unknown))}; allowed keys: "
            f"{', '.join(CONFIG_KEYS)}"
        )
    policy = None
    if "version_policy" in raw:
        value = raw["version_policy"]
        if not isinstance(value, str):
            raise ModelLoadError(
                f"{path}: version_policy must be a string: latest N, all, or specific V[,V...]"
            )
        try:
            policy = VersionPolicy.parse(value)
        except ValueError as error:
            raise ModelLoadError(f"{path}: version_policy: {error}") from None
    batching: dict[str, int] = {}
    for key, smallest in BATCHING_KEYS.items():
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ModelLoadError(
                f"{path}: {key} must be an integer >= {smallest}, got {json.dumps(value)}"
            )
        batching[key] = value
    return ModelConfig(policy, batching)
