"""Metrics named as in docs/metrics.md, read from a fresh registry; batching under real load."""

from __future__ import annotations

import logging
import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from service._proto import classification_pb2 as cls_pb2
from service.engine import runtime
from tests.model_factory import TinySpec, reference_logits
from tests.service.conftest import StartServer, encode_image, random_images
from tests.service.gates import BatchGate, wait_until
from tests.service.test_inference_api import infer_request, logits_of

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_every_documented_metric_is_exposed(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository)
    running.inference_stub().ModelInfer(infer_request(random_images(1, 0)))
    documented = set(re.findall(r"^\| `(convserve_[a-z_]+)`", DOCS.read_text(), re.MULTILINE))
    assert len(documented) >= 16
    with urllib.request.urlopen(running.metrics_url, timeout=10) as reply:
        exposition = reply.read().decode()
    for name in documented:
        assert re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", exposition, re.MULTILINE), name
    assert "process_cpu_seconds_total" in exposition and "python_info" in exposition


def test_values_after_n_requests(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    running = start_server(tiny_repository, max_batch_size=8, queue_capacity=100)
    stub = running.inference_stub()
    for seed in range(4):
        stub.ModelInfer(infer_request(random_images(3, seed)))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(random_images(1, 9), model="nope"))
    images = [encode_image(np.zeros((28, 28), dtype=np.uint8))] * 2
    running.classification_stub().Classify(cls_pb2.ClassifyRequest(images=images))

    model = {"model": "tiny", "version": "1"}
    value = running.metric
    assert value("convserve_requests_total", **model, rpc="ModelInfer", code="OK") == 4
    assert value("convserve_requests_total", **model, rpc="Classify", code="OK") == 1
    assert (
        value("convserve_requests_total", model="", version="", rpc="ModelInfer", code="NOT_FOUND")
        == 1
    )
    assert value("convserve_request_latency_seconds_count", **model, rpc="ModelInfer") == 4
    assert value("convserve_images_total", **model) == 4 * 3 + 2
    assert value("convserve_image_decode_seconds_count", **model) == 2
    assert value("convserve_batch_size_count", **model) == 5
    assert value("convserve_batch_size_sum", **model) == 14
    assert value("convserve_queue_wait_seconds_count", **model) == 5
    assert value("convserve_batch_compute_seconds_count", **model) == 5
    assert value("convserve_queue_depth", **model) == 0
    assert value("convserve_queue_capacity", **model) == 100
    assert value("convserve_requests_in_flight", **model) == 0
    assert value("convserve_queue_rejections_total", **model) == 0
    assert value("convserve_model_ready", **model) == 1
    assert value("convserve_server_ready") == 1
    assert (
        value("convserve_model_info", **model, provider="CPUExecutionProvider", requested="cpu")
        == 1
    )
    assert value("convserve_provider_fallback", **model) == 0
    assert value("convserve_model_load_seconds", **model) > 0


def test_server_ready_drops_when_draining(start_server: StartServer, tiny_repository: Path) -> None:
    running = start_server(tiny_repository)
    assert running.metric("convserve_server_ready") == 1
    running.run(running.server.stop(0.5))
    assert running.metric("convserve_server_ready") == 0
    # every version was unloaded: its gauges went with it (a 0 would read as a failed load)
    assert running.metric("convserve_model_ready", model="tiny", version="1") is None


def test_cuda_request_falling_back_to_cpu_is_loud(
    start_server: StartServer, tiny_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        running = start_server(tiny_repository, providers="cuda")
    model = running.server.models.resolve("tiny")  # type: ignore[union-attr]
    if model.runtime.provider == "CUDAExecutionProvider":
        pytest.skip("CUDA works on this machine: nothing falls back")
    labels = {"model": "tiny", "version": "1"}
    assert running.metric("convserve_provider_fallback", **labels) == 1
    info = {"provider": "CPUExecutionProvider", "requested": "cuda"}
    assert running.metric("convserve_model_info", **labels, **info) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "asked for CUDA" in r.getMessage() and "runs on the CPU" in r.getMessage() for r in warnings
    )


def test_auto_without_a_gpu_device_uses_the_cpu_quietly_and_is_no_fallback(
    start_server: StartServer,
    tiny_repository: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "gpu_device_present", lambda: False)
    with caplog.at_level(logging.INFO, logger="service.engine.runtime"):
        running = start_server(tiny_repository, providers="auto")
    labels = {"model": "tiny", "version": "1"}
    assert running.metric("convserve_provider_fallback", **labels) == 0
    info = {"provider": "CPUExecutionProvider", "requested": "auto"}
    assert running.metric("convserve_model_info", **labels, **info) == 1
    messages = [r.getMessage() for r in caplog.records]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert any(
            "providers=auto: no NVIDIA GPU found, using CPUExecutionProvider" in m for m in messages
        )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_with_a_gpu_device_that_ends_on_the_cpu_is_a_fallback(
    start_server: StartServer, tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA provider: auto never asks for CUDA")
    monkeypatch.setattr(runtime, "gpu_device_present", lambda: True)
    running = start_server(tiny_repository, providers="auto")
    model = running.server.models.resolve("tiny")  # type: ignore[union-attr]
    if model.runtime.provider == "CUDAExecutionProvider":
        pytest.skip("CUDA works on this machine: nothing falls back")
    assert running.metric("convserve_provider_fallback", model="tiny", version="1") == 1


GPU_BUILD = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ONLY = ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("setting", "available", "gpu_present", "expected"),
    [
        ("cpu", GPU_BUILD, True, CPU_ONLY),
        ("auto", CPU_ONLY, True, CPU_ONLY),
        ("auto", GPU_BUILD, False, CPU_ONLY),
        ("auto", GPU_BUILD, True, GPU_BUILD),
        ("cuda", CPU_ONLY, False, GPU_BUILD),
    ],
)
def test_requested_providers(
    setting: str, available: list[str], gpu_present: bool, expected: list[str]
) -> None:
    assert runtime.requested_providers(setting, available, gpu_present) == expected


def test_concurrent_requests_are_batched_and_answered_with_their_own_results(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    gate = BatchGate()
    running = start_server(tiny_repository, max_batch_size=16, wrap_run=gate.wrap)
    stub = running.inference_stub()
    inputs = [random_images(1 + i % 3, seed=100 + i) for i in range(24)]
    futures = [stub.ModelInfer.future(infer_request(inputs[0]), timeout=60)]
    gate.wait_arrived(1)  # the first computes alone (a lone request never waits) ...
    futures += [stub.ModelInfer.future(infer_request(x), timeout=60) for x in inputs[1:]]
    labels = {"model": "tiny", "version": "1"}
    queued = sum(len(x) for x in inputs[1:])
    wait_until(  # ... while the rest pile up behind it
        lambda: running.metric("convserve_queue_depth", **labels) == queued, "the queue to fill"
    )
    gate.open()
    for images, future in zip(inputs, futures, strict=True):
        np.testing.assert_allclose(
            logits_of(future.result(timeout=60)), reference_logits(tiny_spec, images), atol=1e-5
        )
    # The queued requests share batches of at most 16 items, no request split.
    assert gate.arrived[0] == 1 and all(1 < size <= 16 for size in gate.arrived[1:])
    assert sum(gate.arrived) == sum(len(x) for x in inputs)
    assert running.metric("convserve_batch_size_count", **labels) == len(gate.arrived)
    assert running.metric("convserve_batch_size_sum", **labels) == sum(gate.arrived)
    assert running.metric("convserve_batch_size_bucket", **labels, le="1.0") == 1
    stats = running.server.models.resolve("tiny").batcher.stats  # type: ignore[union-attr]
    assert stats.largest_batch == max(gate.arrived)
