"""Closed-loop load from client processes: C clients, each sending a request and waiting for its
answer, in a loop.

`run_load()` starts `processes` client processes (`python -m service.tools.loadgen`, C split between
them), so that the load generator's own GIL never caps what the server is measured at. Each
client process connects, fetches the model's metadata, builds its requests, says "ready" on
stdout and waits for a line on stdin; `run_load()` starts them all at once. Each client runs
`warmup_s` unmeasured seconds, then measures the calls it starts in the next `duration_s`, and
goes on past that until it has started at least `min_requests` measured calls, so that a slow or
busy machine gives fewer figures, never none. Each process prints, as JSON, its latencies, its
measured window (CLOCK_MONOTONIC, common to all processes) and its own CPU time over that
window; `run_load()` divides by the union of the windows, and reads the CPU time of the server
process, when given, from /proc/PID/stat over the same span.

Used by `python -m service.tools.bench`; kept apart from the benchmark's server management.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from service._proto import classification_pb2 as cls_pb2
from service._proto import classification_pb2_grpc as cls_grpc
from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc

READY = "ready"
CLIENT_START_TIMEOUT_S = 120.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass
class LoadResult:
    """One load level's figures. CPU times are core-seconds over the measured window (None
    where /proc is not there, or no server process was given)."""

    label: str
    concurrency: int
    images_per_request: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None
    first_error: str = ""
    mean_batch: float | None = None  # items per batch in the server (when it tells)

    @property
    def server_cpu_us_per_request(self) -> float | None:
        return _per_request_us(self.server_cpu_s, self.requests)

    @property
    def client_cpu_us_per_request(self) -> float | None:
        return _per_request_us(self.client_cpu_s, self.requests)


def _per_request_us(cpu_s: float | None, requests: int) -> float | None:
    if cpu_s is None or requests == 0:
        return None
    return 1e6 * cpu_s / requests


def _percentiles(latencies: Sequence[float]) -> tuple[float, float, float]:
    if not latencies:
        return (float("nan"),) * 3
    p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 90, 99])
    return float(p50), float(p90), float(p99)


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads), from /proc/PID/stat; None
    when it cannot be read (not Linux, or the process is gone)."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def stat_cpu_seconds(stat_file: Path) -> float | None:
    """User + system CPU time from a /proc `stat` file (a process's, or a thread's under
    /proc/PID/task/TID); None when it cannot be read."""
    try:
        stat = stat_file.read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS_PER_S


def _cpu_total(pids: Sequence[int]) -> float | None:
    readings = [cpu_seconds(pid) for pid in pids]
    if any(r is None for r in readings):
        return None
    return sum(r for r in readings if r is not None)


def _split(concurrency: int, processes: int) -> list[int]:
    """C clients over at most `processes` processes, as evenly as possible."""
    processes = max(1, min(processes, concurrency))
    return [concurrency // processes + (i < concurrency % processes) for i in range(processes)]


def run_load(
    address: str,
    model: str,
    concurrency: int,
    images_per_request: int,
    duration_s: float,
    warmup_s: float,
    rpc: str,
    label: str,
    *,
    processes: int = 1,
    server_pid: int | None = None,
    min_requests: int = 1,
) -> LoadResult:
    """C closed-loop clients in `processes` client processes: warmup, then a measured window of
    at least `duration_s` in which each client starts at least `min_requests` calls."""
    if min_requests < 1:
        raise ValueError(f"min_requests must be at least 1, got {min_requests}")
    clients = []
    for share in _split(concurrency, processes):
        command = [
            sys.executable, "-m", "service.tools.loadgen", "--address", address, "--model", model,
            "--concurrency", str(share), "--images-per-request", str(images_per_request),
            "--duration", str(duration_s), "--warmup", str(warmup_s), "--rpc", rpc,
            "--min-requests", str(min_requests),
        ]  # fmt: skip
        clients.append(
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    servers = [server_pid] if server_pid is not None else []
    try:
        for client in clients:
            _wait_ready(client)
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        time.sleep(warmup_s)
        server_before = _cpu_total(servers)
        reports = []
        for client in clients:
            # Past the window, each client makes at most `min_requests` calls of <= 60 s each.
            output, _ = client.communicate(timeout=duration_s + 60 * (min_requests + 2))
            if client.returncode != 0:
                raise RuntimeError(f"load client exited with {client.returncode}")
            reports.append(json.loads(output))
        server_after = _cpu_total(servers)
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    latencies = [latency for report in reports for latency in report["latencies_s"]]
    window_s = max(r["window_end"] for r in reports) - min(r["window_start"] for r in reports)
    p50, p90, p99 = _percentiles(latencies)
    return LoadResult(
        label,
        concurrency,
        images_per_request,
        len(latencies),
        sum(report["errors"] for report in reports),
        len(latencies) * images_per_request / window_s,
        p50,
        p90,
        p99,
        _difference(server_before, server_after) if servers else None,
        sum(report["cpu_s"] for report in reports),
        next((r["first_error"] for r in reports if r["first_error"]), ""),
    )


def _difference(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _wait_ready(client: subprocess.Popen[str]) -> None:
    assert client.stdout is not None
    line = client.stdout.readline()  # a client that cannot connect exits: an empty line
    if line.strip() != READY:
        client.wait(timeout=CLIENT_START_TIMEOUT_S)
        raise RuntimeError(f"load client did not start (exit status {client.returncode})")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def closed_loop(
    address: str,
    model: str,
    concurrency: int,
    images_per_request: int,
    duration_s: float,
    warmup_s: float,
    rpc: str,
    min_requests: int = 1,
) -> dict[str, Any]:
    """One client process's load: says READY, waits for a line on stdin, then runs."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        infer_stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = await infer_stub.ModelMetadata(
            pb2.ModelMetadataRequest(name=model), wait_for_ready=True, timeout=60
        )
        shape = [images_per_request, *(int(d) for d in meta.inputs[0].shape[1:])]
        rng = np.random.default_rng(os.getpid())
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
        print(READY, flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        start = loop.time()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
        latencies: list[float] = []
        errors = 0
        first_error = ""
        cpu_at_start: list[float] = []

        async def mark_start() -> None:
            await asyncio.sleep(warmup_s)
            cpu_at_start.append(_own_cpu_seconds())

        async def client(index: int) -> None:
            nonlocal errors, first_error
            i, measured = index, 0
            while (now := loop.time()) < stop_at or measured < min_requests:
                counted = now >= measure_from
                measured += counted
                try:
                    await call(requests[i % len(requests)], timeout=60)
                except grpc.RpcError as error:
                    errors += 1
                    first_error = first_error or f"{error.code().name}: {error.details()}"
                    continue
                if counted:
                    latencies.append(loop.time() - now)
                i += 1

        await asyncio.gather(mark_start(), *(client(i) for i in range(concurrency)))
        window_end, cpu_at_end = loop.time(), _own_cpu_seconds()
    return {
        "latencies_s": latencies,
        "errors": errors,
        "first_error": first_error,
        "window_start": measure_from,
        "window_end": window_end,
        "cpu_s": cpu_at_end - cpu_at_start[0],
    }


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    image = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """One client process: `python -m service.tools.loadgen --address HOST:PORT --model NAME ...`,
    started by `run_load()` (see the module docstring for the stdin/stdout protocol)."""
    parser = argparse.ArgumentParser(prog="python -m service.tools.loadgen", description=__doc__)
    add = parser.add_argument
    add("--address", required=True)
    add("--model", default="")
    add("--concurrency", type=int, default=1)
    add("--images-per-request", type=int, default=1)
    add("--duration", type=float, default=10.0)
    add("--warmup", type=float, default=2.0)
    add("--rpc", choices=("infer", "classify"), default="infer")
    add("--min-requests", type=int, default=1, help="measured calls per client, at least")
    args = parser.parse_args(argv)
    report = asyncio.run(
        closed_loop(
            args.address,
            args.model,
            args.concurrency,
            args.images_per_request,
            args.duration,
            args.warmup,
            args.rpc,
            args.min_requests,
        )
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
