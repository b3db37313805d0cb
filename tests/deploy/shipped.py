"""The shipped deployment files the tests read, and small loaders for them."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.deploy.tools import DEPLOY, REPO_ROOT

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "convserve.json"
ADAPTER_CONFIG = DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-config.yaml"


def alert_rules() -> list[dict[str, Any]]:
    """The alerting rules of alerts.yml, every group."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def adapter_rules() -> list[dict[str, Any]]:
    """The Prometheus adapter rules embedded in their ConfigMap."""
    config_map = yaml.safe_load(ADAPTER_CONFIG.read_text())
    return list(yaml.safe_load(config_map["data"]["config.yaml"])["rules"])


def documented_metrics() -> set[str]:
    """The metric names in docs/metrics.md's table."""
    text = (REPO_ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(convserve_[a-z0-9_]+)` \|", text, flags=re.MULTILINE))
