"""Per model version counters in Triton's terms (ModelStatistics), from what is measured anyway.

Triton's meaning, kept here: `inference_count` counts items (images, batch rows) computed,
`execution_count` the batches run; `success` and `fail` count requests with their receipt-to-
reply durations; `queue` the time each request waited for its batch; `compute_input` the
request's conversion before the queue, `compute_infer` the run of the batch it was in (each
request of a batch counts the batch's whole run, as in Triton), `compute_output` the encoding
of its answer. The four per-request durations are added together when the request is answered,
so their counts are always equal (perf_analyzer checks that). `batch_stats` has one entry per
batch size: how many batches of that size ran and their run time. Durations are cumulative
nanoseconds. Everything runs on the event loop's thread: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.batcher import RequestTiming


@dataclass
class Duration:
    """A count and the cumulative time of what it counts, in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStatistics:
    """One loaded version's counters since it was loaded."""

    clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)

    def answered(self, ok: bool, latency_s: float) -> None:
        (self.success if ok else self.fail).add(latency_s)

    def computed(self, timing: RequestTiming) -> None:
        """One request computed: its four durations, together."""
        self.compute_input.add(timing.input_s)
        self.queue.add(timing.queue_s)
        self.compute_infer.add(timing.compute_s)
        self.compute_output.add(timing.output_s)

    def batch_finished(self, size: int, compute_s: float, ok: bool) -> None:
        if not ok:
            return
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = self.clock_ms()
        batches = self.batches.get(size)
        if batches is None:
            batches = self.batches[size] = Duration()
        batches.add(compute_s)
