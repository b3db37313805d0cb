"""Triton's client (tritonclient.grpc) against our server, and the wire contract against Triton's.

The client runs in a subprocess (tests/service/tritonclient_check.py): tritonclient's generated
`inference.*` messages and ours cannot share one process's default descriptor pool, whatever
the import order, so this test works however the suite's imports are ordered.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from google.protobuf import descriptor_pb2

from service._proto import grpc_service_pb2 as pb2
from tests.service.conftest import REPO_ROOT, StartServer, python


def test_tritonclient_works_unchanged(
    start_server: StartServer, tiny_repository: Path, tmp_path: Path
) -> None:
    running = start_server(tiny_repository)
    descriptor = descriptor_pb2.FileDescriptorProto()
    pb2.DESCRIPTOR.CopyToProto(descriptor)
    descriptor_file = tmp_path / "grpc_service.pb"
    descriptor_file.write_bytes(descriptor.SerializeToString())
    result = subprocess.run(
        [
            python(),
            "-m",
            "tests.service.tritonclient_check",
            "--address",
            running.address,
            "--descriptor",
            str(descriptor_file),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("wire:", "raw infer: ok", "classification extension: ok", "typed contents: ok"):
        assert line in result.stdout
    assert (
        running.metric(
            "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer", code="OK"
        )
        == 3
    )
