"""service.engine.batcher: merging, ordering, errors, limits, deadlines. No gRPC, a fake runtime."""

from __future__ import annotations

import ast
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.engine.batcher import PROBE_EVERY, QUIET_RUNS, Batcher, RequestTiming
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
)
from tests.service.gates import FrozenClockLoop


class FakeRuntime:
    """Doubles each item; records batches. With `gated`, every batch waits for `gate` (an
    event the test sets), so the test decides when a batch ends."""

    def __init__(self, fail: bool = False, gated: bool = False) -> None:
        self.fail = fail
        self.batches: list[np.ndarray] = []
        self.inline_batches: list[np.ndarray] = []
        self.alone_batches: list[np.ndarray] = []  # run_alone's (every core)
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.clock: FakeClock | None = None
        self.cost_per_item_s = 0.0  # what a run costs on `clock`

    async def run(self, items: np.ndarray) -> np.ndarray:
        self.batches.append(items.copy())
        await self.gate.wait()
        return self._compute(items)

    async def run_alone(self, items: np.ndarray) -> np.ndarray:
        self.alone_batches.append(items.copy())
        await self.gate.wait()
        return self._compute(items)

    def run_inline(self, items: np.ndarray) -> np.ndarray:
        self.inline_batches.append(items.copy())
        return self._compute(items)

    def _compute(self, items: np.ndarray) -> np.ndarray:
        if self.clock is not None:
            self.clock.now += self.cost_per_item_s * len(items)
        if self.fail:
            raise RuntimeError("boom")
        return items * 2


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.rejections = 0
        self.sizes: list[int] = []
        self.waits: list[float] = []

    def queue_depth(self, items: int) -> None:
        self.depths.append(items)

    def rejected(self) -> None:
        self.rejections += 1

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        self.sizes.append(size)
        self.waits.extend(waits_s)

    def batch_finished(self, size: int, compute_s: float, ok: bool) -> None:
        pass


def make(runtime: FakeRuntime, **kwargs: object) -> Batcher:
    options: dict[str, object] = {
        "max_batch_size": 8,
        "max_queue_delay_s": 0.01,
        "queue_capacity": 64,
    }
    options.update(kwargs)
    batcher = Batcher(runtime.run, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


def items(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2), value, dtype=np.int64)


async def settle(turns: int = 20) -> None:
    """Lets every ready task run: the batcher, its batches and the requests all live on this
    one loop, so a few turns are enough for whatever is due to happen."""
    for _ in range(turns):
        await asyncio.sleep(0)


# A delay so long that a request made to wait for it would outlive the test: the
# asyncio.wait_for bounds below fail such a test instead of hanging it.
FOREVER_S = 3600.0
BOUND_S = 60.0


async def test_lone_request_is_dispatched_at_once() -> None:
    runtime = FakeRuntime()
    batcher = make(runtime, max_queue_delay_s=FOREVER_S)
    result = await asyncio.wait_for(batcher.infer(items(3)), BOUND_S)  # not after the delay
    np.testing.assert_array_equal(result, items(6))
    await batcher.close()


async def test_concurrent_requests_are_merged_and_split_back_in_order() -> None:
    runtime = FakeRuntime(gated=True)
    recorder = Recorder()
    batcher = make(runtime, observer=recorder)
    tasks = [asyncio.create_task(batcher.infer(items(0)))]
    await settle()  # the first computes alone behind the gate ...
    tasks += [asyncio.create_task(batcher.infer(items(i, n=1 + i % 3))) for i in range(1, 12)]
    await settle()  # ... while the others queue
    assert len(runtime.batches) == 1
    runtime.gate.set()
    results = await asyncio.gather(*tasks)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, items(2 * i, n=1 + i % 3))
    assert recorder.sizes[0] == 1 and max(recorder.sizes) > 1
    assert all(size <= 8 for size in recorder.sizes)
    assert sum(recorder.sizes) == sum(1 + i % 3 for i in range(12))
    assert batcher.stats.largest_batch == max(recorder.sizes)
    await batcher.close()


async def test_request_larger_than_max_batch_size_is_split_and_joined() -> None:
    runtime = FakeRuntime()
    batcher = make(runtime, max_batch_size=4)
    big = np.arange(22, dtype=np.int64).reshape(11, 2)
    np.testing.assert_array_equal(await batcher.infer(big), big * 2)
    assert all(len(batch) <= 4 for batch in runtime.batches)
    await batcher.close()


async def test_with_two_slots_a_request_waits_the_queue_delay_for_a_fuller_batch() -> None:
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime, max_concurrent_batches=2, max_queue_delay_s=FOREVER_S)
    first = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    second = asyncio.create_task(batcher.infer(items(2)))  # one slot free, queue far from full
    await settle()
    assert len(runtime.batches) == 1  # waiting for a fuller batch (or the delay), not started
    runtime.gate.set()  # the first batch ends: with no batch running, the queue goes at once
    await asyncio.wait_for(asyncio.gather(first, second), BOUND_S)
    assert len(runtime.batches) == 2
    await batcher.close()


async def test_with_two_slots_and_no_delay_a_batch_starts_beside_a_running_one() -> None:
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime, max_concurrent_batches=2, max_queue_delay_s=0.0)
    first = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    second = asyncio.create_task(batcher.infer(items(2)))
    await settle()
    assert len(runtime.batches) == 2 and not first.done()  # both computing at once
    runtime.gate.set()
    await asyncio.gather(first, second)
    await batcher.close()


async def test_with_one_slot_the_queue_delay_has_no_effect() -> None:
    runtime = FakeRuntime(gated=True)
    recorder = Recorder()
    batcher = make(
        runtime, max_concurrent_batches=1, max_queue_delay_s=FOREVER_S, observer=recorder
    )
    first = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    second = asyncio.create_task(batcher.infer(items(2)))
    await settle()
    runtime.gate.set()
    # the second batch starts the moment the first ends, not after the delay
    await asyncio.wait_for(asyncio.gather(first, second), BOUND_S)
    assert recorder.sizes == [1, 1]
    await batcher.close()


async def test_a_batch_alone_gets_every_core_and_none_starts_beside_it() -> None:
    """With slots that share the cores out, a batch starting while none computes, with less
    than a full batch behind it, runs on every core (`run_alone`); a request arriving
    meanwhile waits for it to return, free slot and no delay notwithstanding."""
    runtime = FakeRuntime(gated=True)
    batcher = make(
        runtime, max_concurrent_batches=2, max_queue_delay_s=0.0, run_alone=runtime.run_alone
    )
    first = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    second = asyncio.create_task(batcher.infer(items(2)))
    await settle()
    assert (len(runtime.alone_batches), len(runtime.batches)) == (1, 0)  # none beside it
    runtime.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, second), BOUND_S)
    assert [r.tolist() for r in results] == [items(2).tolist(), items(4).tolist()]
    assert (len(runtime.alone_batches), len(runtime.batches)) == (2, 0)  # the second alone too
    await batcher.close()


async def test_under_load_batches_of_a_share_compute_side_by_side_and_one_waits_ready() -> None:
    """With a full batch or more waiting, batches take a slot's share of the items (and of the
    cores) and compute side by side; while every slot computes, one more full share waits in
    the runtime's queue, and no further one."""
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime, max_batch_size=4, max_concurrent_batches=2, run_alone=runtime.run_alone)
    values = range(1, 9)
    requests = [asyncio.create_task(batcher.infer(items(v))) for v in values]
    await settle()
    assert runtime.alone_batches == []
    assert [len(b) for b in runtime.batches] == [2, 2, 2]  # two slots and one ready, 2 wait
    runtime.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*requests), BOUND_S)
    assert [r.tolist() for r in results] == [items(2 * v).tolist() for v in values]
    # the last two, once nothing computes and less than a full batch waits: alone
    assert ([len(b) for b in runtime.batches], [len(b) for b in runtime.alone_batches]) == (
        [2, 2, 2],
        [2],
    )
    await batcher.close()


async def test_a_request_larger_than_a_share_goes_whole_into_a_batch_on_a_share() -> None:
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime, max_batch_size=4, max_concurrent_batches=2, run_alone=runtime.run_alone)
    requests = [asyncio.create_task(batcher.infer(items(v, n=4))) for v in (1, 2)]
    await settle()
    assert [len(b) for b in runtime.batches] == [4, 4]  # a share is 2 items: each whole
    runtime.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*requests), BOUND_S)
    assert [r.tolist() for r in results] == [items(2, n=4).tolist(), items(4, n=4).tolist()]
    await batcher.close()


@pytest.mark.parametrize(("queued", "handed_out_before_answer"), [(2, 2), (1, 1)])
async def test_a_full_batch_goes_to_the_runtime_before_the_last_ones_answers(
    queued: int, handed_out_before_answer: int
) -> None:
    """A full batch waiting starts the moment the run returns; a partial one after the
    answers are handed out (it may grow meanwhile)."""
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime, max_batch_size=2)

    async def batches_when_answered() -> int:
        await batcher.infer(items(1))
        return len(runtime.batches)

    first = asyncio.create_task(batches_when_answered())
    await settle()
    second = asyncio.create_task(batcher.infer(items(2, n=queued)))
    await settle()
    assert len(runtime.batches) == 1  # the second waits for the slot
    runtime.gate.set()
    assert await first == handed_out_before_answer
    np.testing.assert_array_equal(await second, items(4, n=queued))
    await batcher.close()


async def test_waits_are_measured_on_the_injected_clock() -> None:
    runtime = FakeRuntime(gated=True)
    recorder = Recorder()
    clock = FakeClock()
    batcher = make(runtime, observer=recorder, clock=clock)
    first = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    second = asyncio.create_task(batcher.infer(items(2)))
    await settle()
    clock.now += 0.25
    runtime.gate.set()
    await asyncio.gather(first, second)
    assert recorder.waits == [0.0, 0.25]
    await batcher.close()


async def test_an_error_reaches_every_request_of_the_batch() -> None:
    runtime = FakeRuntime(fail=True, gated=True)
    recorder = Recorder()
    batcher = make(runtime, observer=recorder)
    tasks = [asyncio.create_task(batcher.infer(items(0)))]
    await settle()
    tasks += [asyncio.create_task(batcher.infer(items(i))) for i in range(1, 5)]
    await settle()
    runtime.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, InternalError) for o in outcomes)
    assert recorder.sizes == [1, 4]  # the four queued requests shared one failing batch
    runtime.fail = False
    np.testing.assert_array_equal(await batcher.infer(items(1)), items(2))  # still serving
    await batcher.close()


async def test_a_batch_that_cannot_be_formed_fails_its_requests_and_frees_the_slot() -> None:
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime)
    first = asyncio.create_task(batcher.infer(items(0)))
    await settle()
    odd = [asyncio.create_task(batcher.infer(np.zeros((1, k), np.int64))) for k in (2, 3)]
    await settle()
    runtime.gate.set()
    await first
    outcomes = await asyncio.wait_for(asyncio.gather(*odd, return_exceptions=True), BOUND_S)
    assert all(isinstance(o, InternalError) for o in outcomes)  # not a hang
    np.testing.assert_array_equal(await batcher.infer(items(1)), items(2))  # the slot is free
    await batcher.close()


async def test_full_queue_refuses_at_once() -> None:
    runtime = FakeRuntime(gated=True)
    recorder = Recorder()
    batcher = make(runtime, max_batch_size=2, queue_capacity=4, observer=recorder)
    running = asyncio.create_task(batcher.infer(items(0, 2)))  # computing, out of the queue
    await settle()
    waiting = asyncio.create_task(batcher.infer(items(1, 4)))  # fills the queue
    await settle()
    with pytest.raises(Overloaded, match="4 of 4 queue places taken"):
        await batcher.infer(items(2))
    assert recorder.rejections == 1
    runtime.gate.set()
    await asyncio.gather(running, waiting)
    with pytest.raises(InvalidInput, match="at most 4 per request"):
        await batcher.infer(items(3, 5))
    await batcher.close()


def test_deadlines_and_runs_are_on_the_batchers_clock_not_the_loops() -> None:
    """By default the batcher reads `time.perf_counter` (the clock `Call.deadline` uses), not
    `loop.time()`: on a loop whose clock stands still, a deadline that has passed is still
    honoured and a run on the loop still takes time."""

    async def scenario() -> tuple[float, float]:
        runtime = FakeRuntime()
        batcher = make(runtime, run_inline=slow_double, inline_max_s=BOUND_S)
        with pytest.raises(DeadlineExceeded):
            await batcher.infer(items(1), deadline=time.perf_counter() - 1e-3)
        assert runtime.batches == []  # not computed
        await alone(batcher, items(1))  # its cost known, the next batch runs on the loop
        timing = RequestTiming()
        deadline = time.perf_counter() + BOUND_S
        np.testing.assert_array_equal(await batcher.infer(items(3), deadline, timing), items(6))
        return timing.compute_s, batcher.stats.on_loop

    with asyncio.Runner(loop_factory=FrozenClockLoop) as runner:
        compute_s, on_loop = runner.run(scenario())
    assert on_loop == 1 and compute_s >= SLOW_RUN_S


SLOW_RUN_S = 0.002


def slow_double(values: np.ndarray) -> np.ndarray:
    """A run that takes at least SLOW_RUN_S of the real clock (a lower bound, not a timing)."""
    until = time.perf_counter() + SLOW_RUN_S
    while time.perf_counter() < until:
        pass
    return values * 2


async def test_expired_and_cancelled_requests_are_not_computed() -> None:
    runtime = FakeRuntime(gated=True)
    clock = FakeClock()
    batcher = make(runtime, clock=clock)
    busy = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    expired = asyncio.create_task(batcher.infer(items(7), deadline=clock.now + 0.02))
    cancelled = asyncio.create_task(batcher.infer(items(8)))
    kept = asyncio.create_task(batcher.infer(items(9), deadline=clock.now + 1.0))
    await settle()
    cancelled.cancel()
    clock.now += 0.5  # past the first deadline, before the second
    runtime.gate.set()
    with pytest.raises(DeadlineExceeded, match=r"deadline passed after 500.0 ms .* not computed"):
        await expired
    await busy
    np.testing.assert_array_equal(await kept, items(18))
    computed = np.concatenate(runtime.batches)
    assert 7 not in computed and 8 not in computed
    assert batcher.stats.dropped == 2
    await batcher.close()


async def test_a_deadline_passing_between_batching_and_compute_is_honoured() -> None:
    """Taken into a batch, then expired before the batch reached the runtime: not computed."""
    runtime = FakeRuntime()
    clock = FakeClock()
    batcher = make(runtime, clock=clock)
    original = batcher._take

    def take_then_expire(limit: int) -> list:  # type: ignore[type-arg]
        batch = original(limit)
        clock.now += 1.0  # time passes before the batch task runs
        return batch

    batcher._take = take_then_expire  # type: ignore[method-assign]
    with pytest.raises(DeadlineExceeded):
        await batcher.infer(items(5), deadline=clock.now + 0.5)
    assert runtime.batches == []
    await batcher.close()


def make_inline(
    runtime: FakeRuntime, cost_per_item_s: float, inline_max_s: float, recorder: Recorder
) -> Batcher:
    runtime.clock, runtime.cost_per_item_s = FakeClock(), cost_per_item_s
    return make(
        runtime,
        clock=runtime.clock,
        run_inline=runtime.run_inline,
        inline_max_s=inline_max_s,
        observer=recorder,
    )


async def alone(batcher: Batcher, request: np.ndarray) -> np.ndarray:
    """One client's call, then its round trip: the loop settles before the next call (the
    runner's slot is freed after the answers go out, as the next call's arrival finds it)."""
    result = await batcher.infer(request)
    await settle()
    return result


async def learn_cost(batcher: Batcher, runtime: FakeRuntime) -> None:
    """The first batch goes to the runner: what a batch costs is not known before it."""
    np.testing.assert_array_equal(await alone(batcher, items(1)), items(2))
    assert (len(runtime.batches), runtime.inline_batches) == (1, [])


def queued(recorder: Recorder) -> int:
    """How many times an arrival was queued (each reports the queue's depth)."""
    depths = recorder.depths
    return sum(1 for before, after in zip([0, *depths], depths, strict=False) if after > before)


async def quiet_runs(
    batcher: Batcher, runtime: FakeRuntime, recorder: Recorder, runs: int = QUIET_RUNS
) -> None:
    """Lone requests until they are computed at once: `runs` of them queued and run on the
    loop (QUIET_RUNS - 1 after `learn_cost`, whose lone run counts)."""
    before = (len(runtime.batches), len(runtime.inline_batches), queued(recorder))
    for i in range(runs):
        np.testing.assert_array_equal(await alone(batcher, items(i)), items(2 * i))
    assert (len(runtime.batches), len(runtime.inline_batches), queued(recorder)) == (
        before[0], before[1] + runs, before[2] + runs
    )  # fmt: skip


async def test_a_short_batch_runs_on_the_loop_once_its_cost_is_known() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0002, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    np.testing.assert_array_equal(await alone(batcher, items(2, n=3)), items(4, n=3))
    assert (len(runtime.batches), len(runtime.inline_batches)) == (1, 1)  # 0.6 ms: on the loop
    np.testing.assert_array_equal(await alone(batcher, items(3, n=8)), items(6, n=8))
    assert (len(runtime.batches), len(runtime.inline_batches)) == (2, 1)  # 1.6 ms: the runner
    assert batcher.stats.on_loop == 1
    await batcher.close()


async def test_requests_arriving_together_run_on_the_loop_as_one_batch() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0001, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    results = await asyncio.gather(*(batcher.infer(items(i, n=i)) for i in (1, 2, 3)))
    assert [r.tolist() for r in results] == [items(2 * i, n=i).tolist() for i in (1, 2, 3)]
    assert [len(b) for b in runtime.inline_batches] == [6] and len(runtime.batches) == 1
    assert recorder.sizes[-1] == 6
    await batcher.close()


async def test_one_batch_runs_on_the_loop_a_turn_and_its_answers_go_out_first() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    first = [asyncio.create_task(batcher.infer(items(i))) for i in range(8)]
    second = [asyncio.create_task(batcher.infer(items(i))) for i in range(8, 12)]
    answered_before: list[bool] = []
    run_inline = runtime.run_inline

    def watching(values: np.ndarray) -> np.ndarray:
        answered_before.append(all(task.done() for task in first))
        return run_inline(values)

    batcher._run_inline = watching
    results = await asyncio.gather(*first, *second)
    assert [int(r[0, 0]) for r in results] == [2 * i for i in range(12)]
    assert [len(b) for b in runtime.inline_batches] == [8, 4]  # max_batch_size 8
    assert answered_before == [False, True]
    await batcher.close()


async def quiet_batcher(cost_per_item_s: float) -> tuple[FakeRuntime, Recorder, Batcher]:
    """A batcher whose lone requests are computed at once (limit 1 ms)."""
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    await quiet_runs(batcher, runtime, recorder, QUIET_RUNS - 1)
    return runtime, recorder, batcher


async def test_lone_requests_are_computed_at_once_when_quiet_and_a_probe_sees_company() -> None:
    runtime, recorder, batcher = await quiet_batcher(cost_per_item_s=0.0)
    before = queued(recorder), len(runtime.inline_batches)
    for i in range(PROBE_EVERY - 1):  # computed at once: never queued
        np.testing.assert_array_equal(await alone(batcher, items(i)), items(2 * i))
    assert (queued(recorder), len(runtime.inline_batches)) == (
        before[0], before[1] + PROBE_EVERY - 1
    )  # fmt: skip
    # The probe is queued; a request arriving in its turn joins it: the load rose.
    probe, beside = batcher.infer(items(1)), batcher.infer(items(2))
    assert [int(r[0, 0]) for r in await asyncio.gather(probe, beside)] == [2, 4]
    assert len(runtime.inline_batches[-1]) == 2 and queued(recorder) == before[0] + 2
    await quiet_runs(batcher, runtime, recorder)  # queued again until quiet again
    await alone(batcher, items(3))
    assert queued(recorder) == before[0] + 2 + QUIET_RUNS  # at once again
    assert len(runtime.batches) == 1  # all of it on the loop
    await batcher.close()


async def test_only_a_lone_request_with_no_arrival_beside_it_is_quiet() -> None:
    runtime, recorder, batcher = await quiet_batcher(cost_per_item_s=0.0002)
    runtime.gate.clear()
    big = asyncio.create_task(batcher.infer(items(1, n=8)))  # 1.6 ms: to the runner, gated
    await settle()
    during = asyncio.create_task(batcher.infer(items(2)))  # arrives while it computes
    await settle()
    runtime.gate.set()
    await asyncio.gather(big, during)
    await settle()
    depth_reports = queued(recorder)
    await alone(batcher, items(3))
    assert queued(recorder) == depth_reports + 1  # queued, not computed at once
    for i in range(QUIET_RUNS):  # quiet again: lone requests are computed at once ...
        await alone(batcher, items(i))
    depth_reports = queued(recorder)
    await alone(batcher, items(3))
    assert queued(recorder) == depth_reports
    # Nor is a batch of two requests on the runner, with nothing arriving while it computes.
    together = [batcher.infer(items(4, n=6)), batcher.infer(items(5, n=2))]  # 1.6 ms: runner
    assert [int(r[0, 0]) for r in await asyncio.gather(*together)] == [8, 10]
    await settle()  # ... until then
    depth_reports = queued(recorder)
    await alone(batcher, items(3))
    assert queued(recorder) == depth_reports + 1
    assert len(runtime.batches) == 3
    await batcher.close()


async def test_a_batch_beside_a_computing_one_never_runs_on_the_loop() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0002, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    runtime.gate.clear()
    big = asyncio.create_task(batcher.infer(items(1, n=8)))  # 1.6 ms: to the runner, gated
    await settle()
    waiting = [asyncio.create_task(batcher.infer(items(i))) for i in (2, 3)]
    await settle()
    assert runtime.inline_batches == [] and len(runtime.batches) == 2  # they wait
    runtime.gate.set()
    results = await asyncio.gather(big, *waiting)
    assert [int(r[0, 0]) for r in results] == [2, 4, 6]
    # Then nothing computes, and the two (0.4 ms) run on the loop as one batch.
    assert len(runtime.batches) == 2 and [len(b) for b in runtime.inline_batches] == [2]
    await batcher.close()


async def test_a_full_short_batch_runs_on_the_loop_after_the_returned_answers() -> None:
    """A full batch waiting when a run returns goes to the runner before the answers; one
    short enough for the loop would hold them up there, so it runs after them."""
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0001, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    batcher.inline_max_s = 0.0  # a run to the runner, gated ...
    runtime.gate.clear()
    running = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    full = [asyncio.create_task(batcher.infer(items(i))) for i in range(2, 10)]  # 8 = max
    await settle()
    batcher.inline_max_s = 0.001  # ... while the full batch waiting (0.8 ms) is short
    answered_before: list[bool] = []
    run_inline = runtime.run_inline

    def watching(values: np.ndarray) -> np.ndarray:
        answered_before.append(running.done())
        return run_inline(values)

    batcher._run_inline = watching
    runtime.gate.set()
    results = await asyncio.gather(running, *full)
    assert [int(r[0, 0]) for r in results] == [2 * i for i in range(1, 10)]
    assert answered_before == [True] and len(runtime.batches) == 2
    await batcher.close()


async def test_an_error_on_the_loop_reaches_its_requests_and_serving_goes_on() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    runtime.fail = True
    together = [batcher.infer(items(1, n=2)), batcher.infer(items(2))]
    outcomes = await asyncio.gather(*together, return_exceptions=True)
    assert all(isinstance(o, InternalError) for o in outcomes)
    assert "batch of 3 items failed" in str(outcomes[0])
    runtime.fail = False
    await quiet_runs(batcher, runtime, recorder)
    runtime.fail = True
    with pytest.raises(InternalError, match="batch of 2 items failed"):  # computed at once
        await alone(batcher, items(1, n=2))
    runtime.fail = False
    np.testing.assert_array_equal(await alone(batcher, items(1)), items(2))
    assert len(runtime.batches) == 1 and queued(recorder) == 3 + QUIET_RUNS  # all on the loop
    assert batcher.stats.batches == QUIET_RUNS + 4 and batcher.stats.on_loop == QUIET_RUNS + 3
    assert len(recorder.sizes) == QUIET_RUNS + 4  # every batch started was reported
    await batcher.close()


async def test_an_expired_request_is_not_computed_on_the_loop_either() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    batcher = make_inline(runtime, cost_per_item_s=0.0, inline_max_s=0.001, recorder=recorder)
    await learn_cost(batcher, runtime)
    assert runtime.clock is not None
    with pytest.raises(DeadlineExceeded, match="not computed"):
        await batcher.infer(items(5), deadline=runtime.clock.now)  # due now: expired
    for i in range(QUIET_RUNS):
        await alone(batcher, items(i))
    with pytest.raises(DeadlineExceeded, match="not computed"):  # and at once
        await batcher.infer(items(5), deadline=runtime.clock.now)
    assert len(runtime.batches) == 1 and len(runtime.inline_batches) == QUIET_RUNS
    assert batcher.stats.dropped == 2
    await batcher.close()


async def test_close_fails_waiting_requests_and_refuses_new_ones() -> None:
    runtime = FakeRuntime(gated=True)
    batcher = make(runtime)
    busy = asyncio.create_task(batcher.infer(items(1)))
    await settle()
    waiting = asyncio.create_task(batcher.infer(items(2)))
    await settle()
    closing = asyncio.create_task(batcher.close())
    with pytest.raises(ModelNotReady, match="shutting down"):
        await waiting
    assert not closing.done()  # close() waits for the running batch
    runtime.gate.set()
    await closing
    np.testing.assert_array_equal(await busy, items(2))  # a running batch finishes
    with pytest.raises(ModelNotReady, match="shutting down"):
        await batcher.infer(items(3))


def test_service_code_names_asyncio_timeout_error() -> None:
    """asyncio.wait_for raises asyncio.TimeoutError, which on Python 3.10 (the GPU image's
    python3.10; pyproject allows >=3.10) is not the builtin TimeoutError: catching the
    builtin there lets the timeout escape. The service must name asyncio.TimeoutError."""
    service = Path(__file__).resolve().parents[2] / "service"
    bare = [
        f"{path.name}:{node.lineno}"
        for path in sorted(service.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Name) and node.id == "TimeoutError"
    ]
    assert not bare, f"builtin TimeoutError in service code (use asyncio.TimeoutError): {bare}"
