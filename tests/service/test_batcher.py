"""service.batcher: merging, ordering, errors, limits, deadlines. No gRPC, a fake runtime."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
)


class FakeRuntime:
    """Doubles each item after `delay_s`, in a thread like the real runtime; records batches."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[np.ndarray] = []

    async def run(self, items: np.ndarray) -> np.ndarray:
        self.batches.append(items.copy())
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("boom")
        return items * 2


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


async def test_lone_request_is_dispatched_at_once() -> None:
    runtime = FakeRuntime()
    batcher = make(runtime, max_queue_delay_s=5.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await batcher.infer(items(3))
    assert loop.time() - started < 0.5  # not the 5 s delay
    np.testing.assert_array_equal(result, items(6))
    await batcher.close()


async def test_concurrent_requests_are_merged_and_split_back_in_order() -> None:
    runtime = FakeRuntime(delay_s=0.05)
    recorder = Recorder()
    batcher = make(runtime, observer=recorder)
    results = await asyncio.gather(*(batcher.infer(items(i, n=1 + i % 3)) for i in range(12)))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, items(2 * i, n=1 + i % 3))
    assert max(recorder.sizes) > 1
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


async def test_with_two_slots_the_queue_delay_bounds_the_wait_beside_a_running_batch() -> None:
    runtime = FakeRuntime(delay_s=0.6)
    recorder = Recorder()
    batcher = make(runtime, max_concurrent_batches=2, max_queue_delay_s=0.15, observer=recorder)
    first = asyncio.create_task(batcher.infer(items(1)))
    await asyncio.sleep(0.02)  # the first batch computes; one slot is free
    second = asyncio.create_task(batcher.infer(items(2)))  # queue far from full
    await asyncio.sleep(0.05)
    assert len(runtime.batches) == 1  # waiting for a fuller batch, not started yet
    await asyncio.sleep(0.25)
    assert len(runtime.batches) == 2  # started after ~the delay, the first still computing
    assert not first.done()
    await asyncio.gather(first, second)
    assert 0.14 <= recorder.waits[1] < 0.4  # the second request waited about the delay
    await batcher.close()


async def test_with_one_slot_the_queue_delay_has_no_effect() -> None:
    runtime = FakeRuntime(delay_s=0.2)
    recorder = Recorder()
    batcher = make(runtime, max_concurrent_batches=1, max_queue_delay_s=5.0, observer=recorder)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.create_task(batcher.infer(items(1)))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(batcher.infer(items(2)))
    await asyncio.gather(first, second)
    # the second batch started the moment the first ended, not after the 5 s delay
    assert loop.time() - started < 1.0
    assert recorder.sizes == [1, 1]
    assert recorder.waits[1] < 0.5
    await batcher.close()


async def test_an_error_reaches_every_request_of_the_batch() -> None:
    runtime = FakeRuntime(delay_s=0.02, fail=True)
    batcher = make(runtime)
    outcomes = await asyncio.gather(
        *(batcher.infer(items(i)) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, InternalError) for o in outcomes)
    runtime.fail = False
    np.testing.assert_array_equal(await batcher.infer(items(1)), items(2))  # still serving
    await batcher.close()


async def test_full_queue_refuses_at_once() -> None:
    runtime = FakeRuntime(delay_s=0.2)
    recorder = Recorder()
    batcher = make(runtime, max_batch_size=2, queue_capacity=4, observer=recorder)
    running = asyncio.create_task(batcher.infer(items(0, 2)))  # computing, out of the queue
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(batcher.infer(items(1, 4)))  # fills the queue
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="4 of 4 queue places taken"):
        await batcher.infer(items(2))
    assert recorder.rejections == 1
    await asyncio.gather(running, waiting)
    with pytest.raises(InvalidInput, match="at most 4 per request"):
        await batcher.infer(items(3, 5))
    await batcher.close()


async def test_expired_and_cancelled_requests_are_not_computed() -> None:
    runtime = FakeRuntime(delay_s=0.1)
    batcher = make(runtime)
    loop = asyncio.get_running_loop()
    busy = asyncio.create_task(batcher.infer(items(1)))
    await asyncio.sleep(0.01)
    expired = asyncio.create_task(batcher.infer(items(7), deadline=loop.time() + 0.02))
    cancelled = asyncio.create_task(batcher.infer(items(8)))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(DeadlineExceeded, match=r"deadline passed after .* it was not computed"):
        await expired
    await busy
    computed = np.concatenate(runtime.batches)
    assert 7 not in computed and 8 not in computed
    assert batcher.stats.dropped == 2
    await batcher.close()


async def test_close_fails_waiting_requests_and_refuses_new_ones() -> None:
    runtime = FakeRuntime(delay_s=0.1)
    batcher = make(runtime)
    busy = asyncio.create_task(batcher.infer(items(1)))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(batcher.infer(items(2)))
    await asyncio.sleep(0.01)
    await batcher.close()
    np.testing.assert_array_equal(await busy, items(2))  # a running batch finishes
    with pytest.raises(ModelNotReady, match="shutting down"):
        await waiting
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
