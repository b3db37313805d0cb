"""Dynamic batching for one model: merges concurrent requests into batches. No gRPC in here.

Each request is an array of n items ([n, ...]) and gets one future. A background task forms
batches from a bounded FIFO queue:

- when no batch of this model is computing, whatever is waiting goes at once (a lone request
  at low load pays no added latency);
- while batches are computing, requests accumulate; a further batch starts (up to
  `max_concurrent_batches`) when `max_batch_size` items wait or the oldest has waited
  `max_queue_delay_s`; otherwise the queue empties into the next free slot;
- so `max_queue_delay_s` only matters with `max_concurrent_batches` > 1: it bounds how long
  requests wait for a fuller batch while a free slot stands idle beside a computing batch. With
  one slot (the default) no slot is ever free while a batch computes, and the next batch starts
  the moment the running one ends, whatever the delay: the batch size comes from what piled up
  meanwhile, and no request ever waits on the delay;
- a batch never holds more than `max_batch_size` items; a request larger than that is split
  into chunks and its results joined back;
- results are split back in order; an error in a batch reaches every request of that batch;
- a request that was cancelled, or whose deadline passed, is dropped before it is computed:
  checked when its batch is formed and again the moment the batch is handed to the runtime;
- `clock` (default: the event loop's) stamps arrivals and decides deadlines; tests inject one;
- a request that does not fit in the queue is refused at once (`Overloaded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    ServiceError,
)

logger = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], Awaitable[np.ndarray]]


class BatchObserver(Protocol):
    """What the batcher reports (the metrics implement it)."""

    def queue_depth(self, items: int) -> None: ...
    def rejected(self) -> None: ...
    def batch_started(self, size: int, waits_s: Sequence[float]) -> None: ...
    def batch_finished(self, size: int, compute_s: float, ok: bool) -> None: ...


class _NullObserver:
    def queue_depth(self, items: int) -> None:
        pass

    def rejected(self) -> None:
        pass

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        pass

    def batch_finished(self, size: int, compute_s: float, ok: bool) -> None:
        pass


@dataclass
class BatcherStats:
    """Counts since start: batches run, items computed, and the largest batch."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    dropped: int = 0


@dataclass
class RequestTiming:
    """Where one request's time went, in seconds: filled by the batcher (queue, compute) and
    by its caller (input conversion, output encoding); Triton's per-request statistics."""

    input_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    output_s: float = 0.0


@dataclass
class _Pending:
    items: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued_at: float
    deadline: float | None
    timing: RequestTiming | None = None


class Batcher:
    """Batches requests for one model; start() in a running loop, close() when draining."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        queue_capacity: int,
        max_concurrent_batches: int = 1,
        observer: BatchObserver | None = None,
        name: str = "model",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_capacity = queue_capacity
        self.max_concurrent_batches = max_concurrent_batches
        self._observer = observer or _NullObserver()
        self.name = name
        self.stats = BatcherStats()
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._running: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._clock = clock

    def _now(self, loop: asyncio.AbstractEventLoop) -> float:
        return self._clock() if self._clock is not None else loop.time()

    def start(self) -> None:
        """Starts the batching task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name=self.name)

    def check_room(self, n: int) -> None:
        """Raises unless a request of `n` items would be queued now.

        Callers with costly preparation (decoding images) call it first, so that a request
        that would be refused is refused before the work; `infer` checks again.
        """
        if self._closed:
            raise ModelNotReady(f"model {self.name} is shutting down")
        if n == 0:
            raise InvalidInput("the request holds no items; send at least one")
        if n > self.queue_capacity:
            raise InvalidInput(
                f"the request holds {n} items; model {self.name} accepts at most "
                f"{self.queue_capacity} per request (its queue capacity)"
            )
        if self._queued_items + n > self.queue_capacity:
            self._observer.rejected()
            raise Overloaded(
                f"model {self.name} is overloaded: {self._queued_items} of {self.queue_capacity} "
                f"queue places taken, {n} needed; retry later"
            )

    async def infer(
        self,
        items: np.ndarray,
        deadline: float | None = None,
        timing: RequestTiming | None = None,
    ) -> np.ndarray:
        """Computes `items` ([n, ...]) as part of some batches; `deadline` is on the batcher's
        clock (the event loop's unless one was injected). `timing`, when given, gets the time
        the request waited and computed (summed over its chunks)."""
        n = len(items)
        self.check_room(n)
        loop = asyncio.get_running_loop()
        now = self._now(loop)
        futures = []
        for start in range(0, n, self.max_batch_size):
            chunk = items[start : start + self.max_batch_size]
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append(_Pending(chunk, future, now, deadline, timing))
            futures.append(future)
        self._queued_items += n
        self._observer.queue_depth(self._queued_items)
        self._changed.set()
        try:
            if len(futures) == 1:
                return await futures[0]
            return np.concatenate(await asyncio.gather(*futures))
        finally:
            for future in futures:  # a failed or cancelled request drops its remaining chunks
                future.cancel()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            timeout: float | None = None
            if self._queue and len(self._running) < self.max_concurrent_batches:
                waited = self._now(loop) - self._queue[0].enqueued_at
                if (
                    not self._running
                    or self._queued_items >= self.max_batch_size
                    or waited >= self.max_queue_delay_s
                ):
                    try:
                        self._start_batch(loop)
                    except Exception:  # never let the dispatcher die: requests would hang
                        logger.exception("model %s: could not start a batch", self.name)
                    continue
                timeout = self.max_queue_delay_s - waited
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _take(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        now = self._now(loop)
        while self._queue and size + len(self._queue[0].items) <= self.max_batch_size:
            pending = self._queue.popleft()
            self._queued_items -= len(pending.items)
            if self._still_wanted(pending, now):
                batch.append(pending)
                size += len(pending.items)
        self._observer.queue_depth(self._queued_items)
        return batch

    def _still_wanted(self, pending: _Pending, now: float) -> bool:
        """False (and the request answered) when it was cancelled or its deadline passed."""
        if pending.future.done():  # cancelled by the client
            self.stats.dropped += 1
            return False
        if pending.deadline is not None and now >= pending.deadline:
            self.stats.dropped += 1
            waited_ms = 1000 * (now - pending.enqueued_at)
            pending.future.set_exception(
                DeadlineExceeded(
                    f"the request's deadline passed after {waited_ms:.1f} ms in the queue "
                    f"of model {self.name}; it was not computed"
                )
            )
            return False
        return True

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._take(loop)
        if not batch:
            return
        task = loop.create_task(self._execute(batch, loop))
        self._running.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._changed.set()

    async def _execute(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        started = self._now(loop)
        batch = [p for p in batch if self._still_wanted(p, started)]  # one loop turn later
        if not batch:
            return
        size = sum(len(p.items) for p in batch)
        ok = False
        self._observer.batch_started(size, [started - p.enqueued_at for p in batch])
        try:
            items = batch[0].items if len(batch) == 1 else np.concatenate([p.items for p in batch])
            outputs = await self._run_batch(items)
            if len(outputs) != size:
                raise RuntimeError(f"batch of {size} items gave {len(outputs)} outputs")
        except Exception as error:
            if not isinstance(error, ServiceError):
                logger.exception("model %s: batch of %d items failed", self.name, size)
                error = InternalError(f"model {self.name}: batch of {size} items failed: {error!r}")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
        else:
            ok = True
            offset = 0
            compute_s = self._now(loop) - started
            for pending in batch:
                count = len(pending.items)
                if pending.timing is not None:
                    pending.timing.queue_s += started - pending.enqueued_at
                    pending.timing.compute_s += compute_s
                if not pending.future.done():
                    pending.future.set_result(outputs[offset : offset + count])
                offset += count
        finally:
            self._observer.batch_finished(size, self._now(loop) - started, ok)
            self.stats.batches += 1
            self.stats.items += size
            self.stats.largest_batch = max(self.stats.largest_batch, size)

    async def close(self) -> None:
        """Refuses new requests, fails the waiting ones, and waits for running batches."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelNotReady(f"model {self.name} is shutting down"))
        self._queued_items = 0
        self._observer.queue_depth(0)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
