"""`python -m service.tools.bench --table` (issue 11's table), its reference server and its load.

Real processes throughout: servers, the reference server and the load clients are started as
the benchmark starts them. Nothing here depends on the machine's speed: the figures are only
checked to be well-formed (a ratio, a goal, a verdict), never against a value.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.engine.runtime import OnnxModel, RuntimeOptions
from service.tools import bench, bench_table, path_cost
from service.tools.loadgen import LoadResult, cpu_seconds
from service.tools.path_cost import write_null_model
from tests.model_factory import TinySpec, reference_logits

CASE_ROW = re.compile(
    r"^\| tiny 1x28x28, C=(?P<c>\d+), B=(?P<b>\d+): (?P<measure>[^|]+) \| [^|]+ \| [^|]+ \| "
    r"[^|]+ \| (?P<ratio>\d+\.\d\dx|\d+%) \| (?P<goal>(<=|>=) (\d+\.\d\dx|\d+%)) "
    r"\| (yes|\*\*no\*\*) \|$"
)
RUN_ROW = re.compile(r"^\| (convserve|reference) tiny \| (\d+) \| (\d+) \| \d+ \| ")


def test_table_prints_every_case_with_its_ratio_and_goal(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "table.json"
    status = bench.main(
        [
            "--table", "--model-repository", str(tiny_repository), "--large-model", "tiny",
            "--small-model", "tiny", "--providers", "cpu", "--duration", "0.5",
            "--warmup", "0.1", "--in-process-batch-sizes", "1", "2", "--client-processes", "2",
            "--json", str(report),
        ]
    )  # fmt: skip
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [m for line in lines if (m := CASE_ROW.match(line))]
    assert [(int(m["c"]), int(m["b"])) for m in rows] == [
        (c.concurrency, c.images_per_request) for c in bench_table.CASES
    ]
    assert [m["goal"] for m in rows] == [
        "<= 1.05x", "<= 1.05x", ">= 60%", ">= 85%", ">= 1.50x", ">= 1.25x", ">= 1.00x",
        ">= 1.00x",
    ]  # fmt: skip
    assert [m["measure"] for m in rows] == [
        bench_table.MEASURES[c.measure] for c in bench_table.CASES
    ]
    runs = [(m[1], int(m[2]), int(m[3])) for line in lines if (m := RUN_ROW.match(line))]
    loads = [(1, 1), (4, 1), (16, 8), (64, 1)]
    expected = [(kind, c, b) for kind in ("convserve", "reference") for c, b in loads]
    assert runs == expected * 2  # the large model's runs, then the small one's
    assert any(line.startswith("machine: ") and "onnxruntime" in line for line in lines)
    assert (
        "server flags: its defaults (event loop uvloop, 64 call takers, batch slots auto); "
        "reference flags: its defaults "
    ) in "\n".join(lines)

    figures = json.loads(report.read_text())
    assert len(figures["cases"]) == len(bench_table.CASES)
    for case in figures["cases"]:
        assert math.isfinite(case["ratio"]) and case["ratio"] > 0
        assert case["met"] == (
            case["ratio"] <= case["goal"]
            if case["measure"] == "p50"
            else case["ratio"] >= case["goal"]
        )
    for run in figures["runs"]:
        assert run["requests"] > 0 and run["errors"] == 0, run
        if run["label"].startswith("convserve"):  # read from the server's metrics
            assert run["mean_batch"] >= 1
        else:
            assert run["mean_batch"] is None
        assert run["server_cpu_s"] is not None and run["server_cpu_s"] >= 0
        assert run["client_cpu_us_per_request"] is not None
    assert [size for size, _ in figures["in_process"]["tiny"]] == [1, 2]


def test_the_reference_server_answers_model_infer_with_the_models_output(
    tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    command = bench.reference_command(tiny_repository, "tiny", ["--providers", "cpu"])
    images = np.random.default_rng(3).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    with bench.spawned(command) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(pb2.ModelMetadataRequest(name="tiny"), timeout=30)
        assert (metadata.inputs[0].name, list(metadata.inputs[0].shape)) == (
            "images", [-1, 1, 28, 28]
        )  # fmt: skip
        request = pb2.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
        request.raw_input_contents.append(images.tobytes())
        response = stub.ModelInfer(request, timeout=30)
        assert (response.outputs[0].datatype, list(response.outputs[0].shape)) == ("FP32", [3, 10])
        values = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 10)
        np.testing.assert_allclose(values, reference_logits(tiny_spec, images), rtol=1e-5)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerMetadata(pb2.ServerMetadataRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _result(p50_ms: float, images_per_s: float) -> LoadResult:
    return LoadResult("x", 1, 1, 100, 0, images_per_s, p50_ms, p50_ms, p50_ms)


def test_cases_are_judged_against_their_goals() -> None:
    ceiling = [(1, 500.0), (32, 2000.0)]
    latency = bench_table.Case("large", 1, 1, "p50", 1.05)
    judged = bench_table.judge("t", latency, _result(1.1, 0), _result(1.0, 0), ceiling)
    assert (round(judged.ratio, 2), judged.met, judged.batch1_ms) == (1.1, False, 2.0)
    share = bench_table.Case("large", 64, 1, "ceiling", 0.60)
    judged = bench_table.judge("t", share, _result(1, 1300.0), _result(1, 9999.0), ceiling)
    assert (judged.ratio, judged.met, judged.ceiling_batch) == (0.65, True, 32)
    speedup = bench_table.Case("small", 64, 1, "throughput", 1.5)
    judged = bench_table.judge("t", speedup, _result(1, 1400.0), _result(1, 1000.0), ceiling)
    assert (judged.ratio, judged.met) == (1.4, False)


def test_cpu_seconds_reads_proc() -> None:
    used = cpu_seconds(os.getpid())
    assert used is not None and used > 0  # importing numpy and grpc alone costs more than a tick
    assert cpu_seconds(2**22 + 1) is None  # above Linux's PID_MAX_LIMIT: never a process


PATH_COST_ROW = re.compile(
    r"^\| (convserve|reference) \| (\d+) \| \d+ \| \d+\.\d\d \| \d+ \| \d+ \| \d+ \| \d+ \|$"
)


def test_the_null_twin_keeps_the_signature_and_computes_the_mean(
    tiny_repository: Path, tiny_spec: TinySpec, tmp_path: Path
) -> None:
    version_dir = tiny_repository / "tiny" / "1"
    write_null_model(version_dir, tmp_path / "tiny_null" / "1", "tiny_null")
    runtime = OnnxModel.load(
        "tiny_null", 1, tmp_path / "tiny_null" / "1" / "model.onnx", RuntimeOptions()
    )
    try:
        images = np.random.default_rng(1).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
        outputs = runtime.run_blocking(images)
        means = images.reshape(3, -1).mean(axis=1, dtype=np.float64)
        np.testing.assert_allclose(outputs, np.repeat(means[:, None], 10, axis=1), rtol=1e-5)
        assert (runtime.spec.input_shape, tuple(runtime.spec.labels)) == (
            (tiny_spec.channels, tiny_spec.height, tiny_spec.width), tiny_spec.labels
        )  # fmt: skip
    finally:
        runtime.close()


def test_path_cost_prints_both_servers_at_each_load(
    tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = path_cost.main(
        [
            "--model-repository", str(tiny_repository), "--model", "tiny",
            "--concurrency", "1", "4", "--rounds", "1", "--duration", "0.3", "--warmup", "0.1",
        ]
    )  # fmt: skip
    assert status == 0
    rows = [m for line in capsys.readouterr().out.splitlines() if (m := PATH_COST_ROW.match(line))]
    assert [(m[1], int(m[2])) for m in rows] == [
        ("convserve", 1), ("reference", 1), ("convserve", 4), ("reference", 4)
    ]  # fmt: skip


FLOOD_ROW = re.compile(
    r"^\| (\d) \| (--call-takers=\d+) \| [\d,]+ \| [\d,]+ \| \d+% \| [\d.]+ ms "
    r"\| \{.*'OK': \d+.*\} \|$"
)


def test_the_flood_tool_measures_each_variant_alone_and_beside_the_flood(
    tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.tools import flood

    argv = [
        "--model-repository", str(tiny_repository), "--model", "tiny", "--rounds", "1",
        "--seconds", "0.3", "--server-arg=--call-takers=0", "--server-arg=--call-takers=2",
    ]  # fmt: skip
    assert flood.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [m.groups() for line in lines if (m := FLOOD_ROW.match(line))]
    assert rows == [("0", "--call-takers=0"), ("0", "--call-takers=2")]
    assert sum("median share" in line for line in lines) == 2
