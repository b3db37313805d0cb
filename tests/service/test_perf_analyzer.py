"""Triton's perf_analyzer drives the server unchanged (docs/benchmark.md uses it too).

perf_analyzer asks for ModelMetadata and ModelConfig before anything else, then sends
ModelInfer and reads ModelStatistics around each measurement ("Server:" in its report). It is
unpacked into .tools/ by `make tools` (scripts/install-perf-analyzer.sh); without it this test
skips on a developer machine and fails under CI (CI=true). Count windows, not time windows, and
a wide stability band: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.tools import in_ci
from tests.service.conftest import REPO_ROOT, StartServer

PERF_ANALYZER = REPO_ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"


def test_perf_analyzer_measures_the_server(
    start_server: StartServer, tiny_repository: Path
) -> None:
    if not PERF_ANALYZER.exists():
        message = f"{PERF_ANALYZER} missing: run `make tools`"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    running = start_server(tiny_repository)
    environment = {
        **os.environ,
        "LD_LIBRARY_PATH": str(PERF_ANALYZER.parent / "lib"),
    }
    result = subprocess.run(
        [
            str(PERF_ANALYZER), "-m", "tiny", "-i", "grpc", "-u", running.address,
            "--concurrency-range", "4", "--measurement-mode", "count_windows",
            "--measurement-request-count", "100", "--stability-percentage", "1000",
        ],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    client = re.search(r"Client:\s+Request count: (\d+)", output)
    server = re.search(r"Server:\s+Inference count: (\d+)\s+Execution count: (\d+)", output)
    assert client is not None and server is not None, output
    assert int(server.group(1)) > 0 and int(server.group(2)) > 0
    assert "failed to get model config" not in output
    # The server's own books: every ModelInfer it answered OK is in ModelStatistics.
    answered = running.metric(
        "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer", code="OK"
    )
    model = running.server.models.resolve("tiny") if running.server.models else None
    assert model is not None and answered == model.metrics.statistics.success.count
    assert model.metrics.statistics.inference_count == answered  # one image a request
