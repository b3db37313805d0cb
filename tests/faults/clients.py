"""Client side of the fault suite: many concurrent calls, their outcomes, and figures."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from service._proto import classification_pb2 as cls_pb2
from service._proto import grpc_service_pb2 as pb2

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


@dataclass(frozen=True)
class Outcome:
    code: str
    details: str
    latency_s: float


@dataclass
class Outcomes:
    """Every call's outcome, with the figures a test prints."""

    items: list[Outcome] = field(default_factory=list)

    def add(self, code: str, details: str, latency_s: float) -> None:
        self.items.append(Outcome(code, details, latency_s))

    def codes(self) -> Counter[str]:
        return Counter(o.code for o in self.items)

    def percentiles_ms(self, code: str) -> tuple[float, float]:
        latencies = [o.latency_s for o in self.items if o.code == code]
        if not latencies:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
        return float(p50), float(p99)

    def summary(self) -> str:
        parts = []
        for code, count in sorted(self.codes().items()):
            p50, p99 = self.percentiles_ms(code)
            parts.append(f"{code} {count} (p50 {p50:.1f} ms, p99 {p99:.1f} ms)")
        return "; ".join(parts)


async def timed(call: Awaitable[object], outcomes: Outcomes) -> str:
    """Awaits one call and records its outcome; returns the code name."""
    started = time.perf_counter()
    try:
        await call
        code, details = "OK", ""
    except grpc.aio.AioRpcError as error:
        code, details = error.code().name, error.details() or ""
    outcomes.add(code, details, time.perf_counter() - started)
    return code


async def closed_loop(
    clients: int, rounds: int, make_call: Callable[[int], Awaitable[object]], outcomes: Outcomes
) -> None:
    """`clients` concurrent clients, each making `rounds` calls one after the other."""

    async def client(index: int) -> None:
        for round_ in range(rounds):
            await timed(make_call(index * rounds + round_), outcomes)

    await asyncio.gather(*(client(i) for i in range(clients)))


def images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 1, 28, 28), dtype=np.uint8)


def infer_request(array: np.ndarray, model: str = "tiny") -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.reshape(28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()


def classify_request(array: np.ndarray, model: str = "tiny") -> cls_pb2.ClassifyRequest:
    return cls_pb2.ClassifyRequest(model_name=model, images=[png(a) for a in array], top_k=3)
