"""Fixtures of the service tests: real servers on 127.0.0.1, port 0.

`start_server(repository, **settings)` starts an `InferenceServer` in a background thread with
its own event loop (so sync and async tests can both talk to it over real gRPC channels), waits
until its models are loaded, and stops it at the end of the test. It returns a `RunningServer`
with the address, the server object and its private Prometheus registry. For a server with TLS
pass `channel_credentials=grpc.ssl_channel_credentials(...)`: its channels use them. The
round-trip test (train -> export -> serve -> classify) reuses it with the trained repository.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from service._proto import classification_pb2_grpc as cls_grpc
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.server import InferenceServer
from service.settings import Settings
from tests.certificates import Pki, make_pki
from tests.model_factory import TinySpec, write_version

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningServer:
    """A server running in its own thread and event loop."""

    server: InferenceServer
    registry: CollectorRegistry
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    channels: list[grpc.Channel] = field(default_factory=list)
    credentials: grpc.ChannelCredentials | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def load(self) -> None:
        self.run(self.server.load_models())

    def channel(self) -> grpc.Channel:
        """A channel to the gRPC port: TLS with `credentials` when the test gave them."""
        if self.credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, self.credentials)
        self.channels.append(channel)
        return channel

    def inference_stub(self) -> pb2_grpc.GRPCInferenceServiceStub:
        return pb2_grpc.GRPCInferenceServiceStub(self.channel())

    def classification_stub(self) -> cls_grpc.ImageClassificationStub:
        return cls_grpc.ImageClassificationStub(self.channel())

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def stop(self, grace_s: float = 1.0) -> None:
        for channel in self.channels:
            channel.close()
        if self.loop.is_running():
            self.run(self.server.stop(grace_s))
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _start(repository: Path, load: bool, overrides: dict[str, Any]) -> RunningServer:
    values: dict[str, Any] = {
        "model_repository": repository,
        "host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "providers": "cpu",
        "intra_op_threads": 1,
        "grace_period_s": 2.0,
    }
    wrap_run = overrides.pop("wrap_run", None)
    credentials = overrides.pop("channel_credentials", None)
    values.update(overrides)
    registry = CollectorRegistry()
    server = InferenceServer(Settings(**values), registry=registry, wrap_run=wrap_run)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()
    running = RunningServer(server, registry, loop, thread, credentials=credentials)
    try:
        running.run(server.start())
        if load:
            running.load()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        raise
    return running


StartServer = Callable[..., RunningServer]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """`start_server(repository, load=True, wrap_run=None, channel_credentials=None,
    **settings)` -> RunningServer, stopped afterwards (`wrap_run=gate.wrap` holds its batches
    at a BatchGate; `channel_credentials` are what its channels use)."""
    started: list[RunningServer] = []

    def start(repository: Path, load: bool = True, **settings: Any) -> RunningServer:
        running = _start(repository, load, settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def two_version_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` versions 1 (seed 1) and 2 (seed 2): different weights, same shape."""
    repository = tmp_path_factory.mktemp("two-versions")
    write_version(repository, "tiny", 1, TinySpec(seed=1))
    write_version(repository, "tiny", 2, TinySpec(seed=2))
    return repository


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CAs and certificates for 127.0.0.1 (tests/certificates.py), made once per session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


class RecordedSession:
    """An ONNX Runtime session that records the batch sizes it runs (put in place of one of a
    model's sessions)."""

    def __init__(self, session: object) -> None:
        self.session = session
        self.sizes: list[int] = []

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> object:
        self.sizes.extend(len(images) for images in feeds.values())
        return self.session.run(names, feeds)  # type: ignore[attr-defined]


def random_images(count: int, seed: int, spec: TinySpec | None = None) -> np.ndarray:
    spec = spec or TinySpec()
    rng = np.random.default_rng(seed)
    return rng.integers(
        0, 256, size=(count, spec.channels, spec.height, spec.width), dtype=np.uint8
    )


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """[H, W] (L) or [H, W, 3] (RGB) uint8 -> encoded bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def python() -> str:
    return sys.executable
