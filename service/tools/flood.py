"""A flood of expired calls beside normal clients: what the flood costs them, per server setting.

    python -m service.tools.flood --model-repository bench_repository --model small_cnn \
        --rounds 3 --seconds 4 --server-arg=--call-takers=0 --server-arg=--call-takers=64

For each round and each server variant (one `--server-arg` each, alternated within a round; no
`--server-arg` runs the server's defaults), a fresh server is spawned and 16 normal clients
(closed loop, one image a call, 60 s deadline) run `--seconds` alone, then as long again beside
a second process that floods the server with calls whose deadline is 1 ms (64 at a time, each
retried at once). With `--aim elsewhere` the flood goes to a second server process instead:
the same CPU taken on the machine, nothing shared with the measured server; the difference
between the two is what sharing the server with the flood costs (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

import grpc
import numpy as np

from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.tools import bench

NORMAL_CLIENTS = 16
FLOOD_CALLS = 64
FLOOD_DEADLINE_S = 0.001


@dataclass(frozen=True)
class Outcome:
    """The normal clients' answers over one window."""

    answers_per_s: float
    p99_ms: float
    codes: dict[str, int]


async def _request(channel: grpc.aio.Channel, model: str, seed: int) -> pb2.ModelInferRequest:
    stub = pb2_grpc.GRPCInferenceServiceStub(channel)
    meta = await stub.ModelMetadata(pb2.ModelMetadataRequest(name=model), timeout=60)
    shape = [1, *(int(d) for d in meta.inputs[0].shape[1:])]
    request = pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=meta.inputs[0].name, datatype="UINT8", shape=shape)
    images = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    request.raw_input_contents.append(images.tobytes())
    return request


async def _normal(address: str, model: str, seconds: float) -> Outcome:
    codes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        request = await _request(channel, model, seed=4)
        infer = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        started = time.perf_counter()
        stop_at = started + seconds

        async def client() -> None:
            while (sent := time.perf_counter()) < stop_at:
                try:
                    await infer(request, timeout=60)
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    continue
                codes["OK"] += 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(client() for _ in range(NORMAL_CLIENTS)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    return Outcome(codes["OK"] / elapsed, p99, dict(codes))


def _flood(address: str, model: str, ready: Event, stop: Event) -> None:
    """The flood's process: FLOOD_CALLS calls at a time, each retried at once, until `stop`."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            request = await _request(channel, model, seed=5)
            infer = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            async def flooder() -> None:
                while not stop.is_set():
                    with suppress(grpc.aio.AioRpcError):  # DEADLINE_EXCEEDED: the point
                        await infer(request, timeout=FLOOD_DEADLINE_S)

            ready.set()
            await asyncio.gather(*(flooder() for _ in range(FLOOD_CALLS)))

    asyncio.run(run())


@contextmanager
def flooding(address: str, model: str) -> Iterator[None]:
    """A second process floods `address` with expired calls of `model` until the block ends;
    the block starts once the flood has."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    flood = context.Process(target=_flood, args=(address, model, ready, stop), daemon=True)
    flood.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the flood did not start")
        yield
    finally:
        stop.set()
        flood.join(30)
        if flood.is_alive():
            flood.terminate()


def measure(
    repository: Path, model: str, server_args: Sequence[str], seconds: float, aim: str
) -> tuple[Outcome, Outcome]:
    """The normal clients alone, then beside the flood, on a fresh server."""
    command = bench.server_command(repository, ["--providers", "cpu", *server_args])
    with ExitStack() as servers:
        server = servers.enter_context(bench.spawned(command))
        target = server.address
        if aim == "elsewhere":
            target = servers.enter_context(bench.spawned(command)).address
        alone = asyncio.run(_normal(server.address, model, seconds))
        with flooding(target, model):
            beside = asyncio.run(_normal(server.address, model, seconds))
    return alone, beside


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.tools.flood",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="each window (alone, beside)")
    parser.add_argument("--aim", choices=("same", "elsewhere"), default="same")
    parser.add_argument(
        "--server-arg", action="append", default=[],
        help="one server variant's flags (space-separated); repeat for more variants",
    )  # fmt: skip
    args = parser.parse_args(argv)
    variants = args.server_arg or [""]
    shares: dict[str, list[float]] = {v: [] for v in variants}
    print(
        "| round | server flags | alone answers/s | beside the flood | share | p99 beside "
        "| codes beside |"
    )
    print("|---:|---|---:|---:|---:|---:|---|")
    with bench.one_model_repository(args.model_repository, args.model) as repository:
        for round_index in range(args.rounds):
            for variant in variants:
                alone, beside = measure(
                    repository, args.model, variant.split(), args.seconds, args.aim
                )
                share = beside.answers_per_s / alone.answers_per_s
                shares[variant].append(share)
                print(
                    f"| {round_index} | {variant or 'defaults'} | {alone.answers_per_s:,.0f} | "
                    f"{beside.answers_per_s:,.0f} | {share:.0%} | {beside.p99_ms:.1f} ms | "
                    f"{beside.codes} |",
                    flush=True,
                )
    for variant, values in shares.items():
        print(
            f"{variant or 'defaults'} (flood aimed at the {args.aim} server): median share "
            f"{statistics.median(values):.0%} of the lone rate over {len(values)} rounds"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
