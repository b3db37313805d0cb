"""The served models: their load state, and name/version resolution for requests.

The manager knows each model of the repository as LOADING, READY or FAILED (with the reason).
It does not build models itself: the composition root hands it a `loader` coroutine that turns
a repository entry into a `LoadedModel` (session + warm-up + batcher + metrics). A model that
fails to load is logged and reported; it never takes the others down.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from service.batcher import Batcher
from service.errors import InvalidInput, ModelNotFound, ModelNotReady, client_text
from service.metrics import ModelMetrics
from service.repository import ModelEntry, ModelSpec
from service.runtime import OnnxModel

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass
class LoadedModel:
    """A model version ready to serve: its spec, session, batcher and metrics."""

    spec: ModelSpec
    runtime: OnnxModel
    batcher: Batcher
    metrics: ModelMetrics


@dataclass
class ModelRecord:
    """What the server knows about one model of the repository."""

    entry: ModelEntry
    state: ModelState = ModelState.LOADING
    reason: str = ""
    loaded: LoadedModel | None = None

    @property
    def version_text(self) -> str:
        return str(self.entry.version) if self.entry.version is not None else "none"


Loader = Callable[[ModelEntry], Awaitable[LoadedModel]]
FailureHook = Callable[[ModelEntry, str], None]


class ModelManager:
    """Loads every model once and answers `resolve(name, version)` for requests."""

    def __init__(
        self,
        entries: Sequence[ModelEntry],
        loader: Loader,
        *,
        default_model: str = "",
        on_failure: FailureHook | None = None,
    ) -> None:
        self._records = {entry.name: ModelRecord(entry) for entry in entries}
        self._loader = loader
        self._on_failure = on_failure
        self.default_model = default_model
        if default_model and default_model not in self._records:
            logger.warning(
                "default model %s is not in the repository (models: %s)",
                default_model, ", ".join(self._records) or "none",
            )  # fmt: skip

    @property
    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    async def load_all(self) -> None:
        """Loads the models one after the other (they compete for the same cores)."""
        for record in self._records.values():
            entry = record.entry
            if entry.problem or entry.version is None:
                self._fail(record, entry.problem or "no version directory with a model.onnx")
                continue
            try:
                record.loaded = await self._loader(entry)
            except Exception as error:
                logger.debug("loading %s failed", entry.name, exc_info=True)
                self._fail(record, str(error) or repr(error))
                continue
            record.state = ModelState.READY

    def _fail(self, record: ModelRecord, reason: str) -> None:
        record.state, record.reason = ModelState.FAILED, reason
        logger.error(
            "model %s version %s failed to load: %s", record.entry.name, record.version_text, reason
        )
        if self._on_failure is not None:
            self._on_failure(record.entry, reason)

    def all_ready(self) -> bool:
        return bool(self._records) and all(
            r.state is ModelState.READY for r in self._records.values()
        )

    def any_ready(self) -> bool:
        return any(r.state is ModelState.READY for r in self._records.values())

    def loading(self) -> bool:
        return any(r.state is ModelState.LOADING for r in self._records.values())

    def record(self, name: str) -> ModelRecord:
        """The model's record; `name` empty means the default (or only) model."""
        if not name:
            if self.default_model:
                name = self.default_model
            elif len(self._records) == 1:
                name = next(iter(self._records))
            else:
                raise InvalidInput(
                    "no model named; this server has several: "
                    f"{', '.join(self._records)} (or start it with --default-model)"
                )
        record = self._records.get(name)
        if record is None:
            known = ", ".join(self._records) or "none"
            raise ModelNotFound(f"unknown model {client_text(name)}; available: {known}")
        return record

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model for a request; raises ModelNotFound or ModelNotReady."""
        record = self.record(name)
        entry = record.entry
        if version and version != record.version_text:
            # The repository is scanned once, at start: say so, rather than claim that a
            # version directory published since then does not exist.
            raise ModelNotFound(
                f"model {entry.name} version {client_text(version)} is not served; served: "
                f"{record.version_text}; version directories when the server started: "
                f"{entry.describe_versions()}; serve another with --model-version "
                f"{entry.name}=N and a restart"
            )
        if record.state is ModelState.FAILED:
            raise ModelNotFound(  # the reason (paths, ONNX Runtime's text) stays in the log
                f"model {entry.name} version {record.version_text} failed to load; "
                "see the server log"
            )
        if record.state is ModelState.LOADING or record.loaded is None:
            raise ModelNotReady(
                f"model {entry.name} version {record.version_text} is still loading; retry shortly"
            )
        return record.loaded

    def is_ready(self, name: str, version: str = "") -> bool:
        """ModelReady: true only for a loaded model (and its served version)."""
        try:
            self.resolve(name, version)
        except (ModelNotFound, ModelNotReady, InvalidInput):
            return False
        return True

    def loaded_models(self) -> list[LoadedModel]:
        return [r.loaded for r in self._records.values() if r.loaded is not None]
