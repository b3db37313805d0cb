"""Triton's client (tritonclient.grpc) against our server, and the wire contract against Triton's.

The client runs in a subprocess (tests/service/tritonclient_check.py): tritonclient's generated
`inference.*` messages and ours cannot share one process's default descriptor pool, whatever
the import order, so this test works however the suite's imports are ordered. The second test
connects the same way over mutual TLS with a bearer token, as a client outside the cluster would.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2

from service._proto import grpc_service_pb2 as pb2
from tests.certificates import Pki
from tests.service.conftest import REPO_ROOT, RunningServer, StartServer, python

CHECKS = (
    "wire:", "raw infer: ok", "classification extension: ok", "typed contents: ok",
    "repository and config: ok", "statistics: ok",
)  # fmt: skip
TOKEN = "tritonclient-token-0123456789"


def run_check(running: RunningServer, tmp_path: Path, *options: str) -> str:
    """Runs tritonclient_check against the server; returns its output."""
    descriptor = descriptor_pb2.FileDescriptorProto()
    pb2.DESCRIPTOR.CopyToProto(descriptor)
    descriptor_file = tmp_path / "grpc_service.pb"
    descriptor_file.write_bytes(descriptor.SerializeToString())
    result = subprocess.run(
        [
            python(), "-m", "tests.service.tritonclient_check",
            "--address", running.address, "--descriptor", str(descriptor_file), *options,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for line in CHECKS:
        assert line in result.stdout
    assert (
        running.metric(
            "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer", code="OK"
        )
        == 3
    )
    return result.stdout


def test_tritonclient_works_unchanged(
    start_server: StartServer, tiny_repository: Path, tmp_path: Path
) -> None:
    running = start_server(tiny_repository, model_control_mode="explicit", load_models=("*",))
    assert "load/unload: ok" in run_check(running, tmp_path, "--explicit")


def test_tritonclient_over_mutual_tls_with_a_bearer_token(
    start_server: StartServer, tiny_repository: Path, tmp_path: Path, pki: Pki
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    running = start_server(
        tiny_repository,
        channel_credentials=credentials,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.client_ca,
        token_file=token_file,
    )
    output = run_check(
        running, tmp_path,
        "--root-certificates", str(pki.ca), "--private-key", str(pki.client_key),
        "--certificate-chain", str(pki.client_cert), "--token", TOKEN,
    )  # fmt: skip
    assert "token required: ok" in output and "plaintext refused: ok" in output
    assert "load refused outside explicit mode: ok" in output
    refused = running.metric(
        "convserve_unauthenticated_requests_total", rpc="ServerReady", reason="missing"
    )
    assert refused == 1
