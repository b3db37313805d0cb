"""The Grafana provisioning and dashboard, checked statically (no Grafana here).

Each panel's PromQL is run against a real Prometheus in test_observability_live.py.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy.checks import (
    PanelQuery,
    dashboard_problems,
    metric_names,
    panel_queries,
    stat_color_problems,
    threshold_color,
)
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


# Series per server, with no model label for the $model variable to filter on (besides
# convserve_server_ready, which dashboard_problems knows): the repository scans.
PER_SERVER = {"convserve_repository_polls_total"}


def per_server(query: PanelQuery) -> bool:
    return metric_names(query.expr) <= PER_SERVER


def rule_problems(board: dict[str, Any]) -> list[str]:
    """dashboard_problems, less the model filter that the per-server queries cannot have."""
    unfiltered = {
        f"{query.id}: does not filter on the $model variable"
        for query in panel_queries(board)
        if per_server(query)
    }
    return [p for p in dashboard_problems(board, datasource()["uid"]) if p not in unfiltered]


def test_dashboard_queries_follow_the_rules() -> None:
    assert rule_problems(dashboard()) == []


def test_only_the_per_server_queries_skip_the_model_filter() -> None:
    queries = [q for q in panel_queries(dashboard()) if per_server(q)]
    assert queries, "no repository scan panel"
    assert all("model" not in q.expr for q in queries)
    assert len(dashboard_problems(dashboard(), datasource()["uid"])) == len(queries)


def test_template_variable_model_lists_the_loaded_models() -> None:
    (variable,) = dashboard()["templating"]["list"]
    assert variable["name"] == "model"
    assert variable["datasource"]["uid"] == datasource()["uid"]
    assert "convserve_model_info" in variable["definition"]


def panel_exprs(board: dict[str, Any]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Per panel title: the metric names its queries read, and its queries joined."""
    by_panel: dict[str, set[str]] = {}
    exprs: dict[str, str] = {}
    for query in panel_queries(board):
        by_panel.setdefault(query.panel, set()).update(metric_names(query.expr))
        exprs[query.panel] = exprs.get(query.panel, "") + query.expr + "\n"
    return by_panel, exprs


def panel_titled(board: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [panel for panel in board["panels"] if panel["title"] == title]
    return dict(panel)


def test_dashboard_covers_what_an_operator_needs() -> None:
    by_panel, exprs = panel_exprs(dashboard())

    def panels_with(*metrics: str) -> list[str]:
        return [title for title, used in by_panel.items() if set(metrics) <= used]

    assert panels_with("convserve_requests_total"), "requests/s"
    assert panels_with("convserve_images_total"), "images/s"
    assert panels_with(
        "convserve_queue_wait_seconds_bucket", "convserve_batch_compute_seconds_bucket"
    )
    assert panels_with("convserve_batch_size_bucket"), "batch size distribution"
    assert panels_with("convserve_queue_depth", "convserve_requests_in_flight")
    assert any('code!="OK"' in e and "by (code" in e for e in exprs.values()), "errors by code"
    (info,) = panels_with("convserve_model_info")
    assert "provider" in exprs[info] and "version" in exprs[info]


def test_latency_panels_show_successful_calls_per_rpc() -> None:
    """convserve_request_latency_seconds holds OK calls only; ModelInfer and Classify apart."""
    by_panel, exprs = panel_exprs(dashboard())
    latency = [
        t for t, used in by_panel.items() if "convserve_request_latency_seconds_bucket" in used
    ]
    rpcs: set[str] = set()
    for title in latency:
        assert "successful" in title, title
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, sum by (rpc, le) (" in exprs[title], (title, q)
        rpcs |= set(re.findall(r'rpc="(\w+)"', exprs[title]))
    assert rpcs == {"ModelInfer", "Classify"}


def test_refusals_have_a_rate_a_share_and_a_latency_panel() -> None:
    board = dashboard()
    by_panel, exprs = panel_exprs(board)
    not_ok = 'convserve_requests_total{model=~"$model", code!="OK"}'
    (rates,) = [t for t, e in exprs.items() if not_ok in e and "/" not in e]
    assert "sum by (code, rpc) (rate(" in exprs[rates]
    (share,) = [t for t, e in exprs.items() if not_ok in e and "/ on (rpc) group_left" in e]
    assert 'sum by (rpc) (rate(convserve_requests_total{model=~"$model"}' in exprs[share]
    assert panel_titled(board, share)["fieldConfig"]["defaults"]["unit"] == "percentunit"
    (latency,) = [
        t for t, used in by_panel.items() if used == {"convserve_refusal_latency_seconds_bucket"}
    ]
    assert "histogram_quantile(0.99, sum by (rpc, code, le) (" in exprs[latency]


def test_queue_fill_is_a_share_of_capacity() -> None:
    board = dashboard()
    _, exprs = panel_exprs(board)
    (fill,) = [
        t for t, e in exprs.items()
        if re.search(r"convserve_queue_depth\{[^}]*\} / \(convserve_queue_capacity\{", e)
    ]  # fmt: skip
    defaults = panel_titled(board, fill)["fieldConfig"]["defaults"]
    assert (defaults["unit"], defaults["min"], defaults["max"]) == ("percentunit", 0, 1)
    # The panel's line is the alert's threshold.
    assert 0.8 in [step["value"] for step in defaults["thresholds"]["steps"]]


def test_model_lifecycle_row_shows_versions_loads_answers_and_scans() -> None:
    board = dashboard()
    (row,) = [p for p in board["panels"] if p["type"] == "row"]
    assert row["title"] == "Model lifecycle"
    below = [p for p in board["panels"] if p["gridPos"]["y"] > row["gridPos"]["y"]]
    by_panel, exprs = panel_exprs({"panels": below})
    (ready,) = [t for t, used in by_panel.items() if used == {"convserve_model_versions_ready"}]
    defaults = panel_titled(board, ready)["fieldConfig"]["defaults"]
    assert threshold_color(defaults["thresholds"], 0) == "red"
    assert threshold_color(defaults["thresholds"], 1) == "green"
    (events,) = [t for t, e in exprs.items() if "convserve_model_lifecycle_events_total" in e]
    assert "sum by (model, event, outcome) (increase(" in exprs[events]
    (answers,) = [t for t, used in by_panel.items() if used == {"convserve_requests_total"}]
    assert "sum by (model, version) (rate(" in exprs[answers]
    assert 'code="OK"' in exprs[answers]
    (scans,) = [t for t, used in by_panel.items() if used == PER_SERVER]
    assert 'outcome="failed"' in exprs[scans]


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, (panel["title"], taken[(x, y)])
                taken[(x, y)] = panel["title"]


READY: dict[float, str] = {0: "red", 1: "green", 3: "green"}
NOT_READY: dict[float, str] = {0: "green", 1: "red", 2: "red"}


def test_ready_servers_is_red_at_zero_and_any_unready_server_is_red() -> None:
    board = dashboard()
    panel = panel_titled(board, "Ready servers")
    exprs = {target["refId"]: target["expr"] for target in panel["targets"]}
    assert exprs["A"] == "sum(convserve_server_ready)"
    assert "convserve_server_ready == 0" in exprs["B"] and "up{" in exprs["B"]
    assert stat_color_problems(board, "Ready servers", "A", READY) == []
    assert stat_color_problems(board, "Ready servers", "B", NOT_READY) == []


def test_a_ready_stat_green_at_zero_fails_the_check() -> None:
    broken = dashboard()
    panel = panel_titled(broken, "Ready servers")
    index = broken["panels"].index(panel)
    del broken["panels"][index]["fieldConfig"]["defaults"]["thresholds"]  # Grafana's: green
    assert stat_color_problems(broken, "Ready servers", "A", READY) == [
        "Ready servers [A]: 0 shows green, not red"
    ]
    broken["panels"][index]["options"]["colorMode"] = "none"
    assert stat_color_problems(broken, "Ready servers", "B", NOT_READY) == [
        "Ready servers: colorMode shows no threshold colour"
    ]


def test_a_hard_coded_window_or_foreign_datasource_fails_the_check() -> None:
    broken = dashboard()
    target = broken["panels"][4]["targets"][0]
    target["expr"] = target["expr"].replace("$__rate_interval", "5m")
    broken["panels"][5]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "other"}
    problems = rule_problems(broken)
    assert len(problems) == 2, problems
