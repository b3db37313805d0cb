"""The extra requests for the next call (service/wire/takers.py), over real channels: calls they
take are answered like any other (interceptors included), a grpcio without the internals they
use is warned about and served the plain way, and they end with the server.

What they are for (calls taken up in bursts: throughput at load, other clients beside a flood of
expired calls) is measured, not asserted: tests/faults and docs/reliability.md."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto import classification_pb2 as cls_pb2
from service.wire import takers
from tests.model_factory import TinySpec, reference_logits
from tests.service.conftest import StartServer, encode_image, random_images
from tests.service.test_auth import TOKEN, bearer
from tests.service.test_inference_api import infer_request, logits_of


def _pending_takers(loop: asyncio.AbstractEventLoop) -> list[str]:
    async def names() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("take ")]

    return asyncio.run_coroutine_threadsafe(names(), loop).result(10)


def test_calls_the_takers_take_are_answered_like_any_other(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    running = start_server(tiny_repository, call_takers=3)
    assert sorted(_pending_takers(running.loop)) == sorted(
        ["take /inference.GRPCInferenceService/ModelInfer"] * 3
        + ["take /convserve.v1.ImageClassification/Classify"] * 3
    )
    stub = running.inference_stub()
    for seed in range(8):
        images = random_images(2, seed=seed)
        response = stub.ModelInfer(infer_request(images), timeout=10)
        np.testing.assert_allclose(
            logits_of(response), reference_logits(tiny_spec, images), atol=1e-5
        )
    image = encode_image(np.full((28, 28), 200, dtype=np.uint8))
    classify = running.classification_stub().Classify
    for _ in range(4):
        assert len(classify(cls_pb2.ClassifyRequest(images=[image]), timeout=10).results) == 1
    # gRPC core hands arriving calls to outstanding requests in the order they were made:
    # grpc.aio's own first, then the takers', and each is remade behind the others when used
    assert running.server._takers is not None and running.server._takers.taken >= 6
    assert (
        running.metric(
            "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer", code="OK"
        )
        == 8
    )


def test_interceptors_apply_to_the_calls_the_takers_take(
    start_server: StartServer, tiny_repository: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    running = start_server(tiny_repository, token_file=token_file, call_takers=2)
    stub = running.inference_stub()
    request = infer_request(random_images(1, seed=1))
    for _ in range(6):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert running.server._takers is not None and running.server._takers.taken >= 3
    assert stub.ModelInfer(request, timeout=10, metadata=bearer(TOKEN)).outputs


def test_none_asked_for_none_taken(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository, call_takers=0)
    assert _pending_takers(running.loop) == []
    stub = running.inference_stub()
    for seed in range(4):
        assert stub.ModelInfer(infer_request(random_images(1, seed=seed)), timeout=10).outputs
    assert running.server._takers is not None and running.server._takers.taken == 0


def test_a_grpcio_without_the_internals_is_named_and_served_the_plain_way(
    start_server: StartServer,
    tiny_repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(
        takers, "_internals", lambda: (None, "this grpcio (9.9.9) lacks _handle_rpc")
    )
    with caplog.at_level(logging.WARNING, logger="service"):
        running = start_server(tiny_repository, call_takers=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "call_takers 4: this grpcio (9.9.9) lacks _handle_rpc; serving with grpc.aio's one "
        "request per method" in message
        for message in warnings
    ), warnings
    assert _pending_takers(running.loop) == []
    stub = running.inference_stub()
    for seed in range(4):
        assert stub.ModelInfer(infer_request(random_images(1, seed=seed)), timeout=10).outputs
    assert running.server._takers is not None and running.server._takers.taken == 0


def test_the_grpcio_installed_has_the_internals_the_takers_use() -> None:
    """constraints.txt pins grpcio; an upgrade that drops one of them fails here, by name."""
    assert takers._internals()[1] is None


def test_the_takers_end_with_the_server(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository, call_takers=2)
    stub = running.inference_stub()
    assert stub.ModelInfer(infer_request(random_images(1, seed=3)), timeout=10).outputs
    loop = running.loop
    running.run(running.server.stop(1.0))
    assert _pending_takers(loop) == []
