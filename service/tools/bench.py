"""Closed-loop benchmark of convserve servers, next to in-process ONNX Runtime figures.

Issue 11's table in one run (docs/benchmark.md; `make bench-table` builds the two models first):
    python -m service.tools.bench --table --model-repository bench_repository \
        --large-model resnet18 --small-model small_cnn --duration 8 --warmup 2

Against a running server:
    python -m service.tools.bench --address 127.0.0.1:8001 --model mnist_cnn --concurrency 1 16 64

Or let it start the servers itself, one per max batch size, to compare batching on and off
(the in-process figures need --model-repository):
    python -m service.tools.bench --model-repository model_repository --model mnist_cnn \
        --server-max-batch-size 1 32 --concurrency 1 64 --duration 10

Each concurrency level runs C clients, in --client-processes separate processes, that each send
a request and wait for its answer, again and again, for --duration seconds after --warmup
seconds. The tables give images/s, latency percentiles, and the CPU time per request of the
server and of the client processes over the measured window; the in-process rows give ONNX
Runtime alone at each batch size, the ceiling the server approaches. --table also starts
`python -m service.tools.reference_server` (ONNX Runtime called inline in the gRPC handler: the
naive baseline) and prints every case of the table with its ratio and goal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.engine.runtime import OnnxModel, RuntimeOptions
from service.repository.disk import ModelRepository
from service.tools.loadgen import LoadResult, run_load

SERVER_START_TIMEOUT_S = 300.0


def in_process(
    repository: Path,
    model: str,
    batch_sizes: Sequence[int],
    seconds: float,
    options: RuntimeOptions,
    shape: list[int] | None = None,
) -> list[tuple[int, float]]:
    """ONNX Runtime alone: images/s at each batch size, same settings as the server (the
    model's input shape, C x H x W, is appended to `shape` when given)."""
    entry = next(e for e in ModelRepository(repository).scan() if e.name == model)
    assert entry.version is not None
    runtime = OnnxModel.load(entry.name, entry.version, entry.model_path, options)
    if shape is not None:
        shape.extend(runtime.spec.input_shape)
    figures = []
    rng = np.random.default_rng(0)
    for size in batch_sizes:
        images = rng.integers(0, 256, size=(size, *runtime.spec.input_shape), dtype=np.uint8)
        runtime.run_blocking(images)
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or done == 0:
            runtime.run_blocking(images)
            done += size
        figures.append((size, done / elapsed))
    runtime.close()
    return figures


@contextmanager
def one_model_repository(repository: Path, model: str) -> Iterator[Path]:
    """A temporary repository holding only `model` (hard links where possible), so that a
    spawned server loads and warms nothing else."""
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        view = Path(directory) / "repository"
        view.mkdir()
        shutil.copytree(repository / model, view / model, copy_function=_link_or_copy)
        yield view


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@dataclass
class Spawned:
    """A server process started by the benchmark, serving at `address`."""

    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int | None


@contextmanager
def spawned(command: Sequence[str]) -> Iterator[Spawned]:
    """Runs a server (`command` gets --port-file) until the block ends; yields it once it has
    written its port file (once its models are loaded)."""
    with tempfile.TemporaryDirectory(prefix="bench-ports-") as directory:
        port_file = Path(directory) / "ports.json"
        process = subprocess.Popen([*command, "--port-file", str(port_file)])
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while not port_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {' '.join(command)}")
                time.sleep(0.1)
            ports = json.loads(port_file.read_text())
            yield Spawned(process, f"127.0.0.1:{ports['grpc_port']}", ports.get("metrics_port"))
        finally:
            process.terminate()
            process.wait(timeout=60)


def batch_totals(server: Spawned | None, model: str) -> tuple[float, float] | None:
    """The server's convserve_batch_size sum and count for `model` (None without metrics)."""
    if server is None or server.metrics_port is None:
        return None
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    totals = {"convserve_batch_size_sum": 0.0, "convserve_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model") == model:
                totals[sample.name] += sample.value
    return totals["convserve_batch_size_sum"], totals["convserve_batch_size_count"]


def server_command(repository: Path, extra: Sequence[str]) -> list[str]:
    """`python -m service` on free ports, quiet."""
    return [
        sys.executable, "-m", "service", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def reference_command(repository: Path, model: str, extra: Sequence[str]) -> list[str]:
    """`python -m service.tools.reference_server` on a free port."""
    return [
        sys.executable, "-m", "service.tools.reference_server",
        "--model-repository", str(repository), "--model", model, *extra,
    ]  # fmt: skip


def figure(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: Sequence[LoadResult]) -> None:
    print(
        f"{'server':<22}{'conc':>6}{'img/req':>8}{'requests':>10}{'errors':>8}"
        f"{'images/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'srv cpu us/req':>16}{'cli cpu us/req':>16}{'mean batch':>12}"
    )
    for r in results:
        print(
            f"{r.label:<22}{r.concurrency:>6}{r.images_per_request:>8}{r.requests:>10}"
            f"{r.errors:>8}{r.images_per_s:>11.1f}{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}"
            f"{r.p99_ms:>9.2f}{figure(r.server_cpu_us_per_request):>16}"
            f"{figure(r.client_cpu_us_per_request):>16}{figure(r.mean_batch, 1):>12}"
        )
        if r.errors:
            print(f"  {r.errors} errors, the first: {r.first_error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--table", action="store_true", help="issue 11's table (needs --model-repository)")
    add("--large-model", default="resnet18", help="--table: the resnet18 cases' model")
    add("--small-model", default="small_cnn", help="--table: the small CNN cases' model")
    add("--address", help="benchmark this running server (else spawn one per max batch size)")
    add("--model-repository", type=Path, help="repository for spawned servers and in-process runs")
    add("--model", default="", help="model name (default: the repository's first model)")
    add(
        "--server-max-batch-size",
        type=int,
        nargs="+",
        default=[32],
        help="spawned servers: one run per value, e.g. 1 32 (default: 32; --table: the "
        "server's default)",
    )
    add(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for spawned servers, e.g. --server-arg=--max-queue-delay-us=500",
    )
    add(
        "--reference-arg",
        action="append",
        default=[],
        help="--table: extra flag for the reference server, e.g. "
        "--reference-arg=--intra-op-spinning=on",
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
    add("--client-processes", type=int, default=1, help="processes the C clients are split over")
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
        help="batch sizes for the in-process figures; none: skip them (not with --table)",
    )
    add("--json", type=Path, help="also write every figure to this JSON file")
    return parser


def measure(
    args: argparse.Namespace,
    label: str,
    address: str,
    model: str,
    concurrency: int,
    images_per_request: int,
    server: Spawned | None,
) -> LoadResult:
    """One load level, with the server's CPU and mean batch size when it was spawned here."""
    before = batch_totals(server, model)
    result = run_load(
        address, model, concurrency, images_per_request, args.duration, args.warmup, args.rpc,
        label, processes=args.client_processes,
        server_pid=None if server is None else server.process.pid,
    )  # fmt: skip
    after = batch_totals(server, model)
    if before is not None and after is not None and after[1] > before[1]:
        result.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    return result


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(providers=args.providers, intra_op_threads=args.intra_op_threads)


def run_json(result: LoadResult) -> dict[str, object]:
    return {
        **asdict(result),
        "server_cpu_us_per_request": result.server_cpu_us_per_request,
        "client_cpu_us_per_request": result.client_cpu_us_per_request,
    }


def print_speedups(results: Sequence[LoadResult]) -> None:
    baseline = {r.concurrency: r for r in results if r.label == "max_batch_size=1"}
    for r in results:
        base = baseline.get(r.concurrency)
        if base is not None and r is not base and base.images_per_s > 0:
            print(
                f"  {r.label} c={r.concurrency}: {r.images_per_s / base.images_per_s:.2f}x "
                "the images/s of max_batch_size=1"
            )


def run_levels(args: argparse.Namespace, model: str) -> int:
    """The concurrency levels against a running server, or one spawned per max batch size."""
    results: list[LoadResult] = []
    if args.address:
        for concurrency in args.concurrency:
            level = (model, concurrency, args.images_per_request)
            results.append(measure(args, args.address, args.address, *level, None))
    else:
        flags = ["--providers", args.providers, "--intra-op-threads", str(args.intra_op_threads)]
        with one_model_repository(args.model_repository, model) as repository:
            for size in args.server_max_batch_size:
                extra = [*flags, "--max-batch-size", str(size), *args.server_arg]
                label = f"max_batch_size={size}"
                with spawned(server_command(repository, extra)) as server:
                    for concurrency in args.concurrency:
                        load = (server.address, model, concurrency, args.images_per_request, server)
                        results.append(measure(args, label, *load))
    print_table(results)
    print_speedups(results)
    figures: list[tuple[int, float]] = []
    if args.model_repository is not None and args.in_process_batch_sizes:
        seconds = min(args.duration, 5.0)
        figures = in_process(
            args.model_repository, model, args.in_process_batch_sizes, seconds,
            runtime_options(args),
        )  # fmt: skip
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
        report = {"load": [run_json(r) for r in results], "in_process": figures}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m service.tools.bench`."""
    args = build_parser().parse_args(argv)
    if args.table:
        if args.model_repository is None or not args.in_process_batch_sizes:
            raise SystemExit("--table needs --model-repository and in-process batch sizes")
        from service.tools.bench_table import run_table  # the table mode imports this module

        return run_table(args)
    if args.address is None and args.model_repository is None:
        raise SystemExit("give --address (a running server) or --model-repository (spawn servers)")
    model = args.model
    if not model and args.model_repository is not None:
        model = ModelRepository(args.model_repository).scan()[0].name
    return run_levels(args, model)


if __name__ == "__main__":
    raise SystemExit(main())
