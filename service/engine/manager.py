"""The served models and their versions: what is loaded, what requests are routed to, and how
versions come and go while the server runs (docs/model-repository.md).

The manager keeps, per model, the versions it loaded (LOADING, READY, UNLOADING) or failed to
load (UNAVAILABLE, with the reason). `sync()` brings the served versions in line with the
repository and the version policy: it loads the versions the policy wants beside the ones
serving, and only then unloads the versions the policy no longer wants, so a model never goes
without a ready version during a swap, and a version that fails to load never pushes out a
working one (the policy chooses among the versions not known to fail).

A request takes a *lease* on the version that answers it (`with manager.lease(name, version)`);
an unloaded version stops taking leases at once, waits for its last lease (its queued and
running batches answered), and only then frees its batcher and session.

The manager builds nothing itself: the composition root hands it a `loader` coroutine that
turns a version directory into a `LoadedModel` (session + warm-up + batcher + metrics).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.engine.batcher import Batcher
from service.engine.runtime import OnnxModel
from service.errors import InvalidInput, ModelNotFound, ModelNotReady, client_text
from service.observability.metrics import ModelMetrics
from service.repository.disk import ModelEntry, ModelRepository, ModelSpec, VersionDir
from service.repository.policy import Batching, ControlMode, VersionPolicy

logger = logging.getLogger(__name__)


class VersionState(enum.Enum):
    """Triton's model states, as RepositoryIndex reports them."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class LoadedModel:
    """A model version ready to serve: its spec, session, batcher and metrics, and the leases
    of the requests it is answering."""

    def __init__(
        self,
        spec: ModelSpec,
        runtime: OnnxModel,
        batcher: Batcher,
        metrics: ModelMetrics,
        batching: Batching,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.batcher = batcher
        self.metrics = metrics
        self.batching = batching
        self.leases = 0
        self._idle: asyncio.Event | None = None

    def __enter__(self) -> LoadedModel:
        """Takes a lease (`with manager.lease(name, version) as model:`)."""
        self.leases += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leases -= 1
        if self.leases == 0 and self._idle is not None:
            self._idle.set()

    async def retire(self) -> None:
        """Waits until no request holds a lease (call once it takes no new ones)."""
        if self.leases == 0:
            return
        self._idle = asyncio.Event()
        await self._idle.wait()

    async def close(self) -> None:
        """Frees the batcher, then the session and its executor; its gauges go."""
        await self.batcher.close()
        await asyncio.to_thread(self.runtime.close)
        self.metrics.forget()


@dataclass
class VersionRecord:
    """One version the manager loaded, is loading or failed to load."""

    number: int
    state: VersionState
    reason: str = ""
    loaded: LoadedModel | None = None
    fingerprint: tuple[tuple[str, int, int], ...] = ()


@dataclass
class ModelRecord:
    """What the server knows about one model: its versions and the last scan of it."""

    name: str
    policy: VersionPolicy
    entry: ModelEntry | None = None
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    problem: str = ""
    unloaded: bool = False  # by RepositoryModelUnload: not served, not counted for readiness

    def ready(self) -> list[VersionRecord]:
        """The READY versions, ascending."""
        return [
            self.versions[n]
            for n in sorted(self.versions)
            if self.versions[n].state is VersionState.READY
        ]

    def newest_ready(self) -> LoadedModel | None:
        """The newest READY version's model (what a request naming no version gets)."""
        newest: VersionRecord | None = None
        for version in self.versions.values():
            if version.state is VersionState.READY and (
                newest is None or version.number > newest.number
            ):
                newest = version
        return newest.loaded if newest is not None else None

    def states(self) -> set[VersionState]:
        return {v.state for v in self.versions.values()}


@dataclass(frozen=True)
class IndexRow:
    """One line of RepositoryIndex: a model version (version "" for the model itself)."""

    name: str
    version: str
    state: str
    reason: str


class LifecycleObserver(Protocol):
    """What the manager reports (the metrics implement it)."""

    def version_loaded(self, model: str, version: int | None, ok: bool) -> None: ...
    def version_unloaded(self, model: str) -> None: ...
    def versions_ready(self, model: str, count: int | None) -> None: ...
    def version_forgotten(self, model: str, version: int) -> None: ...


Loader = Callable[[str, VersionDir, Batching], Awaitable[LoadedModel]]
ChangeHook = Callable[[], Awaitable[None]]


class ModelManager:
    """Loads, routes to and unloads model versions (see the module docstring)."""

    def __init__(
        self,
        repository: ModelRepository,
        loader: Loader,
        *,
        policy: VersionPolicy | None = None,
        pinned: Mapping[str, int] | None = None,
        batching: Batching | None = None,
        mode: ControlMode = "none",
        default_model: str = "",
        observer: LifecycleObserver | None = None,
        on_change: ChangeHook | None = None,
    ) -> None:
        self._repository = repository
        self._loader = loader
        self._policy = policy or VersionPolicy()
        self._pinned = {
            name: VersionPolicy("specific", versions=(number,))
            for name, number in (pinned or {}).items()
        }
        self._batching = batching or Batching()
        self.mode = mode
        self.default_model = default_model
        self._observer = observer
        self._on_change = on_change
        self._records: dict[str, ModelRecord] = {}
        self._lock = asyncio.Lock()
        self.starting = True

    # --- loading and unloading ---------------------------------------------------------------

    def discover(self, entries: Sequence[ModelEntry], load: Sequence[str] = ()) -> None:
        """Records the models the first load will load (every model in modes none and poll,
        else the `load` names, `*` = all), so that requests meanwhile get "still loading"."""
        wanted = set(load)
        for entry in entries:
            if self.mode != "explicit" or "*" in wanted or entry.name in wanted:
                policy = self._pinned.get(entry.name, self._policy)
                self._records.setdefault(entry.name, ModelRecord(entry.name, policy, entry))

    async def start(self, load: Sequence[str] = ()) -> None:
        """The first load: every model (modes none and poll), or the `load` names (explicit;
        `*` = every model). A model that fails is recorded; it never stops the others."""
        try:
            if self.mode != "explicit" or "*" in load:
                await self.sync()
            else:
                for name in load:
                    try:
                        await self.load(name)
                    except (ModelNotFound, InvalidInput) as error:
                        logger.error("--load-model %s: %s", name, error)
            if self.default_model and self.default_model not in self._records:
                logger.warning(
                    "default model %s is not loaded (models: %s)",
                    self.default_model, ", ".join(self._records) or "none",
                )  # fmt: skip
        finally:
            self.starting = False
            await self._changed()

    async def sync(self) -> None:
        """Brings every model in line with the repository (a poll, or the first load)."""
        async with self._lock:
            scanned = await asyncio.to_thread(self._repository.scan)
            entries = {entry.name: entry for entry in scanned}
            gone = [
                name
                for name, record in self._records.items()
                if name not in entries and not record.unloaded
            ]
            for name, entry in entries.items():
                record = self._records.get(name)
                if record is not None and record.unloaded:
                    continue  # explicitly unloaded: stays so until loaded again
                await self._reconcile(name, entry)
            for name in gone:
                await self._reconcile(name, None)
        await self._changed()

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: (re)loads a model's versions per its policy. Raises
        ModelNotFound (no such model) or InvalidInput (no version could be loaded)."""
        async with self._lock:
            entry = await asyncio.to_thread(self._repository.scan_model, name)
            if entry is None:
                await self._reconcile(name, None)
                found = [e.name for e in await asyncio.to_thread(self._repository.scan)]
                raise ModelNotFound(
                    f"no model {client_text(name)} in the model repository; it has: "
                    f"{', '.join(found) or 'none'}"
                )
            record = self._records.get(name)
            if record is not None:
                record.unloaded = False
            record = await self._reconcile(name, entry)
        await self._changed()
        assert record is not None
        if not record.ready():
            record.unloaded = True  # not served: it counts for readiness no more than before
            if self._observer is not None:
                self._observer.versions_ready(name, None)
            raise InvalidInput(f"failed to load model {name}: {self._why_not_ready(record)}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: unloads every version of a loaded model (requests in flight
        get their answers first). Raises ModelNotFound for a model that is not loaded."""
        async with self._lock:
            record = self._records.get(name)
            if record is None or record.unloaded:
                loaded = ", ".join(self.loaded_names()) or "none"
                raise ModelNotFound(f"model {client_text(name)} is not loaded; loaded: {loaded}")
            record.unloaded = True
            await self._unload_all(record, "RepositoryModelUnload")
            if self._observer is not None:
                self._observer.versions_ready(name, None)
        await self._changed()

    async def close(self) -> None:
        """Unloads everything (the server is stopping; no call is in flight any more)."""
        async with self._lock:
            for record in self._records.values():
                await self._unload_all(record, "the server is stopping")

    async def _reconcile(self, name: str, entry: ModelEntry | None) -> ModelRecord | None:
        record = self._records.get(name)
        if entry is None:  # the model left the repository
            if record is not None:
                await self._unload_all(record, "removed from the model repository")
                del self._records[name]
                logger.info("model %s left the repository: unloaded", name)
                if self._observer is not None:
                    self._observer.versions_ready(name, None)
            return None
        policy = entry.config.policy_or(self._pinned.get(name, self._policy))
        if record is None:
            record = self._records[name] = ModelRecord(name, policy)
        record.entry, record.policy = entry, policy
        if entry.problem:
            if entry.problem != record.problem:
                logger.error("model %s cannot be loaded: %s", name, entry.problem)
                if self._observer is not None:
                    self._observer.version_loaded(name, None, ok=False)
            record.problem = entry.problem  # the versions already serving go on serving
            if self._observer is not None:
                self._observer.versions_ready(name, len(record.ready()))
            return record
        record.problem = ""
        for version_dir in entry.version_dirs:
            if version_dir.problem:  # refused without loading (a symlink out of the repository)
                self._refuse(record, version_dir)
        batching = entry.config.batching_over(self._batching)
        for number in sorted(policy.select(self._servable(record, entry))):
            current = record.versions.get(number)
            if current is None or current.state is VersionState.UNAVAILABLE:
                found = entry.version_dir(number)
                assert found is not None
                await self._load_version(record, found, batching)
        # Which ready versions stay: the policy applied to the versions ready now (and still
        # on disk), so a version that is not ready never pushes out one that is.
        servable = set(self._servable(record, entry))
        ready = [v.number for v in record.ready() if v.number in servable]
        wanted = policy.select(ready)
        for number, version in sorted(record.versions.items()):
            if version.state is VersionState.READY and number not in wanted:
                why = (
                    "its directory left the repository"
                    if entry.version_dir(number) is None
                    else f"no longer in the version policy ({policy})"
                )
                await self._unload_version(record, version, why)
            elif version.state is VersionState.UNAVAILABLE and entry.version_dir(number) is None:
                del record.versions[number]  # a failed version whose directory is gone
                if self._observer is not None:
                    self._observer.version_forgotten(name, number)
        if self._observer is not None:
            self._observer.versions_ready(name, len(record.ready()))
        return record

    def _refuse(self, record: ModelRecord, version_dir: VersionDir) -> None:
        known = record.versions.get(version_dir.number)
        if known is not None and (
            known.state is not VersionState.UNAVAILABLE or known.reason == version_dir.problem
        ):
            return  # said once; a version loaded before goes on serving
        record.versions[version_dir.number] = VersionRecord(
            version_dir.number, VersionState.UNAVAILABLE, version_dir.problem
        )
        logger.error(
            "model %s version %s failed to load: %s",
            record.name, version_dir.number, version_dir.problem,
        )  # fmt: skip
        if self._observer is not None:
            self._observer.version_loaded(record.name, version_dir.number, ok=False)

    def _servable(self, record: ModelRecord, entry: ModelEntry) -> list[int]:
        """Complete versions on disk, minus those that failed with the files they have now."""
        servable = []
        for version_dir in entry.version_dirs:
            known = record.versions.get(version_dir.number)
            failed = (
                known is not None
                and known.state is VersionState.UNAVAILABLE
                and known.fingerprint == version_dir.fingerprint
            )
            if version_dir.complete and not version_dir.problem and not failed:
                servable.append(version_dir.number)
        return servable

    async def _load_version(
        self, record: ModelRecord, version_dir: VersionDir, batching: Batching
    ) -> None:
        number = version_dir.number
        version = record.versions[number] = VersionRecord(
            number, VersionState.LOADING, fingerprint=version_dir.fingerprint
        )
        try:
            loaded = await self._loader(record.name, version_dir, batching)
        except Exception as error:
            logger.debug("loading %s version %s failed", record.name, number, exc_info=True)
            version.state, version.reason = VersionState.UNAVAILABLE, str(error) or repr(error)
            logger.error(
                "model %s version %s failed to load: %s%s", record.name, number, version.reason,
                "; the versions serving go on serving" if record.ready() else "",
            )  # fmt: skip
            if self._observer is not None:
                self._observer.version_loaded(record.name, number, ok=False)
            return
        now = await asyncio.to_thread(self._repository.scan_model, record.name)
        again = now.version_dir(number) if now is not None else None
        if again is None or again.fingerprint != version_dir.fingerprint:
            # Still being written (the publishing rule was not followed): not served; the next
            # sync loads it again, with the files it has then.
            await loaded.close()
            version.state, version.fingerprint = VersionState.UNAVAILABLE, ()
            version.reason = "its files changed while it loaded (still being copied?); retried"
            logger.warning("model %s version %s: %s", record.name, number, version.reason)
            return
        version.state, version.loaded = VersionState.READY, loaded
        loaded.metrics.set_ready(True)
        if self._observer is not None:
            self._observer.version_loaded(record.name, number, ok=True)
            self._observer.versions_ready(record.name, len(record.ready()))
        await self._changed()  # the new version serves from here on

    async def _unload_version(self, record: ModelRecord, version: VersionRecord, why: str) -> None:
        loaded = version.loaded
        version.state, version.reason = VersionState.UNLOADING, why
        if self._observer is not None:
            self._observer.versions_ready(record.name, len(record.ready()))
        if loaded is not None:
            await loaded.retire()  # every request routed to it is answered
            await loaded.close()
        del record.versions[version.number]
        logger.info("model %s version %s unloaded: %s", record.name, version.number, why)
        if self._observer is not None:
            self._observer.version_unloaded(record.name)

    async def _unload_all(self, record: ModelRecord, why: str) -> None:
        for version in list(record.versions.values()):
            if version.state is VersionState.READY:
                await self._unload_version(record, version, why)
            else:
                del record.versions[version.number]
                if self._observer is not None:
                    self._observer.version_forgotten(record.name, version.number)

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    # --- readiness -----------------------------------------------------------------------------

    def _served(self) -> list[ModelRecord]:
        return [r for r in self._records.values() if not r.unloaded]

    def all_ready(self) -> bool:
        """Every model (not explicitly unloaded) has a ready version; in explicit mode a server
        with no model loaded is ready (it waits for RepositoryModelLoad)."""
        served = self._served()
        if not served:
            return self.mode == "explicit"
        return all(r.ready() for r in served)

    def any_ready(self) -> bool:
        return any(r.ready() for r in self._served()) or (
            self.mode == "explicit" and not self._served()
        )

    # --- routing -------------------------------------------------------------------------------

    def loaded_names(self) -> list[str]:
        return [r.name for r in self._served()]

    def record(self, name: str) -> ModelRecord:
        """The model's record; `name` empty means the default (or only) model."""
        record = self._records.get(name)
        if record is not None and not record.unloaded:  # a request's usual case
            return record
        served = self.loaded_names()
        if not name:
            if self.default_model:
                name = self.default_model
            elif len(served) == 1:
                name = served[0]
            else:
                raise InvalidInput(
                    "no model named; this server has several: "
                    f"{', '.join(served) or 'none'} (or start it with --default-model)"
                )
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(
                f"unknown model {client_text(name)}; available: {', '.join(served) or 'none'}"
            )
        if record.unloaded:
            raise ModelNotFound(
                f"model {record.name} is unloaded (RepositoryModelUnload); load it with "
                "RepositoryModelLoad"
            )
        return record

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        """The version a request goes to: the one it names, else the newest ready one.
        Raises ModelNotFound, ModelNotReady (UNAVAILABLE) or InvalidInput."""
        record = self.record(name)
        if not version:
            newest = record.newest_ready()
            if newest is not None:
                return newest
            if self.starting or VersionState.LOADING in record.states():
                raise ModelNotReady(f"model {record.name} is still loading; retry shortly")
            if VersionState.UNLOADING in record.states():
                raise ModelNotReady(f"model {record.name} is being unloaded")
            why = self._why_not_ready(record, brief=True)  # paths, ORT's text: in the log
            raise ModelNotFound(f"model {record.name} has no ready version: {why}")
        # The canonical decimal only: "01" names no version (as "1.0" or " 1" do not).
        canonical = version.isascii() and version.isdigit() and str(int(version)) == version
        number = int(version) if canonical else None
        served = record.versions.get(number) if number is not None else None
        if served is None:
            raise ModelNotFound(
                f"model {record.name} version {client_text(version)} is not served; ready "
                f"versions: {', '.join(str(v.number) for v in record.ready()) or 'none'} "
                f"(version policy: {record.policy}; versions on disk: "
                f"{record.entry.describe_versions() if record.entry else 'none'})"
            )
        if served.state is VersionState.READY and served.loaded is not None:
            return served.loaded
        if served.state is VersionState.LOADING:
            raise ModelNotReady(f"model {record.name} version {number} is still loading")
        if served.state is VersionState.UNLOADING:
            raise ModelNotReady(
                f"model {record.name} version {number} is being unloaded: {served.reason}"
            )
        raise ModelNotFound(
            f"model {record.name} version {number} failed to load; see the server log"
        )

    def lease(self, name: str, version: str = "") -> LoadedModel:
        """The version a request goes to, to be held (`with manager.lease(...) as model:`)
        until the request is answered: it is not unloaded before."""
        return self.resolve(name, version)

    def is_ready(self, name: str, version: str = "") -> bool:
        """ModelReady: true only for a loaded model (and its served version)."""
        try:
            self.resolve(name, version)
        except (ModelNotFound, ModelNotReady, InvalidInput):
            return False
        return True

    def ready_versions(self, name: str) -> list[LoadedModel]:
        record = self.record(name)
        return [v.loaded for v in record.ready() if v.loaded is not None]

    def loaded_models(self) -> list[LoadedModel]:
        return [
            version.loaded
            for record in self._records.values()
            for version in record.versions.values()
            if version.loaded is not None
        ]

    def _why_not_ready(self, record: ModelRecord, *, brief: bool = False) -> str:
        if record.problem:
            return "see the server log" if brief else record.problem
        failed = [v for v in record.versions.values() if v.state is VersionState.UNAVAILABLE]
        if failed:
            if brief:
                numbers = ", ".join(str(v.number) for v in failed)
                return f"version {numbers} failed to load; see the server log"
            return "; ".join(f"version {v.number}: {v.reason}" for v in failed)
        found = record.entry.describe_versions() if record.entry else "none"
        return f"no version to serve (version policy: {record.policy}; versions on disk: {found})"

    # --- the repository index ------------------------------------------------------------------

    async def index(self, ready_only: bool = False) -> list[IndexRow]:
        """Every model and version on disk, and every version loaded, with state and reason."""
        entries = {e.name: e for e in await asyncio.to_thread(self._repository.scan)}
        rows: list[IndexRow] = []
        for name in sorted(set(entries) | set(self._records)):
            rows.extend(self._index_rows(name, entries.get(name)))
        if ready_only:
            rows = [row for row in rows if row.state == VersionState.READY.value]
        return rows

    def _index_rows(self, name: str, entry: ModelEntry | None) -> list[IndexRow]:
        record = self._records.get(name)
        unavailable = VersionState.UNAVAILABLE.value
        if entry is not None and entry.problem and (record is None or not record.versions):
            return [IndexRow(name, "", unavailable, entry.problem)]
        rows = []
        on_disk = {v.number: v for v in entry.version_dirs} if entry is not None else {}
        known = record.versions if record is not None else {}
        for number in sorted(set(on_disk) | set(known)):
            version = known.get(number)
            if version is not None:
                rows.append(IndexRow(name, str(number), version.state.value, version.reason))
                continue
            why = self._idle_reason(record, on_disk[number])
            rows.append(IndexRow(name, str(number), unavailable, why))
        if not rows:
            rows.append(IndexRow(name, "", unavailable, "no version directory"))
        return rows

    def _idle_reason(self, record: ModelRecord | None, version_dir: VersionDir) -> str:
        """Why a version on disk is not loaded."""
        if version_dir.problem:
            return version_dir.problem
        if not version_dir.complete:
            return "no model.onnx (incomplete: publish by renaming a finished directory)"
        if record is None:
            explicit = self.mode == "explicit"
            return "not loaded" + (" (RepositoryModelLoad loads it)" if explicit else "")
        if record.unloaded:
            return "unloaded (RepositoryModelUnload)"
        if record.problem:
            return record.problem
        return f"not in the version policy ({record.policy})"
