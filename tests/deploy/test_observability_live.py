"""The dashboard and the alerts against real data: the service and Prometheus on loopback.

One module-scoped stack: the service on the tiny test model, a Prometheus scraping it every
second with the shipped alert rules loaded, and three waves of good and bad calls. Then every
panel's PromQL (Grafana's macros and $model substituted) must return data, and every alert
expression must evaluate and read only metrics the live scrape has.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.checks import (
    metric_names,
    panel_queries,
    prometheus_query,
    query_problems,
    substitute_variables,
)
from tests.deploy.conftest import missing
from tests.deploy.processes import (
    PrometheusProcess,
    ServiceProcess,
    free_port,
    http_get,
    send_traffic,
    wait_for,
)
from tests.deploy.shipped import ALERTS, adapter_rules, alert_rules, dashboard, documented_metrics
from tests.deploy.tools import run_tool

pytestmark = [pytest.mark.live, pytest.mark.slow]

PANEL_QUERIES = panel_queries(dashboard())
VARIABLES = {"model": "tiny"}


@dataclass
class Stack:
    service: ServiceProcess
    prometheus: PrometheusProcess
    traffic: dict[str, Any]

    def scalar(self, expr: str) -> float | None:
        answer = prometheus_query(self.prometheus.url, expr)
        result = answer["data"]["result"] if answer.get("status") == "success" else []
        return float(result[0]["value"][1]) if result else None

    def live_metric_names(self) -> set[str]:
        answer = json.loads(http_get(f"{self.prometheus.url}/api/v1/label/__name__/values"))
        return set(answer["data"])


@pytest.fixture(scope="module")
def stack(
    service_available: None,
    prometheus_bin: Path,
    tiny_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("observability")
    service = ServiceProcess("server", workdir, tiny_repository)
    prometheus = PrometheusProcess(prometheus_bin, workdir)
    try:
        service.start().wait_ready()
        rules = shutil.copy(ALERTS, workdir / "alerts.yml")
        prometheus.start([f"127.0.0.1:{service.metrics_port}"], [Path(rules)])
        live = Stack(service, prometheus, {})
        wait_for(lambda: live.scalar('up{job="convserve"}') == 1, 20, "the first scrape")
        # Waves a second apart: the rates see several scrapes with traffic in them.
        live.traffic = send_traffic(service.grpc_address, waves=3, gap_s=1.0)
        sent = sum(live.traffic["codes"].values())
        wait_for(
            lambda: live.scalar("sum(convserve_requests_total)") == sent,
            20,
            f"Prometheus to scrape all {sent} calls",
            poll_s=0.3,
        )
        yield live
    finally:
        prometheus.stop()
        service.stop()


def test_traffic_has_successes_and_errors(stack: Stack) -> None:
    codes = stack.traffic["codes"]
    assert codes["OK"] == 3 * (20 + 5)
    assert codes["INVALID_ARGUMENT"] == 3 * 2 * 2 and codes["NOT_FOUND"] == 3 * 2


def test_latency_histograms_split_successful_calls_from_the_rest(stack: Stack) -> None:
    """OK calls in convserve_request_latency_seconds, every other answer in
    convserve_refusal_latency_seconds under its code, as Prometheus scraped them."""
    by_kind = stack.traffic["by_kind"]
    for rpc, kind in (("ModelInfer", "infer"), ("Classify", "classify")):
        ok = f'sum(convserve_request_latency_seconds_count{{rpc="{rpc}"}})'
        assert stack.scalar(ok) == by_kind[kind]["OK"], rpc
    for code, calls in stack.traffic["codes"].items():
        if code != "OK":
            refused = f'sum(convserve_refusal_latency_seconds_count{{code="{code}"}})'
            assert stack.scalar(refused) == calls, code
    assert stack.scalar('sum(convserve_refusal_latency_seconds_count{code="OK"})') is None


def test_refusal_series_exist_at_zero_before_any_refusal(stack: Stack) -> None:
    """So the refusal panels and ConvserveRefusingCalls see a rate of 0, not "no data"."""
    refusals = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED")
    selector = f'convserve_requests_total{{model="tiny", code=~"{"|".join(refusals)}"}}'
    result = prometheus_query(stack.prometheus.url, selector)["data"]["result"]
    series = {(r["metric"]["rpc"], r["metric"]["code"]): float(r["value"][1]) for r in result}
    rpcs = ("ModelInfer", "Classify", "Explain")
    assert series == {(rpc, code): 0.0 for rpc in rpcs for code in refusals}


def test_lifecycle_series_exist_at_zero_before_any_failure(stack: Stack) -> None:
    """So the "Model lifecycle" panels and ConvserveModelLoadFailed see an increase of 0, not
    "no data", and a later failed load as an increase: one load of version 1, the rest 0."""
    url = stack.prometheus.url
    result = prometheus_query(url, 'convserve_model_lifecycle_events_total{model="tiny"}')
    events = {
        (r["metric"]["event"], r["metric"]["outcome"]): float(r["value"][1])
        for r in result["data"]["result"]
    }
    zero = {(event, outcome): 0.0 for event in ("load", "unload") for outcome in ("ok", "failed")}
    assert events == {**zero, ("load", "ok"): 1.0}
    assert stack.scalar('convserve_model_versions_ready{model="tiny"}') == 1
    result = prometheus_query(url, "convserve_repository_polls_total")
    polls = {r["metric"]["outcome"]: float(r["value"][1]) for r in result["data"]["result"]}
    assert set(polls) == {"ok", "failed"} and polls["failed"] == 0


def test_ready_servers_stat_reads_one_ready_and_none_down(stack: Stack) -> None:
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == "Ready servers"]
    values = {t["refId"]: stack.scalar(t["expr"]) for t in panel["targets"]}
    assert values == {"A": 1, "B": 0}


@pytest.mark.parametrize("query", PANEL_QUERIES, ids=[q.id for q in PANEL_QUERIES])
def test_panel_query_returns_data(stack: Stack, query: Any) -> None:
    expr = substitute_variables(query.expr, VARIABLES)
    assert query_problems(stack.prometheus.url, expr) == []


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_expression_evaluates_on_live_metrics(stack: Stack, rule: dict[str, Any]) -> None:
    assert query_problems(stack.prometheus.url, rule["expr"], need_data=False) == []
    assert metric_names(rule["expr"]) - stack.live_metric_names() == set()


def test_alert_rules_are_healthy_and_quiet_on_a_healthy_server(stack: Stack) -> None:
    def rules() -> list[dict[str, Any]]:
        answer = json.loads(http_get(f"{stack.prometheus.url}/api/v1/rules"))
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]

    # Before its first evaluation a rule reports Go's zero time.
    wait_for(lambda: all(r["lastEvaluation"] > "0001-01-02" for r in rules()), 10, "evaluation")
    loaded = rules()
    assert len(loaded) == len(alert_rules())
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
    # Client errors (INVALID_ARGUMENT, NOT_FOUND) do not count towards the error ratio.
    assert [r["name"] for r in loaded if r["state"] != "inactive"] == []


def test_adapter_query_returns_a_value_per_server(stack: Stack) -> None:
    for rule in adapter_rules():
        series = re.match(r"(\w+)", rule["seriesQuery"].strip("'\""))
        assert series
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series[1])
            .replace("<<.LabelMatchers>>", 'job="convserve"')
            .replace("<<.GroupBy>>", "instance")
        )
        assert query_problems(stack.prometheus.url, expr) == []


def test_live_metrics_pass_promtool_check_metrics(stack: Stack, promtool: Path) -> None:
    result = run_tool([promtool, "check", "metrics"], stdin=http_get(stack.service.metrics_url))
    assert result.ok and result.output == "", result.output


def test_every_documented_metric_is_exposed(stack: Stack) -> None:
    live = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in stack.live_metric_names()}
    assert documented_metrics() - live == set()


def test_a_broken_dashboard_query_fails_the_check(stack: Stack) -> None:
    (query,) = [q for q in PANEL_QUERIES if q.panel == "Throughput: images/s"]
    expr = substitute_variables(query.expr, VARIABLES)
    misspelled = expr.replace("convserve_images_total", "convserve_image_total")
    assert query_problems(stack.prometheus.url, misspelled) == [f"{misspelled!r}: no data"]
    (problem,) = query_problems(stack.prometheus.url, expr.replace("sum by", "sum bye"))
    assert "bad_data" in problem
    with pytest.raises(KeyError, match=r"\$modle"):
        substitute_variables(query.expr.replace("$model", "$modle"), VARIABLES)


def test_kubernetes_grpc_probe_sees_serving(stack: Stack) -> None:
    """Kubernetes' native gRPC probe calls grpc.health.v1 Check with an empty service name."""
    grpc = pytest.importorskip("grpc")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    with grpc.insecure_channel(stack.service.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_docker_healthcheck_command_tells_serving_from_down(stack: Stack) -> None:
    """The HEALTHCHECK of the server images and of docker-compose.yml, run for real."""
    if importlib.util.find_spec("service.tools.client") is None:
        missing("service.tools.client (the HEALTHCHECK command)", "it is part of this repository")
    command = [sys.executable, "-m", "service.tools.client", "health", "--address"]
    assert run_tool([*command, stack.service.grpc_address], timeout_s=30).ok
    nobody = f"127.0.0.1:{free_port()}"
    assert not run_tool([*command, nobody], timeout_s=30).ok
