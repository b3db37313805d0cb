"""Issue 11's table: the server against an inline reference server and ONNX Runtime alone.

    python -m service.tools.bench --table --model-repository bench_repository \
        --large-model resnet18 --small-model small_cnn --duration 8 --warmup 2

(`make bench-table` builds the two models first; docs/benchmark.md shows a run.) Model by
model: ONNX Runtime alone at each batch size (the ceiling), then every load of the table
against `python -m service`, then against `python -m service.tools.reference_server`, one server
process at a time; then each case with its ratio, its goal and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.engine.runtime import RuntimeOptions
from service.settings import Settings
from service.tools.bench import (
    figure,
    in_process,
    measure,
    one_model_repository,
    reference_command,
    run_json,
    runtime_options,
    server_command,
    spawned,
)
from service.tools.loadgen import LoadResult

SERVER = "convserve"
REFERENCE = "reference"


@dataclass(frozen=True)
class Case:
    """One row of issue 11's table: a load, and what its ratio must reach."""

    role: str  # "large" (resnet18) or "small" (the default CNN)
    concurrency: int
    images_per_request: int
    measure: str  # "p50": latency vs reference; "ceiling": img/s share; "throughput": vs reference
    goal: float


CASES = (
    Case("large", 1, 1, "p50", 1.05),
    Case("small", 1, 1, "p50", 1.05),
    Case("large", 64, 1, "ceiling", 0.60),
    Case("large", 16, 8, "ceiling", 0.85),
    Case("small", 64, 1, "throughput", 1.5),
    Case("small", 16, 8, "throughput", 1.25),
    # Not in the table: its title's "never slower than a naive server at any load", at
    # a load where batching has little to gather (four clients).
    Case("large", 4, 1, "throughput", 1.0),
    Case("small", 4, 1, "throughput", 1.0),
)
MEASURES = {
    "p50": "p50 vs the inline reference",
    "ceiling": "img/s as a share of the in-process best-batch ceiling",
    "throughput": "img/s vs the inline reference",
}


@dataclass
class CaseResult:
    """A case with the figures it was judged on."""

    title: str
    measure: str
    ratio: float
    goal: float
    met: bool
    server: LoadResult
    reference: LoadResult
    ceiling_images_per_s: float
    ceiling_batch: int
    batch1_ms: float


def judge(
    title: str,
    case: Case,
    server: LoadResult,
    reference: LoadResult,
    in_process: Sequence[tuple[int, float]],
) -> CaseResult:
    """The case's ratio (server p50 / reference p50, server img/s / ceiling, or server img/s /
    reference img/s) and whether it meets the goal (<= goal for latency, >= for the others)."""
    best_batch, best = max(in_process, key=lambda f: f[1])
    batch1 = dict(in_process).get(1, float("nan"))
    if case.measure == "p50":
        ratio = server.p50_ms / reference.p50_ms
        met = ratio <= case.goal
    else:
        base = best if case.measure == "ceiling" else reference.images_per_s
        ratio = server.images_per_s / base if base > 0 else float("nan")
        met = ratio >= case.goal
    return CaseResult(
        title, case.measure, ratio, case.goal, met, server, reference, best,
        best_batch, 1000 / batch1,
    )  # fmt: skip


def print_cases(cases: Sequence[CaseResult]) -> None:
    """Issue 11's table: each case with its ratio and goal, next to the ceiling."""
    print(
        "| case | convserve | reference | in-process ceiling | ratio | goal | met |\n"
        "|---|---:|---:|---:|---:|---:|---|"
    )
    for c in cases:
        if c.measure == "p50":
            figures = f"{c.server.p50_ms:.2f} ms | {c.reference.p50_ms:.2f} ms"
            ceiling = f"{c.batch1_ms:.2f} ms a batch of 1"
            ratio, goal = f"{c.ratio:.2f}x", f"<= {c.goal:.2f}x"
        else:
            figures = f"{c.server.images_per_s:.0f} img/s | {c.reference.images_per_s:.0f} img/s"
            ceiling = f"{c.ceiling_images_per_s:.0f} img/s (batch {c.ceiling_batch})"
            if c.measure == "ceiling":
                ratio, goal = f"{100 * c.ratio:.0f}%", f">= {100 * c.goal:.0f}%"
            else:
                ratio, goal = f"{c.ratio:.2f}x", f">= {c.goal:.2f}x"
        verdict = "yes" if c.met else "**no**"
        print(f"| {c.title} | {figures} | {ceiling} | {ratio} | {goal} | {verdict} |")


def print_runs(results: Sequence[LoadResult]) -> None:
    """Every load run of the table, with latency and CPU figures."""
    print(
        "| run | C | B | img/s | p50 ms | p99 ms | server CPU µs/req | client CPU µs/req "
        "| mean batch | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in results:
        print(
            f"| {r.label} | {r.concurrency} | {r.images_per_request} | {r.images_per_s:.0f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {figure(r.server_cpu_us_per_request)} | "
            f"{figure(r.client_cpu_us_per_request)} | {figure(r.mean_batch, 1)} | {r.errors} |"
        )


def print_in_process(model: str, figures: Sequence[tuple[int, float]]) -> None:
    cells = ", ".join(f"{size}: {rate:.0f}" for size, rate in figures)
    print(f"in-process ONNX Runtime, {model}, images/s by batch size: {cells}")


def print_machine(options: RuntimeOptions, args: argparse.Namespace) -> None:
    import grpc
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu}); Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, grpcio {grpc.__version__}, "
        f"numpy {np.__version__}; ONNX Runtime: providers {options.providers}, "
        f"intra-op threads {options.intra_op_threads or 'one a core'}"
    )
    defaults = Settings()
    server_defaults = (
        f"its defaults (event loop {defaults.event_loop}, {defaults.call_takers} call takers, "
        f"batch slots {defaults.max_concurrent_batches or 'auto'})"
    )
    print(
        f"server flags: {' '.join(args.server_arg) or server_defaults}; "
        f"reference flags: {' '.join(args.reference_arg) or 'its defaults (event loop asyncio)'}"
    )


@dataclass
class ModelFigures:
    """One model's figures in the table: its in-process ceiling and its load runs."""

    model: str
    shape: list[int]
    in_process: list[tuple[int, float]]
    runs: dict[tuple[str, int, int], LoadResult]  # (server kind, C, B) -> figures


def measure_model(
    args: argparse.Namespace, model: str, loads: Sequence[tuple[int, int]]
) -> ModelFigures:
    """ONNX Runtime alone, then each load (C, B) against the server, then against the
    reference: one server process at a time, on a repository holding only `model`."""
    options = runtime_options(args)
    flags = ["--providers", args.providers, "--intra-op-threads", str(args.intra_op_threads)]
    with one_model_repository(args.model_repository, model) as repository:
        shape: list[int] = []
        seconds = min(args.duration, 5.0)
        ceiling = in_process(
            repository, model, args.in_process_batch_sizes, seconds, options, shape
        )
        print_in_process(model, ceiling)
        figures = ModelFigures(model, shape, ceiling, {})
        commands = {
            SERVER: server_command(repository, flags + args.server_arg),
            REFERENCE: reference_command(repository, model, flags + args.reference_arg),
        }
        for kind, command in commands.items():
            with spawned(command) as server:
                for concurrency, images in loads:
                    load = (server.address, model, concurrency, images, server)
                    figures.runs[(kind, concurrency, images)] = measure(
                        args, f"{kind} {model}", *load
                    )
    return figures


def run_table(args: argparse.Namespace) -> int:
    """Every case of issue 11's table, model by model, each server alone on the machine."""
    print_machine(runtime_options(args), args)
    models: dict[str, ModelFigures] = {}
    for role, model in (("large", args.large_model), ("small", args.small_model)):
        loads = sorted({(c.concurrency, c.images_per_request) for c in CASES if c.role == role})
        models[role] = measure_model(args, model, loads)
    cases = []
    for case in CASES:
        figures = models[case.role]
        load = (case.concurrency, case.images_per_request)
        title = (
            f"{figures.model} {'x'.join(map(str, figures.shape))}, C={case.concurrency}, "
            f"B={case.images_per_request}: {MEASURES[case.measure]}"
        )
        server, reference = figures.runs[(SERVER, *load)], figures.runs[(REFERENCE, *load)]
        cases.append(judge(title, case, server, reference, figures.in_process))
    runs = [run for figures in models.values() for run in figures.runs.values()]
    print()
    print_cases(cases)
    print()
    print_runs(runs)
    for figures in models.values():
        print_in_process(figures.model, figures.in_process)
    if args.json is not None:
        report = {
            "cases": [asdict(c) for c in cases],
            "runs": [run_json(r) for r in runs],
            "in_process": {f.model: f.in_process for f in models.values()},
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0
