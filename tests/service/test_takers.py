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
from tests.service.conftest import RunningServer, StartServer, encode_image, random_images
from tests.service.gates import BatchGate, wait_until
from tests.service.test_auth import TOKEN, bearer
from tests.service.test_inference_api import infer_request, logits_of


def _pending_takers(loop: asyncio.AbstractEventLoop) -> list[str]:
    async def names() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("take ")]

    return asyncio.run_coroutine_threadsafe(names(), loop).result(10)


def served_by_grpc_aio_alone(running: RunningServer) -> None:
    """No taker waits, and calls are answered all the same (by grpc.aio's own request)."""
    assert _pending_takers(running.loop) == []
    stub = running.inference_stub()
    for seed in range(4):
        assert stub.ModelInfer(infer_request(random_images(1, seed=seed)), timeout=10).outputs
    assert running.server._takers is not None and running.server._takers.taken == 0


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
    # gRPC core hands arriving calls to outstanding requests first in, first out, and each is
    # made again behind the others once used: 4 requests a method, so of 8 ModelInfer calls
    # the takers took 6 and of 4 Classify calls 3. Takers that did not ask again would take 6.
    assert running.server._takers is not None and running.server._takers.taken >= 7
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
    served_by_grpc_aio_alone(running)


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
    served_by_grpc_aio_alone(running)


def test_the_grpcio_installed_has_the_internals_the_takers_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """constraints.txt pins grpcio; an upgrade that drops one of them, or changes what they
    take, fails here by name (and the server warns and serves the plain way)."""
    assert takers._internals()[1] is None
    changed = {**takers.SIGNATURES, "_schedule_rpc_coro": ("rpc_coro", "loop")}
    monkeypatch.setattr(takers, "SIGNATURES", changed)
    module, problem = takers._internals()
    assert module is None
    assert problem == (
        f"this grpcio ({grpc.__version__}) has "
        "_schedule_rpc_coro(rpc_coro, rpc_state, loop, method_name)"
    )


def test_a_request_core_fails_while_the_server_runs_is_made_again() -> None:
    """Core fails an outstanding request while serving when the call it matched ended before
    it was handed over (its promise-based transport does): the taker asks again; it ends only
    when the server stops."""
    cygrpc, _ = takers._internals()

    class Core:
        def __init__(self) -> None:
            self.requests = 0

        def is_running(self) -> bool:
            return self.requests < 3

        async def _request_registered_call(self, method: bytes) -> None:
            self.requests += 1
            raise cygrpc._RequestCallError()

    core = Core()
    call_takers = takers.CallTakers(None, {}, (), 1)  # type: ignore[arg-type]
    asyncio.run(call_takers._take(cygrpc, core, None, "/inference.GRPCInferenceService/ModelInfer"))
    assert core.requests == 3  # failed twice while running, once at the stop
    assert (call_takers.failed_requests, call_takers.taken) == (2, 0)


def test_a_call_a_taker_took_is_answered_through_the_drain_and_the_takers_end(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    gate = BatchGate()
    running = start_server(tiny_repository, call_takers=1, max_batch_size=1, wrap_run=gate.wrap)
    server = running.server
    stub = running.inference_stub()
    inputs = [random_images(1, seed=seed) for seed in (5, 6)]
    calls = [stub.ModelInfer.future(infer_request(images), timeout=60) for images in inputs]
    wait_until(lambda: server.admission.in_flight == 2, "both calls taken")
    assert server._takers is not None and server._takers.taken == 1  # grpc.aio's took the other
    stopping = asyncio.run_coroutine_threadsafe(server.stop(60.0), running.loop)
    wait_until(lambda: server.admission.draining, "the drain to begin")
    gate.open()
    for images, call in zip(inputs, calls, strict=True):
        np.testing.assert_allclose(
            logits_of(call.result(timeout=60)), reference_logits(tiny_spec, images), atol=1e-5
        )
    stopping.result(timeout=60)
    assert _pending_takers(running.loop) == []
    assert server._takers._tasks == [] and not server._takers._calls


def test_the_takers_are_stopped_after_the_server_only(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository, call_takers=1)
    assert running.server._takers is not None
    with pytest.raises(RuntimeError, match="before the gRPC server stopped"):
        running.run(running.server._takers.stop(1.0))
    assert len(_pending_takers(running.loop)) == 2  # nothing was cancelled
