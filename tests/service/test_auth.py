"""Bearer-token authentication (service/wire/auth.py): accepted, refused and exempt calls over real
channels, the refusals counted, the tokens never logged; the client CLI sends the token."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._proto import grpc_service_pb2 as pb2
from service.errors import ConfigurationError
from service.tools import client
from service.wire.auth import REFUSAL_MESSAGE, TokenSet, bearer_token, read_tokens
from tests.certificates import Pki
from tests.service.conftest import RunningServer, StartServer, random_images
from tests.service.test_inference_api import infer_request

TOKEN = "s3cret-token-0123456789abcdef"
OTHER = "second-token-for-rotation-xyz"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n\n  {OTHER}  \n")
    return path


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refusal(call: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(timeout=10, **kwargs)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == REFUSAL_MESSAGE
    return caught.value


def unauthenticated(running: RunningServer, rpc: str, reason: str) -> float | None:
    return running.metric("convserve_unauthenticated_requests_total", rpc=rpc, reason=reason)


def test_calls_need_an_accepted_token_health_is_exempt(
    start_server: StartServer,
    tiny_repository: Path,
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the service's loggers only: gRPC's own DEBUG records hold C objects that can be gone by
    # the time a record is formatted
    with caplog.at_level(logging.DEBUG, logger="service"):
        running = start_server(tiny_repository, token_file=token_file)
        stub = running.inference_stub()
        request = infer_request(random_images(1, 0))
        for token in (TOKEN, OTHER):  # every token of the file
            assert stub.ModelInfer(request, metadata=bearer(token)).model_name == "tiny"
        assert stub.ModelInfer(request, metadata=[("authorization", f"bearer  {TOKEN} ")])
        refusal(lambda **kw: stub.ModelInfer(request, **kw))
        refusal(lambda **kw: stub.ModelInfer(request, **kw), metadata=bearer(TOKEN[:-1]))
        refusal(lambda **kw: stub.ModelInfer(request, **kw), metadata=bearer(TOKEN + "x"))
        basic = [("authorization", f"Basic {TOKEN}")]
        refusal(lambda **kw: stub.ModelInfer(request, **kw), metadata=basic)
        twice = [*bearer(TOKEN), *bearer(OTHER)]
        refusal(lambda **kw: stub.ServerReady(pb2.ServerReadyRequest(), **kw), metadata=twice)
        refusal(lambda **kw: stub.ServerMetadata(pb2.ServerMetadataRequest(), **kw))
        triton_only = running.channel().unary_unary(
            "/inference.GRPCInferenceService/SystemSharedMemoryStatus"
        )
        refusal(lambda **kw: triton_only(b"", **kw))
        # health answers without a token: probes carry none
        health = health_pb2_grpc.HealthStub(running.channel())
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()

    assert unauthenticated(running, "ModelInfer", "missing") == 1
    assert unauthenticated(running, "ModelInfer", "invalid") == 3
    assert unauthenticated(running, "ServerReady", "invalid") == 1
    assert unauthenticated(running, "ServerMetadata", "missing") == 1
    assert unauthenticated(running, "unknown", "missing") == 1  # shared memory: not served
    assert unauthenticated(running, "Classify", "missing") == 0
    # refused calls reach no servicer: only the three accepted ones are inference requests
    assert (
        running.metric(
            "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer", code="OK"
        )
        == 3
    )
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("service"))
    assert "bearer tokens required (2 accepted" in logged
    assert "refused a call to ModelInfer: invalid bearer token" in logged
    assert TOKEN[:8] not in logged and OTHER[:8] not in logged


def test_reflection_needs_the_token_too(
    start_server: StartServer, tiny_repository: Path, token_file: Path
) -> None:
    running = start_server(tiny_repository, token_file=token_file)
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    refusal(lambda **kw: next(stub.ServerReflectionInfo(iter([request]), **kw)))
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=bearer(TOKEN)))
    names = {service.name for service in reply.list_services_response.service}
    assert "inference.GRPCInferenceService" in names
    assert unauthenticated(running, "ServerReflectionInfo", "missing") == 1


def test_auth_health_puts_health_behind_the_token(
    start_server: StartServer, tiny_repository: Path, token_file: Path
) -> None:
    running = start_server(tiny_repository, token_file=token_file, auth_health=True)
    health = health_pb2_grpc.HealthStub(running.channel())
    request = health_pb2.HealthCheckRequest()
    refusal(lambda **kw: health.Check(request, **kw))
    refusal(lambda **kw: next(health.Watch(request, **kw)))
    assert health.Check(request, timeout=10, metadata=bearer(OTHER)).status == SERVING
    assert unauthenticated(running, "Check", "missing") == 1
    assert unauthenticated(running, "Watch", "missing") == 1


def test_the_client_cli_sends_the_token_over_mutual_tls(
    start_server: StartServer,
    tiny_repository: Path,
    token_file: Path,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start_server(
        tiny_repository,
        token_file=token_file,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.client_ca,
    )
    mutual = ["--address", running.address, "--tls-ca", str(pki.ca)]
    mutual += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert client.main(["infer", *mutual]) == 1
    assert capsys.readouterr().err.strip() == f"error: UNAUTHENTICATED: {REFUSAL_MESSAGE}"
    assert client.main(["infer", *mutual, "--token", TOKEN]) == 0
    (tmp_path / "mine").write_text(OTHER + "\n")
    assert client.main(["infer", *mutual, "--token-file", str(tmp_path / "mine")]) == 0
    monkeypatch.setenv("CONVSERVE_TOKEN", TOKEN)  # read when the parser is built
    assert client.main(["metadata", *mutual]) == 0
    assert "model: tiny versions=['1']" in capsys.readouterr().out
    monkeypatch.setenv("CONVSERVE_TOKEN", "wrong-token")
    assert client.main(["metadata", *mutual]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert client.main(["health", *mutual]) == 0  # health: no token needed


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([], None),
        ([("authorization", "Bearer abc")], "abc"),
        ([("x-other", "1"), ("authorization", "BEARER   abc  ")], "abc"),
        ([("authorization", "Bearer")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "abc")], None),
        ([("authorization", "Bearer a"), ("authorization", "Bearer a")], None),
        ([("authorization-bin", b"Bearer abc")], None),
    ],
)
def test_bearer_token_takes_one_bearer_authorization_entry(
    metadata: list[tuple[str, Any]], token: str | None
) -> None:
    assert bearer_token(metadata) == token


def test_token_set_accepts_exactly_its_tokens() -> None:
    tokens = TokenSet(["alpha-token", "beta-token"])
    assert len(tokens) == 2
    assert tokens.accepts("alpha-token") and tokens.accepts("beta-token")
    for other in ("alpha-toke", "alpha-tokenx", "", "ALPHA-TOKEN", "gamma-token", "é"):
        assert not tokens.accepts(other), other


def test_token_files_are_checked_and_never_quoted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("# not a comment: a token\n\nshort\n")
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ConfigurationError, match=r"line 1: a token must be printable ASCII"):
            read_tokens(path)
        path.write_text("\n\nshort\n")
        assert len(read_tokens(path)) == 1
    assert f"token_file {path} line 3: a token of fewer than 16 characters" in caplog.text
    assert "short" not in caplog.text.replace(str(path), "")
    path.write_text("\n  \n")
    with pytest.raises(ConfigurationError, match=r"holds no token \(one a line\)"):
        read_tokens(path)
    path.write_text("tok\u00e9n-with-accent\n")
    with pytest.raises(ConfigurationError, match="line 1") as caught:
        read_tokens(path)
    assert "with-accent" not in str(caught.value)
    with pytest.raises(ConfigurationError, match=r"^cannot read token_file .*nowhere"):
        read_tokens(tmp_path / "nowhere")
