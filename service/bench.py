"""Closed-loop load generator for a convserve server, next to in-process ONNX Runtime figures.

Against a running server:
    python -m service.bench --address 127.0.0.1:8001 --model mnist_cnn --concurrency 1 16 64

Or let it start the servers itself, one per max batch size, to compare batching on and off
(the in-process figures need --model-repository):
    python -m service.bench --model-repository model_repository --model mnist_cnn \
        --server-max-batch-size 1 32 --concurrency 1 64 --duration 10

Each concurrency level runs C clients that each send a request and wait for its answer, again
and again, for --duration seconds after --warmup seconds. The table gives images/s and latency
percentiles; the in-process rows give ONNX Runtime alone at batch 1 and at its best batch size,
the ceiling the server approaches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from service.loadgen import LoadResult, run_load
from service.repository import ModelRepository
from service.runtime import OnnxModel, RuntimeOptions


def in_process(
    repository: Path,
    model: str,
    batch_sizes: Sequence[int],
    seconds: float,
    options: RuntimeOptions,
) -> list[tuple[int, float]]:
    """ONNX Runtime alone: images/s at each batch size, same settings as the server."""
    entry = next(e for e in ModelRepository(repository).scan() if e.name == model)
    assert entry.version is not None
    runtime = OnnxModel.load(entry.name, entry.version, entry.model_path, options)
    figures = []
    rng = np.random.default_rng(0)
    for size in batch_sizes:
        images = rng.integers(0, 256, size=(size, *runtime.spec.input_shape), dtype=np.uint8)
        runtime.run_blocking(images)
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            runtime.run_blocking(images)
            done += size
        figures.append((size, done / elapsed))
    runtime.close()
    return figures


def spawn_server(
    repository: Path, max_batch_size: int, extra: Sequence[str]
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts `python -m service` on free ports; returns the process and its address."""
    port_file = Path(tempfile.mkdtemp()) / "ports.json"
    command = [
        sys.executable,
        "-m",
        "service",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--port-file",
        str(port_file),
        "--max-batch-size",
        str(max_batch_size),
        "--log-level",
        "WARNING",
        *extra,
    ]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {' '.join(command)}")
        time.sleep(0.1)
    return process, f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"


def print_table(results: Sequence[LoadResult]) -> None:
    print(
        f"{'server':<22}{'conc':>6}{'img/req':>8}{'requests':>10}{'errors':>8}"
        f"{'images/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    )
    for r in results:
        print(
            f"{r.label:<22}{r.concurrency:>6}{r.images_per_request:>8}{r.requests:>10}"
            f"{r.errors:>8}{r.images_per_s:>11.1f}{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}"
            f"{r.p99_ms:>9.2f}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--address", help="benchmark this running server (else spawn one per max batch size)")
    add("--model-repository", type=Path, help="repository for spawned servers and in-process runs")
    add("--model", default="", help="model name (default: the repository's first model)")
    add(
        "--server-max-batch-size",
        type=int,
        nargs="+",
        default=[32],
        help="spawned servers: one run per value, e.g. 1 32 (default: 32)",
    )
    add(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for spawned servers, e.g. --server-arg=--max-queue-delay-us=500",
    )
    add(
        "--providers",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="ONNX Runtime providers, for spawned servers and in-process runs",
    )
    add("--intra-op-threads", type=int, default=0, help="same: ONNX Runtime intra-op threads")
    add("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="clients per level")
    add("--images-per-request", type=int, default=1)
    add("--duration", type=float, default=10.0, help="measured seconds per level")
    add("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    add(
        "--rpc",
        choices=("infer", "classify"),
        default="infer",
        help="ModelInfer with raw tensors, or Classify with PNG bytes",
    )
    add(
        "--in-process-batch-sizes",
        type=int,
        nargs="*",
        default=[1, 2, 4, 8, 16, 32, 64],
        help="batch sizes for the in-process figures; none: skip them",
    )
    add("--json", type=Path, help="also write every figure to this JSON file")
    return parser


def run_levels(label: str, address: str, model: str, args: argparse.Namespace) -> list[LoadResult]:
    return [
        asyncio.run(
            run_load(
                address,
                model,
                concurrency,
                args.images_per_request,
                args.duration,
                args.warmup,
                args.rpc,
                label,
            )
        )
        for concurrency in args.concurrency
    ]


def print_speedups(results: Sequence[LoadResult]) -> None:
    baseline = {r.concurrency: r for r in results if r.label == "max_batch_size=1"}
    for r in results:
        base = baseline.get(r.concurrency)
        if base is not None and r is not base and base.images_per_s > 0:
            print(
                f"  {r.label} c={r.concurrency}: {r.images_per_s / base.images_per_s:.2f}x "
                "the images/s of max_batch_size=1"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m service.bench`."""
    args = build_parser().parse_args(argv)
    if args.address is None and args.model_repository is None:
        raise SystemExit("give --address (a running server) or --model-repository (spawn servers)")
    model = args.model
    if not model and args.model_repository is not None:
        model = ModelRepository(args.model_repository).scan()[0].name
    results: list[LoadResult] = []
    if args.address:
        results += run_levels(args.address, args.address, model, args)
    else:
        flags = ["--providers", args.providers, "--intra-op-threads", str(args.intra_op_threads)]
        for size in args.server_max_batch_size:
            process, address = spawn_server(args.model_repository, size, flags + args.server_arg)
            try:
                results += run_levels(f"max_batch_size={size}", address, model, args)
            finally:
                process.terminate()
                process.wait(timeout=60)
    print_table(results)
    print_speedups(results)
    figures: list[tuple[int, float]] = []
    if args.model_repository is not None and args.in_process_batch_sizes:
        options = RuntimeOptions(providers=args.providers, intra_op_threads=args.intra_op_threads)
        seconds = min(args.duration, 5.0)
        figures = in_process(
            args.model_repository, model, args.in_process_batch_sizes, seconds, options
        )
        best = max(figures, key=lambda f: f[1])
        print(
            f"\nin-process ONNX Runtime, {model}: batch 1 {figures[0][1]:.1f} images/s, "
            f"best batch {best[0]} {best[1]:.1f} images/s"
        )
        for size, rate in figures:
            print(f"  batch {size:>4}: {rate:10.1f} images/s")
        for r in results:
            share = 100 * r.images_per_s / best[1]
            print(f"  {r.label} c={r.concurrency}: {share:.0f}% of that ceiling")
    if args.json is not None:
        report = {"load": [asdict(r) for r in results], "in_process": figures}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
