"""The composition root: settings -> model repository -> runtime -> batcher -> servicers -> server.

    python -m service --model-repository model_repository [--grpc-port 8001] [--metrics-port 8002]
    python -m service --tls-cert-file server.pem --tls-key-file server.key --token-file tokens \
        --health-port 8003        # TLS, bearer tokens, plaintext health for probes (security.md)

Lifecycle: the gRPC port opens first (ServerLive true, health NOT_SERVING), then every model is
loaded and warmed up, then health turns SERVING and the port file is written. On SIGTERM or
SIGINT health turns NOT_SERVING and every new call is refused with UNAVAILABLE and a message;
the calls taken before get their answers (up to `grace_period_s`), and the process exits as
soon as the last one is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import signal
import sys
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from service._proto import classification_pb2 as cls_pb2
from service._proto import grpc_service_pb2 as pb2
from service.engine.admission import Admission
from service.engine.batcher import Batcher, RunBatch, RunInline
from service.engine.classify import Classifier
from service.engine.explain import Explainer
from service.engine.manager import LoadedModel, ModelManager
from service.engine.runtime import AUTO_SLOTS, OnnxModel, RuntimeOptions, warm_up_batch_sizes
from service.errors import ConfigurationError
from service.observability.metrics import Metrics
from service.repository.disk import ModelRepository, VersionDir
from service.repository.policy import Batching, ControlMode
from service.settings import Settings, settings_from
from service.wire.auth import TokenAuthInterceptor, read_tokens
from service.wire.handlers import add_servicer
from service.wire.health import SERVICE_NAME as HEALTH_SERVICE
from service.wire.health import HealthService
from service.wire.servicers import (
    ClassificationServicer,
    InferenceServicer,
    UnknownInferenceMethods,
)
from service.wire.takers import CallTakers
from service.wire.tls import server_credentials

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
CLASSIFICATION_SERVICE = cls_pb2.DESCRIPTOR.services_by_name["ImageClassification"]
SERVICE_NAMES = (INFERENCE_SERVICE.full_name, CLASSIFICATION_SERVICE.full_name)
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# The methods that carry the load: registered with gRPC core, each with `call_takers` more
# requests for its next call outstanding (service/wire/takers.py).
TAKEN_METHODS = {INFERENCE_SERVICE: ("ModelInfer",), CLASSIFICATION_SERVICE: ("Classify",)}
# gRPC core queues the calls that arrived before the event loop takes them up. Past its default
# limits (1,000, then a random early drop up to 3,000) it cancels them itself: CANCELLED, seen
# by no handler and no metric. The server refuses overload itself (RESOURCE_EXHAUSTED, with a
# message, counted), so core's queue is bounded far above a real backlog (2,000 concurrent
# calls pass), yet bounded: each queued call holds its message, and a flood of calls the loop
# cannot take up would otherwise grow the process by gigabytes (measured: 5 GB in 80 s).
# Core keeps one such queue per registered method (ModelInfer, Classify, the health methods)
# and one for the rest: the bound is per queue, and a flood of one method leaves the others'.
MAX_PENDING_CALLS = 10_000
# After the last call taken is answered, late callers are refused (UNAVAILABLE, "shutting
# down") until none has arrived for this long; only then does gRPC stop (see Admission.quiet).
DRAIN_QUIET_S = 0.2
# ... but no longer than this after the last call taken was answered: a client that polls (or
# retries at once) through the drain must not hold the process until the grace ends.
DRAIN_LINGER_MAX_S = 5.0
# Test seam: wraps each model's batch runner (tests pass a gate they open themselves).
WrapRun = Callable[[RunBatch], RunBatch]


def package_version() -> str:
    try:
        return importlib.metadata.version("convserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class InferenceServer:
    """One server process's objects, wired together, with start / load / stop."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        wrap_run: WrapRun | None = None,
    ) -> None:
        self.settings = settings
        self.admission = Admission()
        self._wrap_run = wrap_run
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.repository = ModelRepository(settings.model_repository)
        self.health = HealthService(SERVICE_NAMES)
        self.models: ModelManager | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.health_port: int | None = None
        self._runtime_options = RuntimeOptions(
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            graph_optimization_level=settings.graph_optimization_level,
            executor_threads=settings.max_concurrent_batches,
            spinning=settings.intra_op_spinning,
        )
        self._decode_executor: ThreadPoolExecutor | None = None
        self._grpc: grpc.aio.Server | None = None
        self._takers: CallTakers | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Scans the repository, opens the gRPC and metrics ports; models are not loaded yet."""
        s = self.settings
        entries = self.repository.scan()
        if not entries and s.model_control_mode == "none":
            logger.warning("no models in %s: the server will never be ready", s.model_repository)
        self.models = ModelManager(
            self.repository,
            self._load_version,
            policy=s.policy,
            pinned=s.model_versions,
            batching=s.batching,
            mode=typing.cast(ControlMode, s.model_control_mode),
            default_model=s.default_model,
            observer=self.metrics,
            on_change=self._publish_readiness,
        )
        self.models.discover(entries, s.load_models)
        self._decode_executor = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
        classifier = Classifier(
            self._decode_executor,
            max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels,
            max_top_k=s.max_top_k,
            image_formats=s.image_formats,
        )
        interceptors = self._interceptors()
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared silently
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ],
        )
        inference = InferenceServicer(
            self.models,
            self.metrics,
            admission=self.admission,
            server_ready=self.ready,
            max_top_k=s.max_top_k,
            version=package_version(),
        )
        taken = add_servicer(
            server, inference, INFERENCE_SERVICE, self.metrics, TAKEN_METHODS[INFERENCE_SERVICE]
        )
        explainer = Explainer(classifier, s.max_explain_positions)
        classification = ClassificationServicer(
            self.models, self.metrics, classifier, self.admission, explainer
        )
        taken |= add_servicer(
            server,
            classification,
            CLASSIFICATION_SERVICE,
            self.metrics,
            TAKEN_METHODS[CLASSIFICATION_SERVICE],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if s.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, HEALTH_SERVICE, reflection.SERVICE_NAME), server
            )
        server.add_generic_rpc_handlers((UnknownInferenceMethods(),))
        self.grpc_port = self._listen(server)
        health_server = self._health_server()
        metrics_host = s.metrics_bind_host
        try:
            self._metrics_http, self.metrics_port = self.metrics.serve_http(
                metrics_host, s.metrics_port
            )
        except OSError as error:
            raise ConfigurationError(
                f"cannot listen on {metrics_host}:{s.metrics_port} (metrics): {error}"
            ) from None
        await self._publish_readiness()
        await server.start()
        self._grpc = server
        if health_server is not None:
            await health_server.start()
            self._health_grpc = health_server
        self._takers = CallTakers(server, taken, interceptors, s.call_takers)
        self._takers.start()
        logger.info(
            "listening: gRPC %s:%s (%s), metrics http://%s:%s/metrics%s; event loop %s",
            s.host, self.grpc_port, _transport(s), metrics_host, self.metrics_port,
            "" if self.health_port is None
            else f", plaintext health {s.health_host}:{self.health_port}",
            running_loop_name(),
        )  # fmt: skip

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The token check, when a token file is set (read here: a bad one stops the start)."""
        s = self.settings
        if s.token_file is None:
            return []
        tokens = read_tokens(s.token_file)
        exempt = () if s.auth_health else (HEALTH_SERVICE,)
        services = (INFERENCE_SERVICE, CLASSIFICATION_SERVICE, REFLECTION_SERVICE)
        health = health_pb2.DESCRIPTOR.services_by_name["Health"]
        logger.info(
            "bearer tokens required (%d accepted, from %s); health %s",
            len(tokens), s.token_file, "too" if s.auth_health else "exempt",
        )  # fmt: skip
        if not s.tls:
            logger.warning(
                "bearer tokens without TLS travel in cleartext: set tls_cert_file and "
                "tls_key_file, or terminate TLS in front of the server (docs/security.md)"
            )
        return [TokenAuthInterceptor(tokens, self.metrics, (*services, health), exempt)]

    def _listen(self, server: grpc.aio.Server) -> int:
        """Opens the gRPC port, with TLS when a certificate is set; returns the bound port."""
        s = self.settings
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert_file is None or s.tls_key_file is None:
            try:
                return server.add_insecure_port(address)
            except RuntimeError as error:
                raise ConfigurationError(f"cannot listen on {address}: {error}") from None
        credentials = server_credentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        try:
            return server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise ConfigurationError(
                f"cannot listen on {address} with TLS: {error} (is the port free, and is "
                f"tls_key_file {s.tls_key_file} the key of tls_cert_file {s.tls_cert_file}?)"
            ) from None

    def _health_server(self) -> grpc.aio.Server | None:
        """The plaintext health-only port (same HealthService), when health_port is set."""
        s = self.settings
        if s.health_port is None:
            return None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{s.health_host}:{s.health_port}"
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise ConfigurationError(f"cannot listen on {address} (health): {error}") from None
        return server

    async def _load_version(
        self, name: str, version_dir: VersionDir, batching: Batching
    ) -> LoadedModel:
        """The model manager's loader: session, warm-up at every batch size, batcher."""
        s = self.settings
        number = version_dir.number
        started = time.perf_counter()
        # The tests' gates hold "the one run": auto is one slot there.
        auto_slots = AUTO_SLOTS if self._wrap_run is None else 1
        options = dataclasses.replace(
            self._runtime_options,
            executor_threads=batching.max_concurrent_batches or auto_slots,
        )
        runtime = await asyncio.to_thread(
            OnnxModel.load, name, number, version_dir.model_path, options
        )
        run_inline: RunInline | None = runtime.run_now
        run: RunBatch = runtime.run
        run_alone: RunBatch | None = runtime.run_alone
        if self._wrap_run is not None:  # the tests' gates: the one run, nothing bypasses it
            run, run_inline, run_alone = self._wrap_run(runtime.run), None, None
        sizes = warm_up_batch_sizes(batching.max_batch_size)
        try:
            auto = batching.max_concurrent_batches == 0 and auto_slots > 1
            slots = await asyncio.to_thread(runtime.prepare_slots, auto)
            await asyncio.to_thread(runtime.warm_up, sizes)
            if run_inline is not None:
                await asyncio.to_thread(
                    runtime.prepare_loop_session, batching.inline_run_max_s, sizes
                )
        except Exception:
            runtime.close()
            raise
        metrics = self.metrics.for_model(name, number)
        batcher = Batcher(
            run,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_s,
            queue_capacity=batching.queue_capacity,
            max_concurrent_batches=slots,
            observer=metrics,
            name=name,
            run_inline=run_inline,
            inline_max_s=batching.inline_run_max_s,
            run_alone=run_alone if runtime.shares_cores else None,
        )
        batcher.start()
        load_s = time.perf_counter() - started
        metrics.set_queue_capacity(batching.queue_capacity)
        metrics.loaded(load_s, runtime.provider, s.providers, runtime.fallback)
        logger.info(
            "model %s version %s loaded in %.2f s on %s (%d labels, input %s)",
            name, number, load_s, runtime.provider, len(runtime.spec.labels),
            runtime.spec.input_shape,
        )  # fmt: skip
        batching = dataclasses.replace(batching, max_concurrent_batches=slots)  # auto resolved
        return LoadedModel(runtime.spec, runtime, batcher, metrics, batching)

    async def load_models(self) -> None:
        """Loads and warms the models (all, or --load-model's in explicit mode), publishes
        readiness, writes the port file, then polls the repository (mode poll)."""
        assert self.models is not None
        s = self.settings
        await self.models.start(s.load_models)
        await self._publish_readiness()
        if s.port_file is not None:
            write_port_file(s.port_file, self.grpc_port, self.metrics_port, self.health_port)
        logger.info(
            "startup finished: %s; model control mode %s%s",
            "READY" if self.ready() else "NOT READY", s.model_control_mode,
            f", polling every {s.repository_poll_s:g} s" if s.model_control_mode == "poll" else "",
        )  # fmt: skip
        if s.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll_repository(), name="repository-poll")

    async def _poll_repository(self) -> None:
        """Rescans the repository every repository_poll_s (mode poll) until the server stops.
        A failed scan is logged and counted; the versions serving go on serving."""
        assert self.models is not None
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.models.sync()
            except Exception as error:
                self.metrics.repository_polled(ok=False)
                logger.error("polling the model repository failed: %s", error, exc_info=True)
            else:
                self.metrics.repository_polled(ok=True)

    def ready(self) -> bool:
        """Server readiness (ServerReady, health, convserve_server_ready)."""
        if self.admission.draining or self.models is None or self.models.starting:
            return False
        if self.settings.strict_readiness:
            return self.models.all_ready()
        return self.models.any_ready()

    async def _publish_readiness(self) -> None:
        ready = self.ready()
        self.metrics.server_ready.set(1 if ready else 0)
        await self.health.set_serving(ready)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING, refuse new calls with UNAVAILABLE, answer every call taken
        before (for up to `grace_s`), then close gRPC and free everything at once."""
        if self.admission.draining:
            return
        loop = asyncio.get_running_loop()
        grace_s = self.settings.grace_period_s if grace_s is None else grace_s
        ends_at = loop.time() + grace_s
        self.admission.begin_drain()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self.metrics.server_ready.set(0)
        await self.health.set_serving(False)
        if not await self.admission.drained(grace_s):
            logger.warning(
                "grace period of %.1f s over: %d calls still unanswered are cancelled",
                grace_s, self.admission.in_flight,
            )  # fmt: skip
        await self.admission.quiet(
            DRAIN_QUIET_S, until=min(ends_at, loop.time() + DRAIN_LINGER_MAX_S)
        )
        logger.info("drained: %d calls refused while draining", self.admission.refused)
        await self.health.close(timeout_s=max(0.0, min(1.0, ends_at - loop.time())))
        for server in (self._grpc, self._health_grpc):
            if server is not None:
                # Only refusals and health calls can still be running: they end at once.
                await server.stop(max(0.0, ends_at - loop.time()))
        if self._takers is not None:
            await self._takers.stop(max(0.0, ends_at - loop.time()))
        if self.models is not None:
            await self.models.close()
        if self._decode_executor is not None:
            self._decode_executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
        logger.info("stopped")


def write_port_file(
    path: Path, grpc_port: int, metrics_port: int, health_port: int | None = None
) -> None:
    """Writes {"grpc_port": N, "metrics_port": M} (and "health_port" when there is one)
    atomically (readers never see half a file)."""
    ports = {"grpc_port": grpc_port, "metrics_port": metrics_port}
    if health_port is not None:
        ports["health_port"] = health_port
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(ports))
    temporary.replace(path)


def _transport(settings: Settings) -> str:
    if not settings.tls:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"


async def serve(settings: Settings, *, wrap_run: WrapRun | None = None) -> int:
    """Runs a server until SIGTERM or SIGINT, then drains it; returns the exit status."""
    server = InferenceServer(settings, wrap_run=wrap_run)
    await server.start()
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loading = asyncio.create_task(server.load_models())

    def stop_if_failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            stop_requested.set()

    loading.add_done_callback(stop_if_failed)
    await stop_requested.wait()
    failed = loading.done() and not loading.cancelled() and loading.exception() is not None
    if failed:
        logger.error("startup failed: stopping", exc_info=loading.exception())
    else:
        logger.info("shutdown requested: draining for up to %.1f s", settings.grace_period_s)
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
    await server.stop()
    return 1 if failed else 0


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop `event_loop` names. A missing uvloop stops the start with a message rather than
    falling back in silence to the slower loop."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        raise ConfigurationError(
            "event_loop uvloop: uvloop is not installed (pip install uvloop, or choose asyncio)"
        ) from None
    return uvloop.new_event_loop


def running_loop_name() -> str:
    """The running loop's library and version, for the start-up log: what runs, not what was
    asked for."""
    module = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    if module == "uvloop":
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return f"asyncio (Python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m service`: parses flags and CONVSERVE_* variables, serves."""
    try:
        settings = settings_from(sys.argv[1:] if argv is None else argv)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            return runner.run(serve(settings))
    except ConfigurationError as error:
        logger.error("%s", error)
        return 2
