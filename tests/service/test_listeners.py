"""What listens where: the metrics server apart from the gRPC host, reflection switched off."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.service.conftest import StartServer
from tests.service.test_tls import server_ready


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def test_metrics_listen_on_their_own_host(start_server: StartServer, tiny_repository: Path) -> None:
    # 127.0.0.2 is loopback too on Linux: a second address on the same machine
    running = start_server(tiny_repository, host="127.0.0.1", metrics_host="127.0.0.2")
    port = running.server.metrics_port
    assert "convserve_server_ready 1.0" in scrape(f"http://127.0.0.2:{port}/metrics")
    with pytest.raises(urllib.error.URLError) as caught:
        scrape(f"http://127.0.0.1:{port}/metrics")
    assert isinstance(caught.value.reason, ConnectionRefusedError)
    assert server_ready(running.channel())


def test_metrics_follow_the_host_when_not_set_apart(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository, host="127.0.0.2")
    port = running.server.metrics_port
    assert "convserve_server_ready" in scrape(f"http://127.0.0.2:{port}/metrics")
    with pytest.raises(urllib.error.URLError):
        scrape(f"http://127.0.0.1:{port}/metrics")


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {service.name for service in reply.list_services_response.service}


def test_reflection_can_be_switched_off(start_server: StartServer, tiny_repository: Path) -> None:
    on = start_server(tiny_repository)
    assert "inference.GRPCInferenceService" in list_services(on.channel())
    off = start_server(tiny_repository, reflection=False)
    with pytest.raises(grpc.RpcError) as caught:
        list_services(off.channel())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server_ready(off.channel())
