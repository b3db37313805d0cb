"""Gates that put the order of events in the test's hands, whatever the machine's speed.

`BatchGate` wraps a model's batch runner (`InferenceServer(wrap_run=...)`): every batch that
reaches it waits until the test calls `open()`. While it is shut the test can fill the queue,
let deadlines pass, or start a drain, and know exactly which requests are computing (the
first batch, at the gate) and which wait in the queue. Thread-safe: the server runs on its
own event loop in another thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np

from service.engine.batcher import RunBatch


class BatchGate:
    """Holds every batch until open(); counts the batches that reached it."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.arrived: list[int] = []  # sizes of the batches that reached the gate, in order

    def wrap(self, run: RunBatch) -> RunBatch:
        async def gated(items: np.ndarray) -> np.ndarray:
            with self._lock:
                self.arrived.append(len(items))
            if not self._open.is_set():
                await asyncio.to_thread(self._open.wait)
            return await run(items)

        return gated

    def open(self) -> None:
        self._open.set()

    def wait_arrived(self, batches: int) -> None:
        """Waits until `batches` batches have reached the gate."""
        wait_until(lambda: len(self.arrived) >= batches, f"{batches} batches at the gate")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Polls observable state until `condition()` holds; fails after `timeout_s` (a bound on
    a hang, never a margin the test relies on)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class FrozenClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock stands still, as uvloop's whole milliseconds do over a short run:
    code that must not read the loop's clock is shown not to."""

    def time(self) -> float:
        return 0.0
