"""The deployment checks, as functions that return a list of problems (empty: the check passed).

Every check runs once on the shipped files and once on a deliberately broken file, so each test
shows that its check can fail. Tool-based checks wrap the real tool (docker compose, hadolint,
kubernetes-validate, promtool); the others are the house rules those tools do not know about.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy.tools import REPO_ROOT, run_tool

# --- docker compose -----------------------------------------------------------------------------


def compose_config(
    compose: Path, files: Sequence[Path], env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """`docker compose -f ... config --format json`: the merged model, or the problems."""
    argv: list[str | Path] = [compose]
    for file in files:
        argv += ["-f", file]
    # A clean environment: the result must not depend on the caller's COMPOSE_*/GRAFANA_* vars.
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(REPO_ROOT), **(env or {})}
    result = run_tool(
        [*argv, "config", "--format", "json"], cwd=files[0].parent, env=environ, timeout_s=60
    )
    if not result.ok:
        return None, [f"docker compose config failed: {result.output}"]
    return json.loads(result.stdout), []


_PINNED_IMAGE = re.compile(r"^[\w.\-/:]+:(?!latest$)[\w][\w.\-]*(@sha256:[0-9a-f]{64})?$")


def compose_policy(config: Mapping[str, Any]) -> list[str]:
    """House rules: every image has an exact tag; state lives in named volumes, not bind mounts."""
    problems = []
    for name, service in config.get("services", {}).items():
        image = service.get("image", "")
        if not _PINNED_IMAGE.match(image):
            problems.append(f"service {name}: image {image!r} is not pinned to an exact tag")
        for volume in service.get("volumes", []):
            target = volume.get("target", "")
            if volume.get("type") == "bind" and not volume.get("read_only"):
                problems.append(f"service {name}: writable bind mount at {target}; use a volume")
    return problems


# --- Dockerfiles --------------------------------------------------------------------------------


def hadolint_problems(hadolint: Path, dockerfile: Path) -> list[str]:
    """hadolint at its default threshold: any finding, warnings included, is a problem."""
    result = run_tool([hadolint, "--no-color", dockerfile], timeout_s=60)
    if result.ok and not result.output:
        return []
    return [f"hadolint {dockerfile.name}: {result.output or f'exit {result.returncode}'}"]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    instructions = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_policy(text: str, *, server: bool) -> list[str]:
    """House rules: exact base tags, a non-root final user, and (servers) a gRPC HEALTHCHECK."""
    problems = []
    instructions = dockerfile_instructions(text)
    stages = {
        i.arguments.split()[-1].lower()
        for i in instructions
        if i.keyword == "FROM" and " as " in i.arguments.lower()
    }
    for item in (i for i in instructions if i.keyword == "FROM"):
        image = next(word for word in item.arguments.split() if not word.startswith("--"))
        if image.lower() in stages:
            continue
        if not _PINNED_IMAGE.match(image):
            problems.append(f"base image {image!r} is not pinned to an exact tag")
    users = [i.arguments for i in instructions if i.keyword == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("the final image runs as root: add a USER with a non-root uid")
    healthchecks = [i.arguments for i in instructions if i.keyword == "HEALTHCHECK"]
    if server and not any("service.tools.client" in h and "health" in h for h in healthchecks):
        problems.append(
            "no HEALTHCHECK through the gRPC health protocol (service.tools.client health)"
        )
    return problems


# --- Kubernetes ---------------------------------------------------------------------------------


def kubernetes_problems(kubernetes_validate: Path, files: Sequence[Path]) -> list[str]:
    """kubernetes-validate --strict, where a warning (e.g. an unknown kind) is a failure too."""
    result = run_tool([kubernetes_validate, "--strict", *files], timeout_s=120)
    problems = [
        line for line in result.output.splitlines() if line.startswith(("WARN", "ERROR", "CRIT"))
    ]
    if not result.ok and not problems:
        problems.append(f"kubernetes-validate exited {result.returncode}: {result.output}")
    return problems


# --- PromQL and the Grafana dashboard -------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_METRIC = re.compile(r"(?<![\w:])(convserve_[a-z0-9_]+|up)(?![\w:])")
_RANGE = re.compile(r"\[([^\]]+)\]")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
# What the live test substitutes for Grafana's macros: windows that cover a short test's traffic.
GRAFANA_MACROS = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "5m",
    "__range_s": "300",
    "__interval_ms": "5000",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (convserve_* and up)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def substitute_variables(expr: str, variables: Mapping[str, str]) -> str:
    """Replaces Grafana's $__macros and $template variables the way Grafana would."""
    values = {**GRAFANA_MACROS, **variables}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str
    datasource_uid: str | None

    @property
    def id(self) -> str:
        return f"{self.panel} [{self.ref}]"


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource") or {}
            queries.append(
                PanelQuery(
                    panel["title"], target.get("refId", "?"), target["expr"], source.get("uid")
                )
            )
    return queries


def dashboard_problems(dashboard: Mapping[str, Any], datasource_uid: str) -> list[str]:
    """Static rules: the provisioned datasource, `$__rate_interval` windows, the model filter."""
    problems = []
    ids = [panel.get("id") for panel in iter_panels(dashboard)]
    if len(ids) != len(set(ids)):
        problems.append(f"panel ids are not unique: {ids}")
    queries = panel_queries(dashboard)
    if not queries:
        problems.append("the dashboard has no queries")
    for query in queries:
        if query.datasource_uid != datasource_uid:
            problems.append(
                f"{query.id}: datasource {query.datasource_uid!r}, not the provisioned one"
            )
        for window in _RANGE.findall(query.expr):
            if window != "$__rate_interval":
                problems.append(f"{query.id}: range [{window}]; use [$__rate_interval]")
        names = metric_names(query.expr)
        if not names:
            problems.append(f"{query.id}: reads no convserve metric")
        # convserve_server_ready is per server, it has no model label to filter on.
        if names - {"up", "convserve_server_ready"} and 'model=~"$model"' not in query.expr:
            problems.append(f"{query.id}: does not filter on the $model variable")
    return problems


def threshold_color(thresholds: Mapping[str, Any], value: float) -> str:
    """The colour Grafana gives `value` under absolute thresholds: the last step whose value is
    at most `value`; the base step's value is null (minus infinity)."""
    assert thresholds.get("mode", "absolute") == "absolute", thresholds
    color = None
    for step in thresholds["steps"]:
        if step["value"] is None or value >= step["value"]:
            color = step["color"]
    assert color is not None, f"no base step in {thresholds}"
    return str(color)


# What Grafana uses when a panel sets no thresholds: green, red from 80.
GRAFANA_DEFAULT_THRESHOLDS = {
    "mode": "absolute",
    "steps": [{"color": "green", "value": None}, {"color": "red", "value": 80}],
}


def field_thresholds(panel: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    """The thresholds that apply to one query of a panel: a `byFrameRefID` override, else the
    panel's defaults, else Grafana's."""
    config = panel.get("fieldConfig", {})
    thresholds = config.get("defaults", {}).get("thresholds", GRAFANA_DEFAULT_THRESHOLDS)
    for override in config.get("overrides", []):
        if override.get("matcher") == {"id": "byFrameRefID", "options": ref}:
            for item in override.get("properties", []):
                if item["id"] == "thresholds":
                    thresholds = item["value"]
    return dict(thresholds)


def stat_color_problems(
    dashboard: Mapping[str, Any], title: str, ref: str, expected: Mapping[float, str]
) -> list[str]:
    """The colours a stat panel's query shows for given values, against the expected ones."""
    panels = [panel for panel in iter_panels(dashboard) if panel.get("title") == title]
    if len(panels) != 1:
        return [f"{len(panels)} panels titled {title!r}"]
    if panels[0].get("options", {}).get("colorMode") not in {"value", "background"}:
        return [f"{title}: colorMode shows no threshold colour"]
    thresholds = field_thresholds(panels[0], ref)
    return [
        f"{title} [{ref}]: {value:g} shows {threshold_color(thresholds, value)}, not {color}"
        for value, color in expected.items()
        if threshold_color(thresholds, value) != color
    ]


# --- a live Prometheus --------------------------------------------------------------------------


def prometheus_query(base_url: str, expr: str, timeout_s: float = 10) -> dict[str, Any]:
    """GET /api/v1/query; the parsed JSON answer, errors included (HTTP 4xx carry JSON too)."""
    url = f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as error:
        return dict(json.load(error))


def _values(data: Mapping[str, Any]) -> list[float]:
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(item["value"][1]) for item in data["result"]]


def query_problems(base_url: str, expr: str, *, need_data: bool = True) -> list[str]:
    """A query must evaluate; with need_data, return series with at least one finite value."""
    answer = prometheus_query(base_url, expr)
    if answer.get("status") != "success":
        return [f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}"]
    if not need_data:
        return []
    values = _values(answer["data"])
    if not values:
        return [f"{expr!r}: no data"]
    if not any(math.isfinite(value) for value in values):
        return [f"{expr!r}: only NaN/Inf values {values}"]
    return []
