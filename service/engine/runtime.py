"""ONNX Runtime: one session per model version, run in an executor the runtime owns.

`OnnxModel.load()` and `warm_up()` block (call them in a thread); `run()` hands
`InferenceSession.run` (which releases the GIL) to the model's own worker threads and returns a
future of the outputs, so the event loop never waits on a batch. The hand-off is a queue the
workers take batches from and one `call_soon_threadsafe` per batch back: half the CPU of
`loop.run_in_executor` (about 19 against 40 µs a round trip on the 2-core build machine), which
a small model pays per batch.

With several slots on the CPU, `run()` computes a batch on its slot's share of the cores and
`run_alone()` on every core, for a batch its caller computes with none beside it
(`prepare_slots`; the batcher chooses).

`run_now()` runs a batch in the calling thread (the batcher's short runs on the event loop). On
the CPU, when a batch of one is that short, those runs get a session of their own with one
intra-op thread (`prepare_loop_session`): a tiny batch split over several threads spends more
waking and waiting for them than it saves (the small CNN's batch of one: 0.14 ms on one thread,
0.18 ms on two, and half the CPU), while the batches on the worker threads keep every core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.runtime import SPIN_MIN_RUN_S
from service.errors import ModelLoadError
from service.repository.disk import ModelSpec, read_metadata, spec_from_metadata

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# A batch on one thread costs its own run's CPU; on several, also the other threads' waking and
# waiting (the small CNN's batch of one: half the CPU, and 0.14 against 0.18 ms on a quiet
# machine, about even on a busy one). A run on one thread may therefore take somewhat longer
# and still be the better deal; beyond this factor, one client's latency pays too much. Measured
# at start-up (the best of three runs each), the ratio moves by a tenth or more: the small CNN's
# is 0.8-1.04, resnet18's 1.6-1.75 (its one client's p50 1.27 -> 1.71 ms on one thread), so
# the factor keeps clear of both.
LOOP_SESSION_MAX_SLOWDOWN = 1.25
# Workers started for `max_concurrent_batches` 0 (auto); `prepare_slots` keeps them or one.
AUTO_SLOTS = 2


@dataclass(frozen=True)
class RuntimeOptions:
    """The ONNX Runtime settings every model session is made with."""

    providers: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    executor_threads: int = 1
    # on, off, or auto: on for a model on the CPU whose batch of one takes SPIN_MIN_RUN_S
    # (contract/runtime.py: the rule and the figures that chose it)
    spinning: str = "auto"


def spins_when_auto(provider: str, batch_of_one_s: Callable[[], float]) -> bool:
    """`spinning` auto: on for a model on the CPU whose batch of one (timed only then) takes
    at least SPIN_MIN_RUN_S."""
    return provider == CPU and batch_of_one_s() >= SPIN_MIN_RUN_S


# Device nodes the NVIDIA driver creates (and the container toolkit / k8s device plugin mount
# into a container given a GPU); /dev/dxg is WSL2's GPU. Cheap to test, no CUDA import.
GPU_DEVICE_NODES = (Path("/dev/nvidiactl"), Path("/dev/nvidia0"), Path("/dev/dxg"))


def gpu_device_present() -> bool:
    """True when a GPU device node exists: only then is CUDA worth trying under `auto`."""
    return any(node.exists() for node in GPU_DEVICE_NODES)


def requested_providers(setting: str, available: Sequence[str], gpu_present: bool) -> list[str]:
    """The provider list to ask ONNX Runtime for.

    `cpu`: CPU. `cuda`: CUDA then CPU, always. `auto`: CUDA then CPU when the installed ONNX
    Runtime has the CUDA provider and a GPU device is present, else CPU alone (a CPU host with
    onnxruntime-gpu installed then neither tries CUDA nor counts as a fallback).
    """
    if setting == "cpu" or (setting == "auto" and (CUDA not in available or not gpu_present)):
        return [CPU]
    return [CUDA, CPU]


def warm_up_batch_sizes(max_batch_size: int) -> list[int]:
    """Every batch size 1..max_batch_size: the batcher forms any of them, and a size seen
    first in a user request would pay for its set-up there (on CUDA, cuDNN's algorithm search
    runs per input shape)."""
    return list(range(1, max_batch_size + 1))


class OnnxModel:
    """One loaded model version: its session, spec, providers and executor."""

    def __init__(
        self,
        spec: ModelSpec,
        session: ort.InferenceSession,
        path: Path,
        options: RuntimeOptions,
        wants_cuda: bool,
    ) -> None:
        self.spec = spec
        self._session = session
        self._path = path
        self._options = options
        self.requested = options.providers
        self.active_providers: tuple[str, ...] = tuple(session.get_providers())
        self.provider = self.active_providers[0]
        self.fallback = wants_cuda and CUDA not in self.active_providers
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"ort-{spec.name}-{i}", daemon=True)
            for i in range(max(1, options.executor_threads))
        ]
        self._closed = False
        self.slots = len(self._workers)  # batches that may compute at once (`prepare_slots`)
        for worker in self._workers:
            worker.start()
        self._output_names = [spec.preprocessing.output_name]
        self._loop_session: ort.InferenceSession | None = None  # run_now's, when it has one
        self._slot_session: ort.InferenceSession | None = None  # the workers', if not _session
        self.spinning = False  # whether the session's threads spin (`spinning`, resolved)

    @classmethod
    def load(cls, name: str, version: int, path: Path, options: RuntimeOptions) -> OnnxModel:
        """Makes the session and checks the graph against the contract; raises ModelLoadError."""
        available = ort.get_available_providers()
        gpu_present = gpu_device_present()
        providers = requested_providers(options.providers, available, gpu_present)
        if options.providers == "auto" and CUDA in available and not gpu_present:
            logger.info(
                "model %s version %s: providers=auto: no NVIDIA GPU found, using "
                "CPUExecutionProvider (no device node of %s)",
                name, version, ", ".join(map(str, GPU_DEVICE_NODES)),
            )  # fmt: skip
        wants_cuda = CUDA in providers
        session = _new_session(path, options, providers, spinning=options.spinning == "on")
        metadata = read_metadata(session.get_modelmeta().custom_metadata_map, path.parent)
        spec = spec_from_metadata(name, version, metadata, path.parent)
        check_signature(session, spec)
        model = cls(spec, session, path, options, wants_cuda)
        model.spinning = options.spinning == "on"
        logger.info(
            "model %s version %s: providers %s (requested %s: %s)",
            name, version, ", ".join(model.active_providers), options.providers,
            ", ".join(providers),
        )  # fmt: skip
        if options.spinning == "auto":
            try:
                if spins_when_auto(model.provider, model._batch_of_one_s):
                    # the providers the first session got: a CUDA that failed is not retried
                    model._session = _new_session(
                        path, options, list(model.active_providers), spinning=True
                    )
                    model.spinning = True
                    logger.info(
                        "model %s version %s: a batch of one takes at least %.1f ms: ONNX "
                        "Runtime's threads spin between pieces of work (intra_op_spinning auto)",
                        name, version, 1000 * SPIN_MIN_RUN_S,
                    )  # fmt: skip
            except Exception as error:  # its worker threads must not outlive a failed load
                model.close()
                if isinstance(error, ModelLoadError):
                    raise
                raise ModelLoadError(f"ONNX Runtime cannot run {path}: {error}") from error
        if model.fallback:
            logger.warning(
                "!!! model %s version %s asked for CUDA (providers=%s) but runs on the CPU: "
                "the CUDA provider did not load (see ONNX Runtime's error above; check the "
                "CUDA/cuDNN libraries and the GPU). Serving continues on the CPU, much slower. "
                "Exported as convserve_provider_fallback=1.",
                name, version, options.providers,
            )  # fmt: skip
        return model

    def _batch_of_one_s(self, session: ort.InferenceSession | None = None) -> float:
        """The fastest of three runs of a batch of one, after one that sets the session up (on
        the model's session unless another is given)."""
        run = (session or self._session).run
        feeds = self._feeds(self._random_images(1))
        run(self._output_names, feeds)
        return min(_timed(run, self._output_names, feeds) for _ in range(3))

    def warm_up(self, batch_sizes: Sequence[int]) -> float:
        """Runs one batch of each size so no request pays for first-run set-up; returns seconds."""
        started = time.perf_counter()
        for size in batch_sizes:
            images = self._random_images(size)
            self.run_blocking(images)
            if self._slot_session is not None:
                self._slot_session.run(self._output_names, self._feeds(images))
        return time.perf_counter() - started

    def prepare_slots(self, auto: bool = False) -> int:
        """Sets up the batch slots (the worker threads) and returns how many there are.

        On the CPU with `intra_op_threads` 0 (one a core), several slots get a session of their
        own whose runs have the cores shared out among them (at least one thread each): batches
        computed side by side then split the cores instead of each asking for all of them. The
        model's own session (every core) stays for a batch computed alone (`run_alone`), for
        the runs on the event loop and for `run_blocking`.

        `auto` (`max_concurrent_batches` 0, with AUTO_SLOTS workers started): the slots stay
        where they share the cores out; elsewhere (CUDA, intra-op threads set by hand, one
        core) one slot remains, with the model's session.
        """
        slots, cores = len(self._workers), os.cpu_count() or 1
        threads = max(1, cores // slots)
        if self.provider == CPU and self._options.intra_op_threads == 0 and threads < cores:
            self._slot_session = _new_session(
                self._path,
                dataclasses.replace(self._options, intra_op_threads=threads),
                [CPU],
                spinning=self.spinning,
            )
        if auto:
            if self._slot_session is None:
                for _ in range(slots - 1):  # each ends one worker
                    self._jobs.put(None)
                slots = 1
            logger.info(
                "model %s version %s: %s (max_concurrent_batches auto)", self.spec.name,
                self.spec.version,
                f"{slots} batch slots of {threads} of {cores} cores each; a batch computed alone "
                "gets every core" if slots > 1 else "1 batch slot with every core",
            )  # fmt: skip
        self.slots = slots
        return slots

    @property
    def shares_cores(self) -> bool:
        """Whether the slots' runs share the cores out (`prepare_slots`), so that a batch
        computed alone is better off on `run_alone`."""
        return self._slot_session is not None

    def prepare_loop_session(self, max_s: float, batch_sizes: Sequence[int]) -> bool:
        """Gives `run_now` a single-threaded session when the model runs on the CPU with more
        than one intra-op thread and a batch of one takes at most `max_s` (the batcher's limit
        for a run on the event loop: a model slower than that never runs there and keeps its
        memory) on the model's session and on one thread, there at most
        LOOP_SESSION_MAX_SLOWDOWN times as long. Warms it at `batch_sizes`; returns whether it
        is used."""
        threads = self._options.intra_op_threads
        if (
            max_s <= 0
            or self.provider != CPU
            or threads == 1
            or (threads, os.cpu_count()) == (0, 1)
        ):
            return False
        try:
            shared_s = self._batch_of_one_s()
            if shared_s > max_s:
                return False
            slot = self._slot_session
            if slot is not None and slot.get_session_options().intra_op_num_threads == 1:
                session = slot  # the workers' one-threaded session: no third copy
            else:
                session = ort.InferenceSession(
                    str(self._path),
                    sess_options=_session_options(self._options, 1, spinning=False),
                    providers=[CPU],
                )
            for size in batch_sizes:
                session.run(self._output_names, self._feeds(self._random_images(size)))
            one_s = self._batch_of_one_s(session)
        except Exception as error:  # an optimisation only: the model serves without it
            logger.warning(
                "model %s version %s: no single-threaded session for runs on the event loop "
                "(they use the model's own): %s",
                self.spec.name, self.spec.version, error,
            )  # fmt: skip
            return False
        if one_s <= max_s and one_s <= LOOP_SESSION_MAX_SLOWDOWN * shared_s:
            self._loop_session = session
        logger.info(
            "model %s version %s: a batch of one took %.3f ms on one intra-op thread, %.3f ms on "
            "the model's session: runs on the event loop use %s",
            self.spec.name, self.spec.version, 1000 * one_s, 1000 * shared_s,
            "one thread" if self._loop_session is session else "the model's session",
        )  # fmt: skip
        return self._loop_session is session

    @property
    def has_loop_session(self) -> bool:
        """Whether `run_now` has a single-threaded session of its own."""
        return self._loop_session is not None

    def _random_images(self, size: int) -> np.ndarray:
        rng = np.random.default_rng(size)
        return rng.integers(0, 256, size=(size, *self.spec.input_shape), dtype=np.uint8)

    def _feeds(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {self.spec.preprocessing.input_name: images}

    def run_blocking(self, images: np.ndarray) -> np.ndarray:
        """Runs one batch in the calling thread: uint8 [N, C, H, W] -> outputs [N, ...]."""
        output: np.ndarray = self._session.run(self._output_names, self._feeds(images))[0]
        return output

    def run_now(self, images: np.ndarray) -> np.ndarray:
        """Runs one batch in the calling thread (the event loop's, for batches short enough
        that a hand-off to the worker threads would cost more than it frees)."""
        if self._closed:
            raise RuntimeError(f"model {self.spec.name}: the runtime is closed")
        if self._loop_session is None:
            return self.run_blocking(images)
        output: np.ndarray = self._loop_session.run(self._output_names, self._feeds(images))[0]
        return output

    def run(self, images: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Runs one batch on the model's worker threads without blocking the event loop: its
        outputs come as the result of the future returned (set on the calling loop). On the
        slots' share of the cores when they share them out (`prepare_slots`)."""
        return self._submit(images, self._slot_session or self._session)

    def run_alone(self, images: np.ndarray) -> asyncio.Future[np.ndarray]:
        """`run` on every core (the model's session), for a batch its caller computes alone:
        no other batch beside it until it returns."""
        return self._submit(images, self._session)

    def _submit(
        self, images: np.ndarray, session: ort.InferenceSession
    ) -> asyncio.Future[np.ndarray]:
        if self._closed:
            raise RuntimeError(f"model {self.spec.name}: the runtime is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._jobs.put(_Job(images, session, loop, future))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome: np.ndarray | BaseException = job.session.run(
                    self._output_names, self._feeds(job.images)
                )[0]
            except BaseException as error:  # handed to the caller, as an executor would
                outcome = error
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it
                job.loop.call_soon_threadsafe(_settle, job.future, outcome)

    def close(self) -> None:
        """Waits for running batches and frees the worker threads."""
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join()


def _session_options(
    options: RuntimeOptions, intra_op_threads: int, *, spinning: bool
) -> ort.SessionOptions:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.graph_optimization_level = OPTIMIZATION_LEVELS[options.graph_optimization_level]
    spin = "1" if spinning else "0"
    session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    session_options.log_severity_level = 3  # ORT's own warnings are noise; we log what matters
    return session_options


def _new_session(
    path: Path, options: RuntimeOptions, providers: Sequence[str], *, spinning: bool
) -> ort.InferenceSession:
    session_options = _session_options(options, options.intra_op_threads, spinning=spinning)
    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    except Exception as error:  # ORT raises its own exception types, undocumented
        raise ModelLoadError(f"ONNX Runtime cannot load {path}: {error}") from error


def _timed(function: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


@dataclass(frozen=True)
class _Job:
    images: np.ndarray
    session: ort.InferenceSession
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]


def _settle(future: asyncio.Future[np.ndarray], outcome: np.ndarray | BaseException) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def check_signature(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """The graph must take uint8 [N, C, H, W] and give [N, number of labels]."""
    p = spec.preprocessing
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if p.input_name not in inputs or len(inputs) != 1:
        raise ModelLoadError(
            f"the graph's inputs are {sorted(inputs)}; expected only {p.input_name}"
        )
    if p.output_name not in outputs:
        raise ModelLoadError(f"the graph's outputs are {sorted(outputs)}; expected {p.output_name}")
    graph_input = inputs[p.input_name]
    if graph_input.type != "tensor(uint8)":
        raise ModelLoadError(f"input {p.input_name} is {graph_input.type}; expected tensor(uint8)")
    static = [d if isinstance(d, int) else -1 for d in graph_input.shape]
    if len(static) != 4 or any(
        d not in (-1, want) for d, want in zip(static[1:], spec.input_shape, strict=True)
    ):
        raise ModelLoadError(
            f"input {p.input_name} has shape {graph_input.shape}; the metadata says "
            f"[N, {', '.join(map(str, spec.input_shape))}]"
        )
    classes = outputs[p.output_name].shape[-1]
    if isinstance(classes, int) and classes != len(spec.labels):
        raise ModelLoadError(
            f"output {p.output_name} has {classes} classes but there are {len(spec.labels)} labels"
        )
