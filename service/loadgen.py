"""Closed-loop load: C clients, each sending a request and waiting for its answer, in a loop.

Used by `python -m service.bench`; kept apart so the load itself can be reused (e.g. by tests)
without the benchmark's process management.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from PIL import Image

from service._proto import classification_pb2 as cls_pb2
from service._proto import classification_pb2_grpc as cls_grpc
from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc


@dataclass
class LoadResult:
    """One load level's figures."""

    label: str
    concurrency: int
    images_per_request: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return (float("nan"),) * 3
    p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 90, 99])
    return float(p50), float(p90), float(p99)


async def run_load(
    address: str,
    model: str,
    concurrency: int,
    images_per_request: int,
    duration_s: float,
    warmup_s: float,
    rpc: str,
    label: str,
) -> LoadResult:
    """C closed-loop clients for warmup + duration seconds; only the last `duration` counts."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        infer_stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = await infer_stub.ModelMetadata(pb2.ModelMetadataRequest(name=model))
        shape = [images_per_request, *(int(d) for d in meta.inputs[0].shape[1:])]
        rng = np.random.default_rng(0)
        pool = [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(16)]
        requests: list[Any]
        call: Any
        if rpc == "classify":
            stub = cls_grpc.ImageClassificationStub(channel)
            requests = [
                cls_pb2.ClassifyRequest(model_name=meta.name, images=[_png(x) for x in a])
                for a in pool
            ]
            call = stub.Classify
        else:
            requests = []
            for array in pool:
                request = pb2.ModelInferRequest(model_name=meta.name)
                request.inputs.add(name=meta.inputs[0].name, datatype="UINT8", shape=shape)
                request.raw_input_contents.append(array.tobytes())
                requests.append(request)
            call = infer_stub.ModelInfer
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
        latencies: list[float] = []
        errors = 0

        async def client(index: int) -> None:
            nonlocal errors
            i = index
            while (now := loop.time()) < stop_at:
                try:
                    await call(requests[i % len(requests)], timeout=60)
                except grpc.RpcError:
                    errors += 1
                    continue
                if now >= measure_from:
                    latencies.append(loop.time() - now)
                i += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    p50, p90, p99 = _percentiles(latencies)
    return LoadResult(
        label,
        concurrency,
        images_per_request,
        len(latencies),
        errors,
        len(latencies) * images_per_request / duration_s,
        p50,
        p90,
        p99,
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    image = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
