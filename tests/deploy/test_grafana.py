"""The Grafana provisioning and dashboard, checked statically (no Grafana here).

Each panel's PromQL is run against a real Prometheus in test_observability_live.py.
"""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.checks import dashboard_problems, metric_names, panel_queries
from tests.deploy.shipped import dashboard
from tests.deploy.tools import DEPLOY, REPO_ROOT

GRAFANA = DEPLOY / "grafana"


def datasource() -> dict[str, Any]:
    (only,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    return dict(only)


def test_datasource_points_at_the_compose_prometheus() -> None:
    source = datasource()
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # $__rate_interval is derived from timeInterval: it must be the real scrape interval.
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_dashboard_provider_loads_the_folder_compose_mounts() -> None:
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "convserve.yml").read_text()
    )["providers"]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_dashboard_queries_follow_the_rules() -> None:
    assert dashboard_problems(dashboard(), datasource()["uid"]) == []


def test_template_variable_model_lists_the_loaded_models() -> None:
    (variable,) = dashboard()["templating"]["list"]
    assert variable["name"] == "model"
    assert variable["datasource"]["uid"] == datasource()["uid"]
    assert "convserve_model_info" in variable["definition"]


def test_dashboard_covers_what_an_operator_needs() -> None:
    by_panel: dict[str, set[str]] = {}
    exprs: dict[str, str] = {}
    for query in panel_queries(dashboard()):
        by_panel.setdefault(query.panel, set()).update(metric_names(query.expr))
        exprs[query.panel] = exprs.get(query.panel, "") + query.expr

    def panels_with(*metrics: str) -> list[str]:
        return [title for title, used in by_panel.items() if set(metrics) <= used]

    assert panels_with("convserve_requests_total"), "requests/s"
    assert panels_with("convserve_images_total"), "images/s"
    (latency,) = panels_with("convserve_request_latency_seconds_bucket")
    assert all(f"histogram_quantile({q}," in exprs[latency] for q in ("0.5", "0.95", "0.99"))
    assert panels_with(
        "convserve_queue_wait_seconds_bucket", "convserve_batch_compute_seconds_bucket"
    )
    assert panels_with("convserve_batch_size_bucket"), "batch size distribution"
    assert panels_with("convserve_queue_depth", "convserve_requests_in_flight")
    assert any('code!="OK"' in e and "by (code" in e for e in exprs.values()), "errors by code"
    (info,) = panels_with("convserve_model_info")
    assert "provider" in exprs[info] and "version" in exprs[info]


def test_a_hard_coded_window_or_foreign_datasource_fails_the_check() -> None:
    broken = dashboard()
    target = broken["panels"][4]["targets"][0]
    target["expr"] = target["expr"].replace("$__rate_interval", "5m")
    broken["panels"][5]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "other"}
    problems = dashboard_problems(broken, datasource()["uid"])
    assert len(problems) == 2, problems
