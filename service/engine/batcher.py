"""Dynamic batching for one model: merges concurrent requests into batches. No gRPC in here.

Each request is an array of n items ([n, ...]) and gets one future. Batches are formed from a
bounded FIFO queue at the end of the event loop's turn in which a request arrived or a batch's
run returned, so that the requests arriving in the same turn go together (no background task
polls the queue; a timer stands in for the delay below):

- when no batch of this model is computing, whatever is waiting goes at once (a lone request
  at low load pays no added latency);
- while batches are computing, requests accumulate; a further batch starts (up to
  `max_concurrent_batches`) when `max_batch_size` items wait or the oldest has waited
  `max_queue_delay_s`; otherwise the queue empties into the next free slot;
- so `max_queue_delay_s` only matters with `max_concurrent_batches` > 1: it bounds how long
  requests wait for a fuller batch while a free slot stands idle beside a computing batch. With
  one slot no slot is ever free while a batch computes, and the next batch starts the moment
  the running one ends, whatever the delay: the batch size comes from what piled up meanwhile,
  and no request ever waits on the delay;
- with `run_alone` (the slots share the cores out: the runtime's `run` gives a batch its slot's
  share, `run_alone` every core), a batch that starts while none computes and less than a full
  batch waits runs alone: `run_alone`, up to `max_batch_size` items, and no batch starts
  beside it until it returns (the slots act as one). With a full batch or more waiting, batches
  take a slot's share of the items too (`max_batch_size / max_concurrent_batches`) and compute
  side by side; while every slot computes, one more full share goes to the runtime at once and
  waits in its queue, so that the first slot to return starts it without waiting for the loop
  to answer and form the next batch (its requests' deadlines are checked as it goes, not again
  when it starts). At low load a batch has every core, under load the slots compute side by
  side, and the two kinds never mix (a batch on every core with another beside it would ask
  for more threads than there are cores);
- when a run returns and a full batch waits, the full batch goes to the runtime before the
  returned results are handed out: the runtime computes it while the event loop answers. A
  partial batch waits until the answers are handed out (it can grow meanwhile): a cheap model
  whose requests trickle in would otherwise run one batch per request;
- a batch is computed on the event loop itself, through `run_inline`, when no other batch
  computes and batches like it take at most `inline_max_s` (the cost per item of recent
  batches, times its items): the hand-off to the runtime's thread and back costs a cheap model
  more than its run, and with nothing else computing the loop would mostly wait for the run.
  Requests that arrive meanwhile wait in gRPC and form the next batch; at most one batch runs
  on the loop a turn, so the answers of one go out before the next starts;
- at low load a lone request goes further: it is computed in the loop turn it arrived in, with
  no queue and no future (`_compute_now`), when nothing computes or waits and the last
  QUIET_RUNS batches were lone requests that no other arrived beside (during a run on the
  runtime's thread, or in the turn of a run on the loop). Computed at once, requests cannot
  show that they come together, so one in PROBE_EVERY such requests is queued anyway: others
  arriving in its turn join it, and a batch of several means the load rose;
- a batch never holds more than `max_batch_size` items; a request larger than that is split
  into chunks and its results joined back;
- results are split back in order; an error in a batch reaches every request of that batch;
- a request that was cancelled, or whose deadline passed, is dropped before it is computed:
  checked when its batch is formed and again the moment the batch is handed to the runtime;
- `clock` (default: `time.perf_counter`, the server's clock) stamps arrivals, times runs and
  decides deadlines; tests inject one. Not the event loop's: uvloop's `loop.time()` is in whole
  milliseconds, so a short run on the loop would take no time by it. Its timers are in whole
  milliseconds too (a delay under 0.5 ms comes back at once), so the wait for a fuller batch is
  rounded up to the next millisecond;
- a request that does not fit in the queue is refused at once (`Overloaded`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
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
RunInline = Callable[[np.ndarray], np.ndarray]
# Lone requests are computed at once after this many consecutive batches of one request with
# no arrival beside them ...
QUIET_RUNS = 16
# ... and one in this many of them is queued anyway, to see whether others come with it.
PROBE_EVERY = 32


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
    """Counts since start: batches run (of them on the event loop), items computed, the
    largest batch, requests dropped before compute."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    dropped: int = 0
    on_loop: int = 0


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


def _whole_ms(seconds: float) -> float:
    """`seconds` rounded up to whole milliseconds, the unit of uvloop's timers."""
    return math.ceil(round(1000 * seconds, 6)) / 1000


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
        clock: Callable[[], float] = time.perf_counter,
        run_inline: RunInline | None = None,
        inline_max_s: float = 0.0,
        run_alone: RunBatch | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._run_alone = run_alone
        self._alone = False  # the batch computing is run_alone's: none starts beside it
        self._run_inline = run_inline
        self.inline_max_s = inline_max_s
        self._per_item_s: float | None = None  # compute time per item, recent batches
        self._quiet_runs = 0  # consecutive batches of one request with no arrival beside
        self._inline_candidates = 0
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.queue_capacity = queue_capacity
        self.max_concurrent_batches = max_concurrent_batches
        self._observer = observer or _NullObserver()
        self.name = name
        self.stats = BatcherStats()
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._computing = 0  # batches handed to the runner whose run has not returned
        self._batches: set[asyncio.Future[np.ndarray]] = set()  # runs not returned yet
        self._timer: asyncio.TimerHandle | None = None
        self._dispatch_scheduled = False
        self._started = False
        self._closed = False
        self._clock = clock

    def start(self) -> None:
        """Starts batching on the running loop (until then requests only queue): batches run
        when requests arrive and when runs return."""
        self._started = True
        self._dispatch(asyncio.get_running_loop())

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
        clock (`time.perf_counter` unless one was injected). `timing`, when given, gets the time
        the request waited and computed (summed over its chunks)."""
        n = len(items)
        self.check_room(n)
        loop = asyncio.get_running_loop()
        now = self._clock()
        if self._started and n <= self.max_batch_size and self._runs_inline(n):
            return self._compute_now(items, now, deadline, timing)  # no hop, no queue
        if self._computing:  # an arrival while a batch computes: the load is not low
            self._quiet_runs = 0
        futures = []
        for start in range(0, n, self.max_batch_size):
            chunk = items[start : start + self.max_batch_size]
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append(_Pending(chunk, future, now, deadline, timing))
            futures.append(future)
        self._queued_items += n
        self._observer.queue_depth(self._queued_items)
        self._schedule_dispatch(loop)
        try:
            if len(futures) == 1:
                return await futures[0]
            return np.concatenate(await asyncio.gather(*futures))
        finally:
            for future in futures:  # a failed or cancelled request drops its remaining chunks
                future.cancel()

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts every batch the rules above allow now; arms the delay's timer otherwise."""
        if not self._started or self._closed:
            return
        try:
            while self._queue and (
                self._computing < self.max_concurrent_batches or self._ready_ahead()
            ):
                if self._alone:  # none beside a batch on every core
                    return
                if self._computing and self._queued_items < self._full():
                    waited = self._clock() - self._queue[0].enqueued_at
                    if waited < self.max_queue_delay_s:
                        if self._timer is None:
                            delay_s = _whole_ms(self.max_queue_delay_s - waited)
                            self._timer = loop.call_later(delay_s, self._on_timer, loop)
                        return
                if self._start_batch(loop):  # it ran on the loop: answers go out first
                    if self._queue:
                        self._schedule_dispatch(loop)
                    return
        except Exception:  # the requests stay queued: the next arrival or batch retries
            logger.exception("model %s: could not start a batch", self.name)

    def _schedule_dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatches at the end of this loop turn (once, however many requests arrive)."""
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            loop.call_soon(self._scheduled_dispatch, loop)

    def _scheduled_dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._dispatch_scheduled = False
        self._dispatch(loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._dispatch(loop)

    def _full(self) -> int:
        """The items of a full batch beside others: with `run_alone`, a slot's share of
        `max_batch_size` (a batch on a share of the cores holds its share of the items)."""
        if self._run_alone is None:
            return self.max_batch_size
        return max(1, self.max_batch_size // self.max_concurrent_batches)

    def _ready_ahead(self) -> bool:
        """True when a full batch for a slot's share may go to the runtime while every slot
        computes (one at most): the first slot to return starts it at once, without waiting
        for the event loop to answer its requests and form the next batch."""
        return (
            self._run_alone is not None
            and not self._alone
            and self._computing == self.max_concurrent_batches
            and self._queued_items >= self._full()
        )

    def _take(self, limit: int) -> list[_Pending]:
        """Up to `limit` items from the queue (a first request chunk larger than that whole)."""
        batch: list[_Pending] = []
        size = 0
        now = self._clock()
        while self._queue and (not batch or size + len(self._queue[0].items) <= limit):
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

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Computes the next batch on the loop (returns True) or hands it to the runner, where
        `_batch_returned` takes it from there."""
        # With `run_alone`: what waits fits in a batch and none computes, so it runs alone on
        # every core; else a batch on a share of the cores, a share of the items.
        alone = self._run_alone is not None and not self._computing
        alone = alone and self._queued_items < self.max_batch_size
        batch = self._take(self.max_batch_size if alone else self._full())
        if not batch:
            return False
        started = self._clock()
        batch = [p for p in batch if self._still_wanted(p, started)]  # again, as it goes
        if not batch:
            return False
        size = sum(len(p.items) for p in batch)
        if self._fits_loop(size):
            self._run_on_loop(batch, size, started)
            return True
        self._alone = alone
        run_batch = self._run_alone if alone and self._run_alone else self._run_batch
        self._computing += 1
        try:
            # The runtime's own future (its worker settles it): no task, no extra loop turn.
            run = asyncio.ensure_future(run_batch(self._begin(batch, size, started)))
        except BaseException as error:  # the slot is freed and the batch answered in any case
            self._run_returned(loop, at_once=False)
            self._fail(batch, size, error, self._clock() - started)
            if not isinstance(error, Exception):
                raise
            return False
        self._batches.add(run)
        run.add_done_callback(functools.partial(self._batch_returned, batch, size, started, loop))
        return False

    def _run_on_loop(self, batch: list[_Pending], size: int, started: float) -> None:
        """Computes a batch on the event loop and answers its requests."""
        assert self._run_inline is not None
        self._count_quiet(batch)
        self.stats.on_loop += 1
        try:
            outputs = _checked(self._run_inline(self._begin(batch, size, started)), size)
        except BaseException as error:  # answered like a failed run on the runner
            self._fail(batch, size, error, self._clock() - started)
            if not isinstance(error, Exception):
                raise
            return
        compute_s = self._clock() - started
        self._answer(batch, outputs, started, compute_s)
        self._finished(size, compute_s, ok=True)

    def _batch_returned(
        self,
        batch: list[_Pending],
        size: int,
        started: float,
        loop: asyncio.AbstractEventLoop,
        run: asyncio.Future[np.ndarray],
    ) -> None:
        """A batch's run ended: answers its requests and starts what may start now."""
        self._batches.discard(run)
        compute_s = self._clock() - started
        try:
            if run.cancelled():  # the loop is closing
                raise asyncio.CancelledError
            outputs = _checked(run.result(), size)
        except BaseException as error:  # the slot is freed in any case
            self._run_returned(loop)
            self._fail(batch, size, error, compute_s)
            return
        self._count_quiet(batch)
        # A full batch waits: it goes to the runner before these answers (one short enough
        # for the loop runs there after them).
        pipelined = self._queued_items >= self.max_batch_size and not self._short(
            self.max_batch_size
        )
        if pipelined:
            self._run_returned(loop)
        self._answer(batch, outputs, started, compute_s)
        if not pipelined:  # after the answers just scheduled: the batch grows meanwhile
            loop.call_soon(self._run_returned, loop, False)
        self._finished(size, compute_s, ok=True)

    def _run_returned(self, loop: asyncio.AbstractEventLoop, at_once: bool = True) -> None:
        """Frees the batch's slot and starts what may start now (or at the turn's end)."""
        self._computing -= 1
        self._alone = False  # a batch alone was the only one
        if at_once:
            self._dispatch(loop)
        else:
            self._schedule_dispatch(loop)

    def _count_quiet(self, batch: list[_Pending]) -> None:
        """A batch of one request with no arrival beside it (nothing queued behind it when it
        returns or runs on the loop) extends the run of quiet batches; any other ends it."""
        lone = len(batch) == 1 and not self._queue
        self._quiet_runs = self._quiet_runs + 1 if lone else 0

    def _fits_loop(self, size: int) -> bool:
        """True when a batch of `size` items may run on the event loop now: it is short, and
        nothing else computes."""
        return not self._computing and self._short(size)

    def _short(self, size: int) -> bool:
        """True when batches of `size` items have taken at most `inline_max_s`, and may run on
        the loop."""
        if self._run_inline is None or self.inline_max_s <= 0 or self._per_item_s is None:
            return False
        return self._per_item_s * size <= self.inline_max_s

    def _runs_inline(self, size: int) -> bool:
        """True when a request of `size` items may be computed at once, in its arrival's turn:
        it may run on the loop, nothing waits, and the last QUIET_RUNS batches were lone
        requests with no arrival beside them. Every PROBE_EVERY-th such request is queued
        anyway, so that requests arriving in its turn join it (computed at once, they could
        not show that they come together)."""
        if self._queue or self._quiet_runs < QUIET_RUNS or not self._fits_loop(size):
            return False
        self._inline_candidates += 1
        return self._inline_candidates % PROBE_EVERY != 0

    def _compute_now(
        self,
        items: np.ndarray,
        now: float,
        deadline: float | None,
        timing: RequestTiming | None,
    ) -> np.ndarray:
        """One request as a batch of its own, on the event loop, in the caller's turn."""
        assert self._run_inline is not None
        if deadline is not None and now >= deadline:
            self.stats.dropped += 1
            raise DeadlineExceeded(
                f"the request's deadline passed before it reached model {self.name}; it was "
                "not computed"
            )
        self.stats.on_loop += 1
        size = len(items)
        try:
            self._observer.batch_started(size, (0.0,))
            outputs = _checked(self._run_inline(items), size)
        except BaseException as error:
            answer = self._failed(size, error, self._clock() - now)
            if answer is error or not isinstance(error, Exception):
                raise
            raise answer from error
        compute_s = self._clock() - now
        if timing is not None:
            timing.compute_s += compute_s
        self._finished(size, compute_s, ok=True)
        return outputs

    def _begin(self, batch: list[_Pending], size: int, started: float) -> np.ndarray:
        """Reports the batch started; its items as one array."""
        self._observer.batch_started(size, [started - p.enqueued_at for p in batch])
        return batch[0].items if len(batch) == 1 else np.concatenate([p.items for p in batch])

    def _answer(
        self, batch: list[_Pending], outputs: np.ndarray, started: float, compute_s: float
    ) -> None:
        """Splits the outputs back in order (the callers resume at the next turn)."""
        offset = 0
        for pending in batch:
            count = len(pending.items)
            if pending.timing is not None:
                pending.timing.queue_s += started - pending.enqueued_at
                pending.timing.compute_s += compute_s
            if not pending.future.done():
                pending.future.set_result(outputs[offset : offset + count])
            offset += count

    def _fail(
        self, batch: list[_Pending], size: int, error: BaseException, compute_s: float
    ) -> None:
        """The same error for every request of the batch."""
        answer = self._failed(size, error, compute_s)
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(answer)

    def _failed(self, size: int, error: BaseException, compute_s: float) -> ServiceError:
        """Counts a failed batch; what its requests are answered."""
        answer: ServiceError
        if isinstance(error, ServiceError):
            answer = error
        elif isinstance(error, Exception):
            logger.exception("model %s: batch of %d items failed", self.name, size)
            answer = InternalError(f"model {self.name}: batch of {size} items failed: {error!r}")
        else:  # the run was cancelled: the loop is closing
            answer = ModelNotReady(f"model {self.name} is shutting down")
        self._finished(size, compute_s, ok=False)
        return answer

    def _finished(self, size: int, compute_s: float, *, ok: bool) -> None:
        self._observer.batch_finished(size, compute_s, ok)
        if ok:  # the cost per item of recent batches, for _runs_inline
            per_item = compute_s / size
            previous = self._per_item_s
            self._per_item_s = per_item if previous is None else 0.8 * previous + 0.2 * per_item
        self.stats.batches += 1
        self.stats.items += size
        self.stats.largest_batch = max(self.stats.largest_batch, size)

    async def close(self) -> None:
        """Refuses new requests, fails the waiting ones, and waits for running batches."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelNotReady(f"model {self.name} is shutting down"))
        self._queued_items = 0
        self._observer.queue_depth(0)
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)


def _checked(outputs: np.ndarray, size: int) -> np.ndarray:
    if len(outputs) != size:
        raise RuntimeError(f"batch of {size} items gave {len(outputs)} outputs")
    return outputs
