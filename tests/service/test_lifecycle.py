"""The server as a process: port file, health, reflection, SIGTERM draining, no torch."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.wire.health import LIVENESS_SERVICE, HealthService
from tests.model_factory import TinySpec, reference_logits, write_version
from tests.service.conftest import REPO_ROOT, StartServer, python, random_images
from tests.service.gates import wait_until
from tests.service.model_builders import write_broken_version
from tests.service.test_inference_api import infer_request, logits_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_loading(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository, load=False)
    names = ("", "inference.GRPCInferenceService", "convserve.v1.ImageClassification")
    assert all(health_check(running.address, name) == NOT_SERVING for name in names)
    stream = health_pb2_grpc.HealthStub(running.channel()).Watch(health_pb2.HealthCheckRequest())
    assert next(stream).status == NOT_SERVING  # the stream is open before loading starts
    running.load()
    assert next(stream).status == SERVING  # the change is pushed to the open stream
    stream.cancel()
    assert all(health_check(running.address, name) == SERVING for name in names)


def test_watch_streams_end_when_draining(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository, grace_period_s=3600)
    stream = health_pb2_grpc.HealthStub(running.channel()).Watch(health_pb2.HealthCheckRequest())
    assert next(stream).status == SERVING
    running.run(running.server.stop(), timeout_s=120)  # an open Watch would hold it 3600 s
    assert [reply.status for reply in stream] == [NOT_SERVING]


def test_liveness_stays_serving_while_a_model_is_broken(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_version(tmp_path, "good", 1, TinySpec())
    write_broken_version(tmp_path, "broken", 1)
    running = start_server(tmp_path, load=False)
    assert health_check(running.address, "liveness") == SERVING  # alive while loading
    running.load()
    assert health_check(running.address, "") == NOT_SERVING  # strict readiness: not ready
    assert health_check(running.address, "liveness") == SERVING  # but no restart loop


async def test_liveness_turns_not_serving_when_draining() -> None:
    health = HealthService(["inference.GRPCInferenceService"])
    await health.set_serving(False)
    names = ("", "inference.GRPCInferenceService")
    assert [health.status(name) for name in names] == [NOT_SERVING, NOT_SERVING]
    assert health.status(LIVENESS_SERVICE) == SERVING
    await health.set_serving(True)
    await health.close(timeout_s=0.1)
    assert [health.status(name) for name in (*names, LIVENESS_SERVICE)] == [NOT_SERVING] * 3


def test_unknown_health_service_is_not_found(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository)
    with pytest.raises(grpc.RpcError) as caught:
        health_check(running.address, "mnist")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown service 'mnist'; known: ''" in caught.value.details()


def test_reflection_lists_the_services(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository)
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {service.name for service in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "convserve.v1.ImageClassification"} <= names
    assert "grpc.health.v1.Health" in names


class ServerProcess:
    """`python -m service` in a subprocess, as the deployment runs it (or `module`, a wrapper
    such as tests.service.gated_server)."""

    def __init__(
        self, repository: Path, tmp_path: Path, *flags: str, module: str = "service"
    ) -> None:
        self.port_file = tmp_path / "ports.json"
        self.log = (tmp_path / "server.log").open("w+")
        command = [
            python(), "-m", module, "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--port-file", str(self.port_file), "--providers", "cpu", *flags,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=self.log)
        wait_until(
            lambda: self.port_file.exists() or self.process.poll() is not None, "the port file"
        )
        assert self.port_file.exists(), f"server did not start:\n{self.output()}"
        ports = json.loads(self.port_file.read_text())
        self.address = f"127.0.0.1:{ports['grpc_port']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, pattern: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        found = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def gated_process(tiny_repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """The server process with its batches held until SIGUSR1; a grace far longer than the
    test ever needs, so that only the drain (never the grace running out) ends it."""
    process = ServerProcess(
        tiny_repository, tmp_path, "--max-batch-size", "2", "--grace-period-s", "600",
        module="tests.service.gated_server",
    )  # fmt: skip
    yield process
    process.close()


def test_sigterm_answers_every_accepted_request_then_exits(
    gated_process: ServerProcess, tiny_spec: TinySpec
) -> None:
    server = gated_process
    assert json.loads(server.port_file.read_text()).keys() == {"grpc_port", "metrics_port"}
    channel = grpc.insecure_channel(server.address)
    stub = pb2_grpc.GRPCInferenceServiceStub(channel)
    inputs = [random_images(1, seed=200 + i) for i in range(12)]
    futures = [stub.ModelInfer.future(infer_request(x), timeout=120) for x in inputs]
    in_flight = 'convserve_requests_in_flight{model="tiny",version="1"}'
    wait_until(lambda: server.metric(in_flight) == len(inputs), "the burst to be taken")

    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: health_check(server.address) == NOT_SERVING, "health NOT_SERVING")
    with pytest.raises(grpc.RpcError) as refused:  # draining: new calls are refused
        stub.ModelInfer(infer_request(random_images(1, 1)), timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()
    assert not any(future.done() for future in futures)  # still held at the gate

    server.process.send_signal(signal.SIGUSR1)  # open the gate: the drain can finish
    for images, future in zip(inputs, futures, strict=True):
        logits = logits_of(future.result(timeout=60))
        np.testing.assert_allclose(logits, reference_logits(tiny_spec, images), atol=1e-5)
    # It exits when the drain ends, not when the 600 s grace would have.
    assert server.process.wait(timeout=120) == 0
    channel.close()
    output = server.output()
    assert "shutdown requested: draining" in output and "stopped" in output
    assert "still unanswered" not in output


def test_bad_configuration_exits_with_the_reason(tmp_path: Path, tiny_repository: Path) -> None:
    result = subprocess.run(
        [python(), "-m", "service", "--model-repository", str(tmp_path / "missing")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flag in ("--grpc-port", "--metrics-port"):
            command = [
                python(),
                "-m",
                "service",
                "--model-repository",
                str(tiny_repository),
                "--host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
                flag,
                port,
            ]
            result = subprocess.run(
                command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 2, result.stderr
            assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    env = {**os.environ, "CONVSERVE_PROVIDERS": "tpu"}
    result = subprocess.run(
        [python(), "-m", "service"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "choose one of: auto, cuda, cpu" in result.stderr


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_server_runs_on_the_event_loop_it_is_given(
    loop: str, tiny_repository: Path, tmp_path: Path, tiny_spec: TinySpec
) -> None:
    """uvloop by default, asyncio's own on request; the log names the loop that runs."""
    flags = () if loop == "uvloop" else ("--event-loop", "asyncio")
    server = ServerProcess(tiny_repository, tmp_path, *flags)
    try:
        images = random_images(2, seed=7)
        with grpc.insecure_channel(server.address) as channel:
            reply = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(images), timeout=60
            )
        np.testing.assert_allclose(logits_of(reply), reference_logits(tiny_spec, images), atol=1e-5)
        assert f"; event loop {loop} " in server.output(), server.output()
    finally:
        server.close()


HIDDEN_UVLOOP = """
import sys
sys.modules["uvloop"] = None  # as if it were not installed
from service.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_missing_uvloop_stops_the_start_with_a_message(tiny_repository: Path) -> None:
    command = [
        python(), "-c", HIDDEN_UVLOOP, "--model-repository", str(tiny_repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "event_loop uvloop: uvloop is not installed" in result.stderr


NO_TORCH = """
import asyncio, sys
from pathlib import Path
import grpc
import service, service.tools.client, service.tools.bench
from service.server import InferenceServer
from service.settings import Settings
from service._proto import grpc_service_pb2 as pb2, grpc_service_pb2_grpc as pb2_grpc

async def main():
    server = InferenceServer(Settings(model_repository=Path(sys.argv[1]), host="127.0.0.1",
                                      grpc_port=0, metrics_port=0, providers="cpu"))
    await server.start()
    await server.load_models()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = await stub.ServerReady(pb2.ServerReadyRequest())
    await server.stop(0.5)
    print("ready", ready.ready)
    torch = [name for name in sys.modules if name == "torch" or name.startswith("torch.")]
    print("torch loaded:", bool(torch))

asyncio.run(main())
"""


def test_serving_never_imports_torch(tiny_repository: Path) -> None:
    result = subprocess.run(
        [python(), "-c", NO_TORCH, str(tiny_repository)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ready True" in result.stdout
    assert "torch loaded: False" in result.stdout
