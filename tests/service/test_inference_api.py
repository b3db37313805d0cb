"""KServe V2 over a real gRPC channel with the generated stubs: answers, typed inputs, errors.

Every error test sends the bad request, checks the status code and message, then checks that
the server still answers a good request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto import grpc_service_pb2 as pb2
from service.engine.batcher import PROBE_EVERY, QUIET_RUNS
from service.wire import converters
from tests.model_factory import TinySpec, reference_logits
from tests.service.conftest import RunningServer, StartServer, random_images
from tests.service.gates import BatchGate, FrozenClockLoop, wait_until


def infer_request(
    images: np.ndarray, model: str = "tiny", **kwargs: object
) -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name=model, **kwargs)  # type: ignore[arg-type]
    request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


def logits_of(response: pb2.ModelInferResponse) -> np.ndarray:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(shape)


def assert_still_serving(running: RunningServer, model: str = "tiny") -> None:
    images = random_images(1, seed=99)
    response = running.inference_stub().ModelInfer(infer_request(images, model), timeout=10)
    np.testing.assert_allclose(logits_of(response), reference_logits(TinySpec(), images), atol=1e-5)


def ask_classification(request: pb2.ModelInferRequest, k: int) -> None:
    request.outputs.add(name="logits").parameters["classification"].int64_param = k


def wait_for_in_flight(running: RunningServer, model: str, count: int) -> None:
    """Waits until `count` requests of the model were accepted (so arrival order is known)."""
    wait_until(
        lambda: running.metric("convserve_requests_in_flight", model=model, version="1") == count,
        f"{count} requests of {model} in flight",
    )


def queue_depth(running: RunningServer, model: str = "tiny") -> float | None:
    return running.metric("convserve_queue_depth", model=model, version="1")


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.fixture
def tiny_server(start_server: StartServer, tiny_repository: Path) -> RunningServer:
    return start_server(tiny_repository)


def test_liveness_readiness_and_metadata(tiny_server: RunningServer) -> None:
    stub = tiny_server.inference_stub()
    assert stub.ServerLive(pb2.ServerLiveRequest()).live
    assert stub.ServerReady(pb2.ServerReadyRequest()).ready
    assert stub.ModelReady(pb2.ModelReadyRequest(name="tiny")).ready
    assert stub.ModelReady(pb2.ModelReadyRequest(name="tiny", version="1")).ready
    assert not stub.ModelReady(pb2.ModelReadyRequest(name="tiny", version="2")).ready
    assert not stub.ModelReady(pb2.ModelReadyRequest(name="nope")).ready
    server = stub.ServerMetadata(pb2.ServerMetadataRequest())
    assert server.name == "convserve" and "classification" in server.extensions
    model = stub.ModelMetadata(pb2.ModelMetadataRequest(name="tiny"))
    assert (model.name, list(model.versions), model.platform) == ("tiny", ["1"], "onnxruntime_onnx")
    assert list(model.inputs[0].shape) == [-1, 1, 28, 28]


def test_one_client_at_a_time_gets_the_same_answers_when_batches_run_on_the_loop(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    """Sequential requests: the first batch goes to the runtime's thread (its cost is not known
    yet), the others run on the event loop: queued and computed at the end of their turn, then,
    after QUIET_RUNS such lone requests, computed at once, but one in PROBE_EVERY queued again.
    Every answer equals the reference, whichever way it ran. (The run-time bound is lifted so
    that the order of events alone decides, however slow the machine.)"""
    running = start_server(tiny_repository, inline_run_max_us=10**9)
    stub = running.inference_stub()
    requests = QUIET_RUNS + 2 * PROBE_EVERY
    for seed in range(requests):
        images = random_images(1 + seed % 3, seed=100 + seed)
        response = stub.ModelInfer(infer_request(images), timeout=60)
        np.testing.assert_allclose(
            logits_of(response), reference_logits(tiny_spec, images), rtol=1e-5, atol=1e-6
        )
    assert running.server.models is not None
    stats = running.server.models.resolve("tiny", "").batcher.stats
    assert stats.batches == requests
    assert stats.on_loop == requests - 1


def test_raw_inference_matches_the_reference(
    tiny_server: RunningServer, tiny_spec: TinySpec
) -> None:
    images = random_images(5, seed=1)
    response = tiny_server.inference_stub().ModelInfer(infer_request(images, id="abc"))
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "abc")
    assert response.outputs[0].datatype == "FP32"
    np.testing.assert_allclose(logits_of(response), reference_logits(tiny_spec, images), atol=1e-5)


def test_typed_contents_inference(tiny_server: RunningServer, tiny_spec: TinySpec) -> None:
    images = random_images(2, seed=2)
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    response = tiny_server.inference_stub().ModelInfer(request)
    np.testing.assert_allclose(logits_of(response), reference_logits(tiny_spec, images), atol=1e-5)


def test_model_name_may_be_omitted_when_there_is_one_model(tiny_server: RunningServer) -> None:
    response = tiny_server.inference_stub().ModelInfer(infer_request(random_images(1, 3), model=""))
    assert response.model_name == "tiny"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "datatype FP32; model tiny expects"),
        (lambda r: r.inputs[0].shape.__setitem__(3, 27), "shape [1, 1, 28, 27]"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"123"), "raw contents are 3 bytes"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "unknown input 'x'"),
        (lambda r: r.outputs.add(name="probabilities"), "unknown output 'probabilities'"),
        (lambda r: ask_classification(r, -2), "classification must be in 1..100"),
    ],
)
def test_invalid_argument(tiny_server: RunningServer, mutate, message: str) -> None:
    request = infer_request(random_images(1, seed=4))
    mutate(request)
    error = rpc_error(tiny_server.inference_stub().ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert_still_serving(tiny_server)


def test_not_found_names_what_exists(tiny_server: RunningServer) -> None:
    stub = tiny_server.inference_stub()
    error = rpc_error(stub.ModelInfer, infer_request(random_images(1, 5), model="mnist"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'mnist'; available: tiny" in error.details()
    error = rpc_error(stub.ModelInfer, infer_request(random_images(1, 5), model_version="7"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "version '7' is not served; ready versions: 1" in error.details()
    error = rpc_error(stub.ModelMetadata, pb2.ModelMetadataRequest(name="mnist"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert_still_serving(tiny_server)


def test_unavailable_while_models_load(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository, load=False)
    stub = running.inference_stub()
    assert stub.ServerLive(pb2.ServerLiveRequest()).live
    assert not stub.ServerReady(pb2.ServerReadyRequest()).ready
    error = rpc_error(stub.ModelInfer, infer_request(random_images(1, 6)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "model tiny is still loading" in error.details()
    running.load()
    assert stub.ServerReady(pb2.ServerReadyRequest()).ready
    assert_still_serving(running)


def test_resource_exhausted_when_the_queue_is_full(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    gate = BatchGate()
    running = start_server(tiny_repository, max_batch_size=1, queue_capacity=2, wrap_run=gate.wrap)
    stub = running.inference_stub()
    inputs = [random_images(1, seed) for seed in range(3)]
    computing = stub.ModelInfer.future(infer_request(inputs[0]), timeout=60)
    gate.wait_arrived(1)  # the first request computes (at the gate), out of the queue
    queued = [stub.ModelInfer.future(infer_request(x), timeout=60) for x in inputs[1:]]
    wait_until(lambda: queue_depth(running) == 2, "two queued requests")

    refused = rpc_error(stub.ModelInfer, infer_request(random_images(1, 9)), timeout=60)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details() == (
        "model tiny is overloaded: 2 of 2 queue places taken, 1 needed; retry later"
    )
    assert running.metric("convserve_queue_rejections_total", model="tiny", version="1") == 1
    assert running.metric(
        "convserve_requests_total", model="tiny", version="1", rpc="ModelInfer",
        code="RESOURCE_EXHAUSTED",
    ) == 1  # fmt: skip
    gate.open()
    for images, future in zip(inputs, [computing, *queued], strict=True):
        np.testing.assert_allclose(
            logits_of(future.result(timeout=60)), reference_logits(tiny_spec, images), atol=1e-5
        )
    assert_still_serving(running)


def test_deadline_exceeded_before_compute(start_server: StartServer, tiny_repository: Path) -> None:
    gate = BatchGate()
    running = start_server(tiny_repository, max_batch_size=1, wrap_run=gate.wrap)
    stub = running.inference_stub()
    busy = [stub.ModelInfer.future(infer_request(random_images(1, i))) for i in range(3)]
    wait_for_in_flight(running, "tiny", 3)
    # Both wait behind the shut gate: Triton's per-request `timeout` parameter (µs; 1 µs is
    # over long before the gate opens) ...
    late = infer_request(random_images(1, 10))
    late.parameters["timeout"].int64_param = 1
    late_future = stub.ModelInfer.future(late, timeout=60)
    # ... and a plain gRPC deadline, which the client reports itself.
    short = stub.ModelInfer.future(infer_request(random_images(1, 11)), timeout=0.05)
    assert rpc_error(short.result).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_in_flight(running, "tiny", 4)  # `short` was cancelled server-side too
    gate.open()
    error = rpc_error(late_future.result)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed after" in error.details() and "not computed" in error.details()
    for future in busy:
        future.result(timeout=60)
    assert_still_serving(running)  # queued after the two, so they were dropped before it
    model = running.server.models.resolve("tiny")  # type: ignore[union-attr]
    assert model.batcher.stats.dropped == 2
    assert running.metric("convserve_images_total", model="tiny", version="1") == 3 + 1
    assert gate.arrived == [1, 1, 1, 1]  # neither expired request reached the runtime


def test_a_call_already_expired_on_arrival_is_refused_before_any_work(
    tiny_server: RunningServer,
) -> None:
    """A gRPC deadline that passed before the handler ran: counted as DEADLINE_EXCEEDED,
    nothing decoded or queued, and the handler ends as gRPC ends a cancelled one (the client
    has stopped waiting; gRPC answers it). Checked in-process: a client stops waiting first."""
    from service.wire.status import EXPIRED_ON_ARRIVAL, Call

    class Expired:
        def time_remaining(self) -> float:
            return -0.001

        async def abort(self, code: grpc.StatusCode, message: str) -> None:
            raise grpc.aio.AbortError(f"{code.name}: {message}")

    async def call() -> str:
        try:
            async with Call("ModelInfer", Expired(), tiny_server.server.metrics):  # type: ignore[arg-type]
                raise AssertionError("the body ran")
        except asyncio.CancelledError as ended:
            return str(ended)

    assert tiny_server.run(call()) == EXPIRED_ON_ARRIVAL
    assert tiny_server.metric(
        "convserve_requests_total", model="", version="", rpc="ModelInfer",
        code="DEADLINE_EXCEEDED",
    ) == 1  # fmt: skip


def test_a_call_whose_deadline_passes_before_its_answer_gets_none_and_no_error_logged(
    tiny_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The deadline passes while the call computes or waits: gRPC has ended it (its client got
    DEADLINE_EXCEEDED), so neither a response nor an error status is sent on it (grpc.aio would
    log the failed send at ERROR with a traceback, once per call: seen under a flood of
    expired calls). Counted as DEADLINE_EXCEEDED; the handler ends as a cancelled one does.
    And where gRPC ends the call between the check and the send, the failed send is the same."""
    from grpc._cython.cygrpc import ExecuteBatchError

    from service.errors import DeadlineExceeded, InvalidInput
    from service.wire.status import EXPIRED_BEFORE_ANSWER, Call

    class Context:
        def __init__(self, remaining: list[float], send_fails: bool = False) -> None:
            self.remaining, self.send_fails, self.sent = remaining, send_fails, 0

        def time_remaining(self) -> float:
            return self.remaining.pop(0)

        async def abort(self, code: grpc.StatusCode, message: str) -> None:
            if self.send_fails:
                raise ExecuteBatchError("Failed execute_batch")
            self.sent += 1
            raise grpc.aio.AbortError(f"{code.name}: {message}")

    async def call(context: Context, error: BaseException | None) -> str:
        try:
            async with Call("ModelInfer", context, tiny_server.server.metrics):  # type: ignore[arg-type]
                if error is not None:
                    raise error
        except asyncio.CancelledError as ended:
            return str(ended)
        return "answered"

    def deadline_exceeded() -> float:
        return tiny_server.metric(
            "convserve_requests_total", model="", version="", rpc="ModelInfer",
            code="DEADLINE_EXCEEDED",
        ) or 0  # fmt: skip

    with caplog.at_level(logging.DEBUG, logger="service"):
        computed, queued = Context([1.0, -0.001]), Context([1.0, -0.001])
        assert tiny_server.run(call(computed, None)) == EXPIRED_BEFORE_ANSWER
        assert tiny_server.run(call(queued, DeadlineExceeded("dropped"))) == EXPIRED_BEFORE_ANSWER
        refused = Context([1.0, 0.5], send_fails=True)
        assert tiny_server.run(call(refused, InvalidInput("bad"))) == EXPIRED_BEFORE_ANSWER
    assert computed.sent == queued.sent == refused.sent == 0
    assert deadline_exceeded() == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    alive = Context([1.0, 0.5])  # a call still in time is answered as before
    with pytest.raises(grpc.aio.AbortError, match="INVALID_ARGUMENT: bad"):
        tiny_server.run(call(alive, InvalidInput("bad")))
    assert alive.sent == 1


def test_a_calls_deadlines_are_on_the_batchers_clock() -> None:
    """`Call.deadline` gives the gRPC deadline and Triton's `timeout` on `time.perf_counter`
    (the batcher's clock, whatever loop runs), the earlier of the two when both are set."""
    from service.wire.status import Call

    class Remaining:
        def time_remaining(self) -> float:
            return 5.0

    async def deadlines() -> tuple[float, float | None, float | None, float | None]:
        before = time.perf_counter()
        call = Call("ModelInfer", Remaining())  # type: ignore[arg-type]
        grpc_deadline = call.deadline()
        return before, grpc_deadline, call.deadline(2.0), call.deadline(9.0)

    with asyncio.Runner(loop_factory=FrozenClockLoop) as runner:
        before, grpc_deadline, sooner, later = runner.run(deadlines())
    after = time.perf_counter()
    assert grpc_deadline is not None and before + 5.0 <= grpc_deadline <= after + 5.0
    assert sooner is not None and before + 2.0 <= sooner <= after + 2.0  # timeout first
    assert later == grpc_deadline  # the gRPC deadline first


def test_internal_errors_hide_details_and_log_them(
    tiny_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_server.server.models.resolve("tiny")  # type: ignore[union-attr]
    original = model.batcher._run_batch

    async def explode(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("secret stack detail")

    model.batcher._run_batch = explode
    with caplog.at_level(logging.ERROR):
        error = rpc_error(
            tiny_server.inference_stub().ModelInfer, infer_request(random_images(1, 7))
        )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "internal error" in error.details()
    assert any("secret stack detail" in (r.exc_text or "") for r in caplog.records)
    model.batcher._run_batch = original
    assert_still_serving(tiny_server)


def test_other_rpcs_are_unimplemented_with_a_message(tiny_server: RunningServer) -> None:
    stub = tiny_server.inference_stub()
    stream = stub.ModelStreamInfer(iter([infer_request(random_images(1, 8))]))
    error = rpc_error(lambda: list(stream))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ModelStreamInfer is not implemented by convserve; implemented: ServerLive" in (
        error.details()
    )
    # Triton-only methods that are not in our proto (shared memory) get the same answer.
    raw = tiny_server.channel().unary_unary(
        "/inference.GRPCInferenceService/CudaSharedMemoryRegister"
    )
    error = rpc_error(raw, b"", timeout=5)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CudaSharedMemoryRegister is not implemented" in error.details()
    assert "RepositoryModelLoad" in error.details()  # the list of what is implemented
    assert_still_serving(tiny_server)


def test_oversized_message_is_refused_by_grpc(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository, max_message_bytes=4096)
    error = rpc_error(running.inference_stub().ModelInfer, infer_request(random_images(8, 9)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(running)


def test_large_typed_contents_are_converted_off_the_event_loop(
    start_server: StartServer, tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = converters.typed_to_uint8

    def recording(*args: Any) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(converters, "typed_to_uint8", recording)
    monkeypatch.setattr(converters, "INLINE_CONVERSION_LIMIT", 0)  # every typed input is large
    running = start_server(tiny_repository)
    images = random_images(2, 5)
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    response = running.inference_stub().ModelInfer(request)
    assert response.model_name == "tiny"
    assert threads and threads[0] != running.thread.name  # not the event loop's thread
