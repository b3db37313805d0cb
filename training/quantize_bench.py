"""INT8 against its FP32 source, in process: images/s per batch size and at the best batch.

    python -m training.quantize_bench model_repository/mnist_cnn_int8 bench_repository/resnet18_int8

Each argument is an INT8 version written by ``python -m training quantize`` (a version directory,
or a model directory for its latest version); its FP32 source is found in the same repository
from ``convserve.quantization``. The machine is shared, so the two are measured interleaved, in
the same process: for each round and batch size, FP32 then INT8 (INT8 first in odd rounds), each
for ``--seconds``. A batch size's figure is the median of its rounds; the ratio compares the two
models' best batch sizes. Sessions are made as the service makes them by default (all cores for
intra-op threads, all graph optimisations, CPU provider, and threads that spin between pieces of
work for a model whose batch of one takes at least 0.5 ms: `--spinning` to set it for both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.layout import MODEL_FILE
from contract.runtime import SPIN_MIN_RUN_S
from training.errors import RepositoryError, TrainingError
from training.onnx_eval import read_metadata
from training.quantize_run import QUANTIZATION_KEY, int8_cpu_features
from training.repository import resolve_model_path

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Pair:
    """An INT8 version and the FP32 version it was quantized from."""

    int8: Path
    fp32: Path
    title: str


@dataclass(frozen=True)
class PairResult:
    """Per batch size: the median images/s of both, and the median of the rounds' INT8/FP32
    ratios (each from two measurements side by side in time, so a load that comes and goes
    between rounds cancels); the headline ratio compares the two models' best batch sizes."""

    title: str
    batch_sizes: list[int]
    fp32: list[float]
    int8: list[float]
    paired_ratio: list[float]
    spinning: dict[str, bool] = field(default_factory=dict)  # "fp32"/"int8": threads spin

    def best(self, figures: list[float]) -> tuple[int, float]:
        index = int(np.argmax(figures))
        return self.batch_sizes[index], figures[index]

    @property
    def speedup(self) -> float:
        return self.best(self.int8)[1] / self.best(self.fp32)[1]


def find_pair(path: Path) -> Pair:
    """The INT8 model at ``path`` and its FP32 source; raises RepositoryError naming the gap."""
    int8 = resolve_model_path(path)
    record = json.loads(read_metadata(int8).get(QUANTIZATION_KEY) or "{}")
    source = record.get("source")
    if not source:
        raise RepositoryError(
            f"'{int8}' has no {QUANTIZATION_KEY} metadata: give a version written by "
            f"'python -m training quantize'"
        )
    repository = int8.parent.parent.parent
    fp32 = repository / source["model"] / str(source["version"]) / MODEL_FILE
    if not fp32.is_file():
        raise RepositoryError(f"the FP32 source of '{int8}' is not in the repository: no '{fp32}'")
    version = int8.parent
    title = (
        f"{version.parent.name} v{version.name} (INT8) vs {source['model']} "
        f"v{source['version']} (FP32)"
    )
    return Pair(int8, fp32, title)


def bench_session(path: Path, intra_op_threads: int, spinning: str) -> ort.InferenceSession:
    """A session with the service's default settings (training does not import service):
    threads that spin between pieces of work when `spinning` is on, or auto and a batch of one
    takes at least SPIN_MIN_RUN_S (contract/runtime.py), as the service decides."""

    def session(spin: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    if spinning != "auto":
        return session(spinning == "on")
    quiet = session(False)
    return session(True) if batch_of_one_s(quiet) >= SPIN_MIN_RUN_S else quiet


def spins(session: ort.InferenceSession) -> bool:
    return (
        session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        == "1"
    )


def batch_of_one_s(session: ort.InferenceSession) -> float:
    """The fastest of three runs of a batch of one, after one that sets the session up."""
    model_input = session.get_inputs()[0]
    feeds = {model_input.name: np.zeros((1, *model_input.shape[1:]), dtype=np.uint8)}
    session.run(None, feeds)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return min(times)


def images_per_second(session: ort.InferenceSession, images: np.ndarray, seconds: float) -> float:
    """Runs one batch again and again for ``seconds``; images done per second."""
    feeds = {session.get_inputs()[0].name: images}
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, feeds)
        done += len(images)
    return done / elapsed


def measure_pair(
    pair: Pair,
    batch_sizes: Sequence[int],
    rounds: int,
    seconds: float,
    intra_op_threads: int = 0,
    spinning: str = "auto",
) -> PairResult:
    """Both models at every batch size, interleaved round by round."""
    sessions = {
        "fp32": bench_session(pair.fp32, intra_op_threads, spinning),
        "int8": bench_session(pair.int8, intra_op_threads, spinning),
    }
    shape = sessions["fp32"].get_inputs()[0].shape[1:]
    rng = np.random.default_rng(0)
    batches = {n: rng.integers(0, 256, size=(n, *shape), dtype=np.uint8) for n in batch_sizes}
    for session in sessions.values():  # the first run of each shape sets up its kernels
        for images in batches.values():
            session.run(None, {session.get_inputs()[0].name: images})
    figures: dict[str, dict[int, list[float]]] = {k: {n: [] for n in batch_sizes} for k in sessions}
    for round_index in range(rounds):
        order = ("fp32", "int8") if round_index % 2 == 0 else ("int8", "fp32")
        for size in batch_sizes:
            for which in order:
                rate = images_per_second(sessions[which], batches[size], seconds)
                figures[which][size].append(rate)
    medians = {k: [statistics.median(v[n]) for n in batch_sizes] for k, v in figures.items()}
    paired = [
        statistics.median(
            i / f for i, f in zip(figures["int8"][n], figures["fp32"][n], strict=True)
        )
        for n in batch_sizes
    ]
    return PairResult(
        pair.title,
        list(batch_sizes),
        medians["fp32"],
        medians["int8"],
        paired,
        spinning={k: spins(v) for k, v in sessions.items()},
    )


def machine_lines() -> list[str]:
    """The CPU, its cores and 8-bit extensions, the ONNX Runtime version and the load."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    features = ", ".join(int8_cpu_features()) or "none"
    return [
        f"machine: {cpu}, {cores} cores; 8-bit extensions: {features}",
        f"onnxruntime {ort.__version__}; load average {os.getloadavg()[0]:.2f} (1 min)",
    ]


def print_result(result: PairResult, rounds: int, seconds: float) -> None:
    print(f"\n## {result.title}")
    spinning = ", ".join(
        f"{kind.upper()} {'spinning' if spin else 'not spinning'}"
        for kind, spin in result.spinning.items()
    )
    print(
        f"\nmedian of {rounds} interleaved rounds of {seconds} s per batch size; ONNX Runtime's "
        f"threads: {spinning}\n"
    )
    print("| batch | FP32 img/s | INT8 img/s | INT8/FP32 (paired) |")
    print("|---:|---:|---:|---:|")
    rows = zip(result.batch_sizes, result.fp32, result.int8, result.paired_ratio, strict=True)
    for size, fp32, int8, ratio in rows:
        print(f"| {size} | {fp32:,.0f} | {int8:,.0f} | {ratio:.2f}x |")
    fp32_batch, fp32_best = result.best(result.fp32)
    int8_batch, int8_best = result.best(result.int8)
    print(
        f"\nbest batch: FP32 {fp32_best:,.0f} img/s (batch {fp32_batch}), INT8 {int8_best:,.0f} "
        f"img/s (batch {int8_batch}): **{result.speedup:.2f}x**"
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.quantize_bench",
        description="In-process images/s of INT8 versions against their FP32 sources, "
        "interleaved (docs/quantization.md).",
    )
    parser.add_argument(
        "versions", nargs="+", type=Path, help="INT8 version (or model) directories"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), help="%(default)s"
    )
    parser.add_argument("--rounds", type=int, default=11, help="default: %(default)s")
    parser.add_argument(
        "--seconds", type=float, default=0.2, help="per measurement (default: %(default)s)"
    )
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="0: all cores, as the service"
    )
    parser.add_argument(
        "--spinning",
        choices=("auto", "on", "off"),
        default="auto",
        help="ONNX Runtime's threads spin between pieces of work: on, off, or auto (as the "
        "service: on when a batch of one takes at least 0.5 ms); default: %(default)s",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.quantize_bench ...``; returns the exit status."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        pairs = [find_pair(path) for path in args.versions]
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in machine_lines():
        print(line)
    results = []
    for pair in pairs:
        result = measure_pair(
            pair, args.batch_sizes, args.rounds, args.seconds, args.intra_op_threads, args.spinning
        )
        print_result(result, args.rounds, args.seconds)
        results.append(result)
    print(f"\n{machine_lines()[1]} (at the end)")
    if args.json is not None:
        report = [{**asdict(r), "speedup": r.speedup} for r in results]
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
