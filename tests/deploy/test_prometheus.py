"""Prometheus configuration and alert rules, checked by promtool (no server needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.checks import metric_names
from tests.deploy.shipped import (
    ALERT_TESTS,
    ALERTS,
    PROMETHEUS,
    alert_rules,
    documented_metrics,
)
from tests.deploy.tools import DEPLOY, run_tool

pytestmark = pytest.mark.live


def test_config_is_valid(promtool: Path) -> None:
    result = run_tool([promtool, "check", "config", PROMETHEUS / "prometheus.yml"])
    assert result.ok, result.output
    assert "1 rule files found" in result.output


def test_config_scrapes_the_compose_service_on_its_metrics_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "convserve"]
    (dns,) = job["dns_sd_configs"]
    assert (dns["names"], dns["port"]) == (["server"], 8002)
    assert config["rule_files"] == ["alerts.yml"]


def test_kubernetes_scrape_config_is_valid(promtool: Path, tmp_path: Path) -> None:
    path = DEPLOY / "k8s" / "monitoring" / "prometheus-scrape.yml"
    result = run_tool([promtool, "check", "config", path])
    if "field kubernetes_sd_configs not found" in result.output:
        # Debian builds Prometheus without Kubernetes discovery: check everything else.
        config = yaml.safe_load(path.read_text())
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": ["pod:8002"]}]
            del job["kubernetes_sd_configs"]
        path = tmp_path / "prometheus-scrape.yml"
        path.write_text(yaml.safe_dump(config))
        result = run_tool([promtool, "check", "config", path])
    assert result.ok, result.output
    labels = {
        r.get("target_label")
        for r in yaml.safe_load(path.read_text())["scrape_configs"][0]["relabel_configs"]
    }
    assert {"namespace", "pod"} <= labels, "the Prometheus adapter rules need namespace and pod"


def test_rules_are_valid(promtool: Path) -> None:
    result = run_tool([promtool, "check", "rules", ALERTS])
    assert result.ok, result.output


def test_rule_unit_tests_pass(promtool: Path) -> None:
    result = run_tool([promtool, "test", "rules", ALERT_TESTS], cwd=PROMETHEUS)
    assert result.ok, result.output
    assert "SUCCESS" in result.output


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, set[str]] = {rule["alert"]: set() for rule in alert_rules()}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases[case["alertname"]].add("fires" if case.get("exp_alerts") else "quiet")
    assert {name: kinds for name, kinds in cases.items() if kinds != {"fires", "quiet"}} == {}


def test_alerts_cover_the_failure_modes() -> None:
    by_metrics = {rule["alert"]: metric_names(rule["expr"]) for rule in alert_rules()}

    def alerting_on(*metrics: str) -> list[str]:
        return [name for name, used in by_metrics.items() if set(metrics) <= used]

    assert alerting_on("up"), "service down"
    assert alerting_on("convserve_server_ready"), "service not ready"
    assert alerting_on("convserve_request_latency_seconds_bucket"), "p99 latency"
    assert alerting_on("convserve_requests_total"), "error ratio"
    assert alerting_on("convserve_queue_depth", "convserve_queue_capacity"), "queue near capacity"
    assert alerting_on("convserve_provider_fallback"), "CUDA requested, running on CPU"
    assert any("0.99" in rule["expr"] for rule in alert_rules()), "p99, not another quantile"


def counted_codes(expr: str) -> set[str]:
    """The gRPC codes an expression selects with `code=~"A|B"`."""
    return {code for codes in re.findall(r'code=~"([^"]+)"', expr) for code in codes.split("|")}


REFUSALS = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"}


def test_latency_alert_reads_successful_calls_per_rpc() -> None:
    (expr,) = [
        rule["expr"]
        for rule in alert_rules()
        if "convserve_request_latency_seconds_bucket" in metric_names(rule["expr"])
    ]
    assert "histogram_quantile(0.99,\n  sum by (model, rpc, le) (rate(" in expr
    assert "and on (model, rpc)" in expr


def test_refusals_and_cancels_have_their_own_alert() -> None:
    by_codes = {rule["alert"]: counted_codes(rule["expr"]) for rule in alert_rules()}
    (refusals,) = [name for name, codes in by_codes.items() if codes == REFUSALS]
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == refusals]
    # A share of the calls, per server, model and RPC.
    assert rule["expr"].count("sum by (instance, model, rpc) (rate(convserve_requests_total") == 3
    assert "> 0.05" in rule["expr"] and rule["for"] == "5m"
    # Refusals need capacity, failures a look at the log: no code pages through both alerts;
    # and a client's mistakes page through neither.
    (errors,) = [codes for codes in by_codes.values() if "INTERNAL" in codes]
    assert errors.isdisjoint(REFUSALS | {"INVALID_ARGUMENT", "NOT_FOUND"})


def test_queue_alert_is_a_share_of_capacity() -> None:
    (expr,) = [
        rule["expr"]
        for rule in alert_rules()
        if {"convserve_queue_depth", "convserve_queue_capacity"} <= metric_names(rule["expr"])
    ]
    assert re.search(
        r"convserve_queue_depth\[2m\]\) / \(convserve_queue_capacity > 0\) > 0\.8", expr
    )


def test_alerts_read_only_documented_metrics() -> None:
    known = documented_metrics()
    assert len(known) >= 15, "docs/metrics.md's table did not parse"
    for rule in alert_rules():
        bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in metric_names(rule["expr"])}
        assert bases - {"up"} <= known, f"{rule['alert']}: {bases - known - {'up'}}"


def test_a_broken_rule_fails_the_check(promtool: Path, tmp_path: Path) -> None:
    broken = tmp_path / "alerts.yml"
    broken.write_text(
        ALERTS.read_text().replace(
            "expr: convserve_server_ready == 0", "expr: convserve_server_ready == == 0"
        )
    )
    result = run_tool([promtool, "check", "rules", broken])
    assert not result.ok
    assert "parse error" in result.output


def test_a_changed_threshold_fails_the_unit_tests(promtool: Path, tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace(
            "expr: convserve_provider_fallback > 0", "expr: convserve_provider_fallback > 1"
        )
    )
    (tmp_path / "alerts_test.yml").write_text(ALERT_TESTS.read_text())
    result = run_tool([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert not result.ok
    assert "ConvserveProviderFallback" in result.output
