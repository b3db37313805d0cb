"""service.observability.metrics on a fresh registry, no server: where a call's answer lands."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.observability.loop_metrics import CounterFamily, GaugeFamily, HistogramFamily
from service.observability.metrics import INFERENCE_RPCS, REFUSAL_CODES, Metrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_latency_histogram_counts_successful_calls_only(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.observe_request("m", "1", "ModelInfer", "OK", 0.2)
    metrics.observe_request("m", "1", "ModelInfer", "RESOURCE_EXHAUSTED", 0.001)
    model = {"model": "m", "version": "1", "rpc": "ModelInfer"}
    value = registry.get_sample_value

    assert value("convserve_requests_total", {**model, "code": "OK"}) == 1
    assert value("convserve_requests_total", {**model, "code": "RESOURCE_EXHAUSTED"}) == 1
    assert value("convserve_request_latency_seconds_count", model) == 1
    assert value("convserve_request_latency_seconds_sum", model) == pytest.approx(0.2)
    # The fast refusal is not in the quantiles of the successful calls.
    assert value("convserve_request_latency_seconds_bucket", {**model, "le": "0.001"}) == 0
    refused = {**model, "code": "RESOURCE_EXHAUSTED"}
    assert value("convserve_refusal_latency_seconds_count", refused) == 1
    assert value("convserve_refusal_latency_seconds_bucket", {**refused, "le": "0.001"}) == 1
    assert value("convserve_refusal_latency_seconds_count", {**model, "code": "OK"}) is None


def test_model_view_splits_the_same_way_per_rpc(registry: CollectorRegistry) -> None:
    view = Metrics(registry).for_model("m", 1)
    view.observe_request("Classify", "OK", 0.05)
    view.observe_request("Classify", "OK", 0.07)
    view.observe_request("Classify", "CANCELLED", 0.3)
    view.observe_request("ModelInfer", "INVALID_ARGUMENT", 0.0002)
    view.observe_request("ModelInfer", "OK", 0.01)
    value = registry.get_sample_value

    def labels(rpc: str, **extra: str) -> dict[str, str]:
        return {"model": "m", "version": "1", "rpc": rpc, **extra}

    assert value("convserve_request_latency_seconds_count", labels("Classify")) == 2
    assert value("convserve_request_latency_seconds_count", labels("ModelInfer")) == 1
    assert value("convserve_requests_total", labels("Classify", code="CANCELLED")) == 1
    cancelled = labels("Classify", code="CANCELLED")
    assert value("convserve_refusal_latency_seconds_sum", cancelled) == pytest.approx(0.3)
    invalid = labels("ModelInfer", code="INVALID_ARGUMENT")
    assert value("convserve_requests_total", invalid) == 1
    assert value("convserve_refusal_latency_seconds_count", invalid) == 1


def test_a_model_starts_with_its_refusal_series_at_zero(registry: CollectorRegistry) -> None:
    """A refusal ratio reads 0, not "no data", before the first refusal."""
    Metrics(registry).for_model("m", 1)
    for rpc in INFERENCE_RPCS:
        labels = {"model": "m", "version": "1", "rpc": rpc}
        assert registry.get_sample_value("convserve_request_latency_seconds_count", labels) == 0
        for code in ("OK", *REFUSAL_CODES):
            assert (
                registry.get_sample_value("convserve_requests_total", {**labels, "code": code}) == 0
            )


def test_help_text_says_successful_calls_only(registry: CollectorRegistry) -> None:
    exposition = generate_latest(Metrics(registry).registry).decode()
    assert (
        "# HELP convserve_request_latency_seconds End-to-end latency of an inference RPC "
        "answered OK, receipt to reply (successful calls only)." in exposition
    )


def test_loop_families_expose_what_prometheus_client_would(registry: CollectorRegistry) -> None:
    """The lock-free families (service.observability.loop_metrics) against prometheus_client's
    own metrics fed the same values: the same samples, bucket bounds included (a value equal
    to a bound counts in that bound's bucket)."""
    bounds = (0.001, 0.01, 0.1, 1.0)
    values = [0.0, 0.001, 0.0010001, 0.01, 0.05, 0.1, 1.0, 3.5, 0.0005, 0.2]
    reference = CollectorRegistry()
    ours = HistogramFamily("t_seconds", "Help.", ["model"], registry, bounds)
    theirs = Histogram("t_seconds", "Help.", ["model"], buckets=bounds, registry=reference)
    counter = CounterFamily("t_things_total", "Things.", ["model"], registry)
    their_counter = Counter("t_things_total", "Things.", ["model"], registry=reference)
    gauge = GaugeFamily("t_depth", "Depth.", ["model"], registry)
    their_gauge = Gauge("t_depth", "Depth.", ["model"], registry=reference)
    for value in values:
        ours.labels("m").observe(value)
        theirs.labels("m").observe(value)
        counter.labels("m").inc(2)
        their_counter.labels("m").inc(2)
    gauge.labels("m").inc(5)
    gauge.labels("m").dec(2)
    their_gauge.labels("m").set(3)
    gauge.labels("gone").set(1)
    gauge.remove("gone")
    gauge.remove("gone")  # nothing left to remove: nothing happens, as in prometheus_client
    with pytest.raises(ValueError, match="labels"):
        ours.labels("m", "extra")
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("m").inc(-1)
    with pytest.raises(ValueError, match="increasing"):
        HistogramFamily("t_bad_seconds", "Bad.", [], registry, (0.1, 0.01))

    def samples(of: CollectorRegistry) -> list[str]:
        text = generate_latest(of).decode()
        return sorted(line for line in text.splitlines() if "_created" not in line)

    assert samples(registry) == samples(reference)
    assert registry.get_sample_value("t_seconds_bucket", {"model": "m", "le": "0.001"}) == 3
