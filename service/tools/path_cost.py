"""What the path around ONNX Runtime costs a request: both servers on a model that costs nothing.

    python -m service.tools.path_cost --model-repository bench_repository --model small_cnn \
        --concurrency 1 4 64 --rounds 2

The model's "null" twin has the model's signature and metadata (input name, shape, uint8;
output [N, classes]) and a graph of a mean and a broadcast, so ONNX Runtime's run costs a few
µs: what one server spends per request more than the other is the path around the run. The
server (`python -m service`) and the inline reference (`service.tools.reference_server`) are
spawned on it in turn, each alone on the machine, one client process (the table's set-up,
docs/benchmark.md), and the CPU of each server thread is read from /proc over the measured
window: the event loop's thread, gRPC core's event-engine threads, and the others (gRPC's
poller thread, ONNX Runtime's threads). Compare within one run: absolute figures drift.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.repository.disk import MODEL_FILE, ModelRepository, read_metadata, spec_from_metadata
from service.repository.policy import BATCHING_KEYS, CONFIG_FILE
from service.tools import bench
from service.tools.loadgen import run_load, stat_cpu_seconds

THREAD_GROUPS = ("event loop", "gRPC core", "other")


def write_null_model(source_dir: Path, destination_dir: Path, name: str) -> None:
    """Writes a version directory beside nothing else: `source_dir`'s files and metadata with a
    graph that takes the same input and gives [N, classes] (the mean of each image, repeated)."""
    source = onnx.load(str(source_dir / MODEL_FILE))
    props = {p.key: p.value for p in source.metadata_props}
    spec = spec_from_metadata(name, 1, read_metadata(props, source_dir), source_dir)
    p = spec.preprocessing
    classes = len(spec.labels)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [p.input_name], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels", "axes"], ["mean"], keepdims=0),
            helper.make_node("Unsqueeze", ["mean", "column"], ["means"]),
            helper.make_node("Expand", ["means", "classes"], [p.output_name]),
        ],
        "null",
        [helper.make_tensor_value_info(p.input_name, TensorProto.UINT8, ["N", *spec.input_shape])],
        [helper.make_tensor_value_info(p.output_name, TensorProto.FLOAT, ["N", classes])],
        [
            numpy_helper.from_array(_int64s([1, 2, 3]), "axes"),
            numpy_helper.from_array(_int64s([1]), "column"),
            numpy_helper.from_array(_int64s([1, classes]), "classes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what the ONNX Runtime versions the project supports all read
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    destination_dir.mkdir(parents=True)
    for path in source_dir.iterdir():
        if path.is_file() and path.name != MODEL_FILE:
            shutil.copy2(path, destination_dir / path.name)
    onnx.save(model, str(destination_dir / MODEL_FILE))


def _int64s(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@contextmanager
def null_repository(repository: Path, model: str) -> Iterator[tuple[Path, str]]:
    """A temporary repository holding only the null twin of `model`'s served version."""
    entry = next((e for e in ModelRepository(repository).scan() if e.name == model), None)
    if entry is None or entry.version is None:
        raise SystemExit(f"no servable model {model!r} in {repository}")
    name = f"{model}_null"
    with tempfile.TemporaryDirectory(prefix="path-cost-") as directory:
        root = Path(directory)
        write_null_model(entry.model_path.parent, root / name / "1", name)
        config = entry.directory / CONFIG_FILE  # the model's batching, if it sets any
        if config.is_file():
            settings = json.loads(config.read_text())
            batching = {k: v for k, v in settings.items() if k in BATCHING_KEYS}
            (root / name / CONFIG_FILE).write_text(json.dumps(batching))  # one version: no policy
        yield root, name


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid` by thread group (see THREAD_GROUPS), from /proc."""
    totals = dict.fromkeys(THREAD_GROUPS, 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        seconds = stat_cpu_seconds(task / "stat")
        if seconds is None:
            continue
        if task.name == str(pid):
            group = "event loop"
        elif name.startswith(("event_engine", "grpc")):
            group = "gRPC core"
        else:
            group = "other"
        totals[group] += seconds
    return totals


@dataclass(frozen=True)
class PathCost:
    """One server at one load: throughput, p50 and CPU µs per request by thread group."""

    server: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    cpu_us: dict[str, float]

    @property
    def total_us(self) -> float:
        return sum(self.cpu_us.values())


def measure_server(
    command: Sequence[str], model: str, levels: Sequence[int], seconds: float, warmup_s: float
) -> Iterator[PathCost]:
    """Spawns `command` and measures it at each load."""
    label = "convserve" if "service.tools.reference_server" not in command else "reference"
    with bench.spawned(command) as server:
        pid = server.process.pid
        for concurrency in levels:
            run_load(server.address, model, concurrency, 1, warmup_s, 0.0, "infer", label)
            before = thread_cpu(pid)
            result = run_load(server.address, model, concurrency, 1, seconds, 0.0, "infer", label)
            after = thread_cpu(pid)
            requests = max(result.requests, 1)
            cpu_us = {g: 1e6 * (after[g] - before[g]) / requests for g in THREAD_GROUPS}
            yield PathCost(label, concurrency, result.images_per_s, result.p50_ms, cpu_us)


def print_rows(rows: Sequence[PathCost]) -> None:
    print("| server | C | img/s | p50 ms | server CPU µs/req | " + " | ".join(THREAD_GROUPS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(THREAD_GROUPS))
    for row in rows:
        groups = " | ".join(f"{row.cpu_us[g]:.0f}" for g in THREAD_GROUPS)
        print(
            f"| {row.server} | {row.concurrency} | {row.images_per_s:.0f} | {row.p50_ms:.2f} | "
            f"{row.total_us:.0f} | {groups} |"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.tools.path_cost", description=__doc__)
    add = parser.add_argument
    add("--model-repository", type=Path, required=True)
    add("--model", required=True, help="the model whose null twin is served")
    add("--concurrency", type=int, nargs="+", default=[1, 4, 64])
    add("--rounds", type=int, default=2, help="each server this many times, alternating")
    add("--duration", type=float, default=4.0, help="seconds measured per load")
    add("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    add("--providers", default="cpu")
    add("--server-arg", action="append", default=[], help="one more flag for the server")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        print("error: reads per-thread CPU from /proc (Linux only)", file=sys.stderr)
        return 2
    rows: list[PathCost] = []
    with null_repository(args.model_repository, args.model) as (repository, name):
        commands = [
            bench.server_command(repository, ["--providers", args.providers, *args.server_arg]),
            bench.reference_command(repository, name, ["--providers", args.providers]),
        ]
        for _ in range(args.rounds):
            for command in commands:
                rows.extend(
                    measure_server(command, name, args.concurrency, args.duration, args.warmup)
                )
    print(f"model {args.model}'s null twin; {os.cpu_count()} CPUs; rounds alternate the servers")
    print_rows(sorted(rows, key=lambda r: (r.concurrency, r.server)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
