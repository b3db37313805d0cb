"""TLS and mutual TLS on the gRPC port, with certificates the tests make, and real clients:
gRPC channels, the project's client CLI; the plaintext health port probes use."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.errors import ConfigurationError
from service.server import InferenceServer
from service.settings import Settings
from service.tools import client
from tests.certificates import Pki
from tests.service.conftest import RunningServer, StartServer, random_images
from tests.service.test_inference_api import infer_request

SERVING = health_pb2.HealthCheckResponse.SERVING


def tls_settings(pki: Pki, mutual: bool = False) -> dict[str, Any]:
    settings: dict[str, Any] = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    if mutual:
        settings["tls_client_ca_file"] = pki.client_ca
    return settings


def credentials(pki: Pki, cert: Path | None = None, key: Path | None = None) -> Any:
    return grpc.ssl_channel_credentials(
        pki.ca.read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )


def server_ready(channel: grpc.Channel) -> bool:
    stub = pb2_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerReady(pb2.ServerReadyRequest(), timeout=10).ready)


def refused(channel: grpc.Channel) -> grpc.RpcError:
    """The error of a call whose handshake fails: UNAVAILABLE, nothing reached a servicer."""
    with channel, pytest.raises(grpc.RpcError) as caught:
        server_ready(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    return caught.value


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(
    start_server: StartServer, tiny_repository: Path, pki: Pki
) -> None:
    running = start_server(
        tiny_repository, channel_credentials=credentials(pki), **tls_settings(pki)
    )
    response = running.inference_stub().ModelInfer(infer_request(random_images(2, 0)))
    assert response.model_name == "tiny"
    refused(grpc.insecure_channel(running.address))
    # TLS, but trusting the system's CAs only: the test CA's certificate is not accepted
    refused(grpc.secure_channel(running.address, grpc.ssl_channel_credentials()))
    assert (
        running.metric(
            "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer", code="OK"
        )
        == 1
    )


def test_mutual_tls_needs_a_certificate_from_the_client_ca(
    start_server: StartServer, tiny_repository: Path, pki: Pki
) -> None:
    trusted = credentials(pki, pki.client_cert, pki.client_key)
    running = start_server(
        tiny_repository, channel_credentials=trusted, **tls_settings(pki, mutual=True)
    )
    assert server_ready(running.channel())
    refused(grpc.secure_channel(running.address, credentials(pki)))  # no client certificate
    rogue = credentials(pki, pki.rogue_cert, pki.rogue_key)  # signed by a CA not trusted
    refused(grpc.secure_channel(running.address, rogue))
    refused(grpc.insecure_channel(running.address))


@pytest.fixture
def mtls_server(start_server: StartServer, tiny_repository: Path, pki: Pki) -> RunningServer:
    return start_server(
        tiny_repository,
        channel_credentials=credentials(pki, pki.client_cert, pki.client_key),
        health_port=0,
        **tls_settings(pki, mutual=True),
    )


def test_the_client_cli_speaks_tls_and_mutual_tls(
    mtls_server: RunningServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--address", mtls_server.address]
    mutual = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)]
    mutual += ["--tls-key", str(pki.client_key)]
    assert client.main(["metadata", *address, *mutual]) == 0
    assert "model: tiny versions=['1']" in capsys.readouterr().out
    # the certificate names localhost too; --tls-server-name checks for that name instead
    localhost = ["--address", f"localhost:{mtls_server.server.grpc_port}"]
    assert client.main(["health", *localhost, *mutual]) == 0
    assert client.main(["health", *address, *mutual, "--tls-server-name", "localhost"]) == 0
    assert capsys.readouterr().out.split() == ["SERVING", "SERVING"]
    assert client.main(["health", *address, "--tls-server-name", "elsewhere", *mutual]) == 1
    assert client.main(["health", *address, "--tls-ca", str(pki.ca), "--timeout", "5"]) == 1
    assert client.main(["health", *address, "--timeout", "5"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(":")[:2] for line in errors] == [["error", " UNAVAILABLE"]] * 3
    assert client.main(["health", *address, "--tls-cert", str(pki.client_cert)]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_the_health_port_answers_plaintext_and_serves_nothing_else(
    mtls_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mtls_server.server.health_port not in (None, 0, mtls_server.server.grpc_port)
    health = f"127.0.0.1:{mtls_server.server.health_port}"
    # what the images' HEALTHCHECK and plaintext probes run: no certificate, no token
    assert client.main(["health", "--address", health]) == 0
    assert client.main(["health", "--address", health, "--service", "liveness"]) == 0
    assert capsys.readouterr().out.split() == ["SERVING", "SERVING"]
    with grpc.insecure_channel(health) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            server_ready(channel)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == SERVING
        watch.cancel()


def test_the_port_file_names_the_health_port(
    start_server: StartServer, tiny_repository: Path, tmp_path: Path
) -> None:
    running = start_server(tiny_repository, health_port=0, port_file=tmp_path / "ports.json")
    ports = json.loads((tmp_path / "ports.json").read_text())
    assert ports == {
        "grpc_port": running.server.grpc_port,
        "metrics_port": running.server.metrics_port,
        "health_port": running.server.health_port,
    }


def start(settings: Settings) -> None:
    async def run() -> None:
        server = InferenceServer(settings)
        try:
            await server.start()
        finally:
            await server.stop(0)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert_file": "missing.pem"}, r"^cannot read tls_cert_file .*missing\.pem: No such"),
        ({"tls_key_file": "server.pem"}, r"tls_key_file .*server\.pem holds no PEM PRIVATE KEY"),
        ({"tls_cert_file": "server.key"}, r"tls_cert_file .*server\.key holds no PEM CERTIFICATE"),
        ({"tls_key_file": "client.key"}, r"with TLS: .*is tls_key_file .*client\.key the key of"),
        ({"tls_client_ca_file": "nowhere.pem"}, r"^cannot read tls_client_ca_file"),
    ],
)
def test_unusable_tls_files_stop_the_start_with_the_reason(
    tiny_repository: Path, pki: Pki, files: dict[str, str], message: str
) -> None:
    settings = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    settings.update({name: pki.ca.parent / file for name, file in files.items()})
    with pytest.raises(ConfigurationError, match=message) as caught:
        start(
            Settings(
                model_repository=tiny_repository, host="127.0.0.1", grpc_port=0, metrics_port=0,
                **settings,
            )
        )  # fmt: skip
    # a file's content, a key's above all, is never shown
    body = {line for f in pki.ca.parent.iterdir() for line in f.read_text().splitlines()[1:-1]}
    assert not any(line in str(caught.value) for line in body)
