"""Prometheus metrics, named exactly as in docs/metrics.md, on an injected registry.

`Metrics(registry)` defines every series once; `Metrics.for_model(name, version)` gives the
per-model view the batcher reports to (it implements `BatchObserver`). Tests build their own
`CollectorRegistry` and read values with `registry.get_sample_value(...)`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service.engine.statistics import VersionStatistics
from service.observability.loop_metrics import CounterFamily, GaugeFamily, HistogramFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INFERENCE_RPCS = ("ModelInfer", "Classify", "Explain")
OK = "OK"
# Codes whose series exist from a model's load on, at 0, so that a refusal ratio or a refusal
# panel has data (a rate of 0, not "no data") before the first refusal happens.
REFUSAL_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED")
# Why a call was refused with UNAUTHENTICATED (service/wire/auth.py).
AUTH_FAILURES = ("missing", "invalid")
# Model lifecycle events (convserve_model_lifecycle_events_total) and their outcomes.
LIFECYCLE_EVENTS = ("load", "unload")
OUTCOMES = ("ok", "failed")


class Metrics:
    """Every convserve_* series, registered on one registry (plus process/platform/gc)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        model = ["model", "version"]
        # The series every request updates are loop_metrics families (no locks); the others
        # are prometheus_client's.
        self.requests = CounterFamily(
            "convserve_requests_total",
            "Inference requests answered, by final gRPC status.",
            [*model, "rpc", "code"],
            registry,
        )
        self.images = CounterFamily(
            "convserve_images_total", "Items (images / batch rows) inferred.", model, registry
        )
        # Successful calls only: fast refusals and errors in the same histogram would pull its
        # quantiles down exactly when the server is overloaded.
        self.request_latency = HistogramFamily(
            "convserve_request_latency_seconds",
            "End-to-end latency of an inference RPC answered OK, receipt to reply "
            "(successful calls only).",
            [*model, "rpc"],
            registry,
            LATENCY_BUCKETS_S,
        )
        self.refusal_latency = HistogramFamily(
            "convserve_refusal_latency_seconds",
            "Receipt to reply of an inference RPC answered with any code but OK (refused, "
            "cancelled or failed), by code.",
            [*model, "rpc", "code"],
            registry,
            LATENCY_BUCKETS_S,
        )
        self.queue_wait = HistogramFamily(
            "convserve_queue_wait_seconds",
            "Time a request waited in the batch queue before its batch started.",
            model, registry, LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.batch_compute = HistogramFamily(
            "convserve_batch_compute_seconds", "ONNX Runtime run time of one batch.",
            model, registry, LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.image_decode = Histogram(
            "convserve_image_decode_seconds",
            "Decode + convert + resize time of one image.",
            model, buckets=LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.batch_size = HistogramFamily(
            "convserve_batch_size", "Items per executed batch.", model, registry,
            BATCH_SIZE_BUCKETS,
        )  # fmt: skip
        self.queue_depth = GaugeFamily(
            "convserve_queue_depth", "Items waiting in the batch queue now.", model, registry
        )
        self.queue_capacity = Gauge(
            "convserve_queue_capacity", "The batch queue's bound, in items.", model,
            registry=registry,
        )  # fmt: skip
        self.in_flight = GaugeFamily(
            "convserve_requests_in_flight", "Requests accepted and not yet answered.", model,
            registry,
        )  # fmt: skip
        self.rejections = Counter(
            "convserve_queue_rejections_total",
            "Requests refused because the queue was full (RESOURCE_EXHAUSTED).",
            model, registry=registry,
        )  # fmt: skip
        self.load_seconds = Gauge(
            "convserve_model_load_seconds", "Time to load the session and warm it up.", model,
            registry=registry,
        )  # fmt: skip
        self.model_info = Gauge(
            "convserve_model_info",
            "The loaded model (=1): active ONNX Runtime provider and the requested setting.",
            [*model, "provider", "requested"], registry=registry,
        )  # fmt: skip
        self.provider_fallback = Gauge(
            "convserve_provider_fallback",
            "1 when CUDA was asked for (or auto found it available) but the session runs on CPU.",
            model, registry=registry,
        )  # fmt: skip
        self.model_ready = Gauge(
            "convserve_model_ready", "1 when the model is loaded and warm.", model,
            registry=registry,
        )  # fmt: skip
        self.server_ready = Gauge(
            "convserve_server_ready",
            "1 when the server is ready (ServerReady): not draining, and every model ready "
            "(strict readiness) or at least one (relaxed).",
            registry=registry,
        )
        self.unauthenticated = Counter(
            "convserve_unauthenticated_requests_total",
            "Calls refused with UNAUTHENTICATED (token authentication on): no bearer token "
            "(missing) or one not accepted (invalid), by RPC.",
            ["rpc", "reason"],
            registry=registry,
        )
        # At 0 from the start (a rate of 0 rather than "no data", as for REFUSAL_CODES).
        for rpc in INFERENCE_RPCS:
            for reason in AUTH_FAILURES:
                self.unauthenticated.labels(rpc, reason)
        self.versions_ready_gauge = Gauge(
            "convserve_model_versions_ready",
            "Versions of the model ready to serve now (the version policy decides how many).",
            ["model"], registry=registry,
        )  # fmt: skip
        self.lifecycle_events = Counter(
            "convserve_model_lifecycle_events_total",
            "Model version loads and unloads, by outcome (a failed load leaves the versions "
            "serving as they were).",
            ["model", "event", "outcome"], registry=registry,
        )  # fmt: skip
        self.repository_polls = Counter(
            "convserve_repository_polls_total",
            "Scans of the model repository (model control mode poll), by outcome.",
            ["outcome"], registry=registry,
        )  # fmt: skip
        for outcome in OUTCOMES:
            self.repository_polls.labels(outcome)

    # The model manager's LifecycleObserver.
    def version_loaded(self, model: str, version: int | None, ok: bool) -> None:
        self._lifecycle_children(model)
        self.lifecycle_events.labels(model, "load", "ok" if ok else "failed").inc()
        if not ok and version is not None:  # a failed version shows in model_ready as 0
            self.model_ready.labels(model, str(version)).set(0)

    def version_unloaded(self, model: str) -> None:
        self._lifecycle_children(model)
        self.lifecycle_events.labels(model, "unload", "ok").inc()

    def versions_ready(self, model: str, count: int | None) -> None:
        """The model's ready versions now; None: the model is no longer served (unloaded
        through the API, or gone from the repository), and its series goes."""
        if count is None:
            with contextlib.suppress(KeyError):
                self.versions_ready_gauge.remove(model)
            return
        self.versions_ready_gauge.labels(model).set(count)

    def version_forgotten(self, model: str, version: int) -> None:
        """A failed version whose directory left the repository: its 0 goes."""
        with contextlib.suppress(KeyError):
            self.model_ready.remove(model, str(version))

    def repository_polled(self, ok: bool) -> None:
        self.repository_polls.labels("ok" if ok else "failed").inc()

    def _lifecycle_children(self, model: str) -> None:
        """Every event/outcome series of a model at 0 once it is first seen (an alert on
        increase() needs the series before the first failure)."""
        for event in LIFECYCLE_EVENTS:
            for outcome in OUTCOMES:
                self.lifecycle_events.labels(model, event, outcome)

    def for_model(self, name: str, version: int | str) -> ModelMetrics:
        """The per-model view (creates the model's series at their zero values)."""
        return ModelMetrics(self, name, str(version))

    def observe_request(
        self, model: str, version: str, rpc: str, code: str, latency_s: float
    ) -> None:
        """Counts one answered inference RPC and observes its latency: in
        `convserve_request_latency_seconds` when `code` is OK, else in
        `convserve_refusal_latency_seconds`."""
        self.requests.labels(model, version, rpc, code).inc()
        self.latency_child(model, version, rpc, code).observe(latency_s)

    def latency_child(self, model: str, version: str, rpc: str, code: str) -> Any:
        """The histogram child a call answered with `code` is observed in."""
        if code == OK:
            return self.request_latency.labels(model, version, rpc)
        return self.refusal_latency.labels(model, version, rpc, code)

    def serve_http(self, host: str, port: int) -> tuple[Any, int]:
        """Starts the /metrics HTTP server in a thread; returns (server, bound port).

        Served like prometheus_client's start_http_server, but its loop polls for shutdown
        every 50 ms instead of 500: `server.shutdown()` is on the drain's critical path, and
        the process should exit as soon as the last call is answered."""
        server = make_server(
            host, port, make_wsgi_app(self.registry), _MetricsHttpServer, _QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="metrics-http",
            daemon=True,
        )
        thread.start()
        return server, int(server.server_port)


class _MetricsHttpServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class ModelMetrics:
    """One model version's series; the batcher's observer."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._m = metrics
        self.name = name
        self.version = version
        labels = (name, version)
        self._images = metrics.images.labels(*labels)
        self._queue_wait = metrics.queue_wait.labels(*labels)
        self._batch_compute = metrics.batch_compute.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._queue_depth = metrics.queue_depth.labels(*labels)
        self._rejections = metrics.rejections.labels(*labels)
        self.in_flight = metrics.in_flight.labels(*labels)
        self.image_decode = metrics.image_decode.labels(*labels)
        self._answered: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.statistics = VersionStatistics()
        self._info_labels: tuple[str, str] | None = None
        for rpc in INFERENCE_RPCS:
            for code in (OK, *REFUSAL_CODES):
                self._children(rpc, code)
        self.set_ready(False)

    def _children(self, rpc: str, code: str) -> tuple[Any, Any]:
        children = self._answered.get((rpc, code))
        if children is None:
            children = (
                self._m.requests.labels(self.name, self.version, rpc, code),
                self._m.latency_child(self.name, self.version, rpc, code),
            )
            self._answered[(rpc, code)] = children
        return children

    def observe_request(self, rpc: str, code: str, latency_s: float) -> None:
        """Counts one answered inference RPC of this model and observes its latency, OK calls
        in `convserve_request_latency_seconds`, the others in
        `convserve_refusal_latency_seconds` (label children cached: hot path)."""
        counter, latency = self._children(rpc, code)
        counter.inc()
        latency.observe(latency_s)
        self.statistics.answered(code == OK, latency_s)

    def queue_depth(self, items: int) -> None:
        self._queue_depth.set(items)

    def rejected(self) -> None:
        self._rejections.inc()

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        for wait in waits_s:
            self._queue_wait.observe(wait)
        self._batch_size.observe(size)

    def batch_finished(self, size: int, compute_s: float, ok: bool) -> None:
        self._batch_compute.observe(compute_s)
        if ok:
            self._images.inc(size)
        self.statistics.batch_finished(size, compute_s, ok)

    def set_queue_capacity(self, items: int) -> None:
        self._m.queue_capacity.labels(self.name, self.version).set(items)

    def set_ready(self, ready: bool) -> None:
        self._m.model_ready.labels(self.name, self.version).set(1 if ready else 0)

    def forget(self) -> None:
        """The version was unloaded: its gauges go (a 0 left behind would read as a version
        that failed); its counters and histograms stay, as Prometheus expects of counters."""
        m, labels = self._m, (self.name, self.version)
        for gauge in (
            m.model_ready, m.queue_depth, m.queue_capacity, m.in_flight, m.load_seconds,
            m.provider_fallback,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        if self._info_labels is not None:
            with contextlib.suppress(KeyError):
                m.model_info.remove(*labels, *self._info_labels)

    def loaded(self, load_s: float, provider: str, requested: str, fallback: bool) -> None:
        """Records a successful load: time, provider info and whether CUDA fell back to CPU."""
        self._m.load_seconds.labels(self.name, self.version).set(load_s)
        self._m.model_info.labels(self.name, self.version, provider, requested).set(1)
        self._info_labels = (provider, requested)
        self._m.provider_fallback.labels(self.name, self.version).set(1 if fallback else 0)
