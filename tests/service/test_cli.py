"""The user tools: `python -m service.tools.client` and `python -m service.tools.bench`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from service.tools import bench, client
from service.tools.loadgen import run_load
from tests.service.conftest import REPO_ROOT, RunningServer, StartServer, encode_image, python


@pytest.fixture
def tiny_server(start_server: StartServer, tiny_repository: Path) -> RunningServer:
    return start_server(tiny_repository)


def test_health_command_as_the_dockerfile_runs_it(tiny_server: RunningServer) -> None:
    command = [python(), "-m", "service.tools.client", "health", "--address", tiny_server.address]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


def test_health_command_imports_only_grpc(tiny_server: RunningServer) -> None:
    """The Docker HEALTHCHECK runs it every 10 s: no numpy, Pillow or server modules."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['client', 'health', '--address', {tiny_server.address!r}]\n"
        "try:\n"
        "    runpy.run_module('service.tools.client', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    heavy = {'numpy', 'PIL', 'onnxruntime', 'service.wire.converters',\n"
        "             'service.engine.classify'}\n"
        "    print(done.code, sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [python(), "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.splitlines()[-1] == "0 []", result.stdout + result.stderr


def test_health_is_non_zero_when_not_serving(
    start_server: StartServer, tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loading = start_server(tiny_repository, load=False)
    assert client.main(["health", "--address", loading.address]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"
    assert client.main(["health", "--address", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert "error: UNAVAILABLE" in capsys.readouterr().err


def test_classify_prints_labels_and_scores(
    tiny_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(encode_image(np.full((28, 28), 128, dtype=np.uint8)))
    assert (
        client.main(["classify", str(image), "--top-k", "2", "--address", tiny_server.address]) == 0
    )
    out = capsys.readouterr().out
    assert "model tiny version 1" in out
    line = next(line for line in out.splitlines() if line.startswith(str(image)))
    assert line.count("(") == 2
    assert client.main(["classify", str(image), "--json", "--address", tiny_server.address]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert len(parsed["results"][0]["classes"]) == 5


def test_infer_metadata_and_errors(
    tiny_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--address", tiny_server.address]
    assert client.main(["metadata", *address]) == 0
    out = capsys.readouterr().out
    assert "model: tiny versions=['1']" in out and "input images UINT8 [-1, 1, 28, 28]" in out
    saved = tmp_path / "logits.npy"
    assert client.main(["infer", "--random", "3", "--output", str(saved), *address]) == 0
    assert np.load(saved).shape == (3, 10)
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((2, 1, 28, 28), dtype=np.uint8))
    assert client.main(["infer", "--input", str(batch), "--classification", "2", *address]) == 0
    assert "BYTES [2, 2]" in capsys.readouterr().out
    np.save(batch, np.zeros((2, 1, 27, 28), dtype=np.uint8))
    assert client.main(["infer", "--input", str(batch), *address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_bench_against_a_running_server(
    tiny_server: RunningServer, tiny_repository: Path, tmp_path: Path
) -> None:
    report = tmp_path / "bench.json"
    status = bench.main(
        [
            "--address", tiny_server.address, "--model-repository", str(tiny_repository),
            "--concurrency", "1", "4", "--duration", "0.5", "--warmup", "0.1",
            "--in-process-batch-sizes", "1", "4", "--providers", "cpu", "--json", str(report),
        ]
    )  # fmt: skip
    assert status == 0
    figures = json.loads(report.read_text())
    assert [r["concurrency"] for r in figures["load"]] == [1, 4]
    assert all(r["requests"] >= r["concurrency"] and r["errors"] == 0 for r in figures["load"])
    assert [size for size, _ in figures["in_process"]] == [1, 4]


def test_load_measures_at_least_one_call_per_client_however_busy_the_machine(
    tiny_server: RunningServer,
) -> None:
    """A measured window of zero seconds still holds each client's first call: a slow or
    contended machine gives fewer figures, never none (the window is what was measured)."""
    result = run_load(
        tiny_server.address, "tiny", 5, 2, duration_s=0.0, warmup_s=0.0, rpc="infer",
        label="t", processes=2,
    )  # fmt: skip
    assert (result.requests, result.errors) == (5, 0)
    assert result.images_per_s > 0 and result.p50_ms > 0
    assert result.client_cpu_s is not None  # each client process's own times
