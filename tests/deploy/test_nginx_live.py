"""The nginx gRPC load balancer of the scale variant, live: two servers behind nginx on loopback.

nginx runs the shipped template (deploy/nginx/templates/), rendered with one upstream line per
backend as Docker's DNS would give it. Calls must reach both backends, and keep succeeding once
one backend is stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.processes import (
    NGINX_TEMPLATE,
    NginxProcess,
    ServiceProcess,
    http_get,
    render_nginx_template,
    send_traffic,
)

pytestmark = [pytest.mark.live, pytest.mark.slow]

CALLS = 30


def answered_ok(service: ServiceProcess) -> float:
    """The backend's convserve_requests_total{code="OK"}, read from its own /metrics."""
    total = 0.0
    for family in text_string_to_metric_families(http_get(service.metrics_url)):
        if family.name == "convserve_requests":
            total += sum(
                s.value
                for s in family.samples
                if s.labels.get("code") == "OK" and s.name.endswith("_total")
            )
    return total


@dataclass
class Balanced:
    a: ServiceProcess
    b: ServiceProcess
    nginx: NginxProcess


@pytest.fixture(scope="module")
def balanced(
    service_available: None,
    nginx_bin: Path,
    tiny_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Balanced]:
    workdir = tmp_path_factory.mktemp("balancer")
    a = ServiceProcess("backend-a", workdir, tiny_repository)
    b = ServiceProcess("backend-b", workdir, tiny_repository)
    nginx = NginxProcess(nginx_bin, workdir)
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        nginx.start([a.grpc_address, b.grpc_address])
        yield Balanced(a, b, nginx)
    finally:
        nginx.stop()
        a.stop()
        b.stop()


def good_calls(address: str) -> dict[str, int]:
    report = send_traffic(address, infer=CALLS, classify=0, bad=0, concurrency=4)
    return dict(report["codes"])


def test_shipped_template_is_a_valid_nginx_config(nginx_bin: Path, tmp_path: Path) -> None:
    template = NGINX_TEMPLATE.read_text()
    site = render_nginx_template(template, ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3")
    status, output = NginxProcess(nginx_bin, tmp_path).check(site)
    assert status == 0, output
    assert "grpc_pass grpc://convserve_grpc;" in site
    assert "listen 127.0.0.1:3 http2;" in site
    retry = next(line.split() for line in site.splitlines() if "grpc_next_upstream " in line)
    assert {"error", "timeout"} <= set(retry[1:])


def test_a_broken_nginx_config_fails_the_check(nginx_bin: Path, tmp_path: Path) -> None:
    template = NGINX_TEMPLATE.read_text().replace("non_idempotent;", "unavailable;")
    site = render_nginx_template(template, ["127.0.0.1:1"], "127.0.0.1:3")
    status, output = NginxProcess(nginx_bin, tmp_path).check(site)
    assert status != 0
    assert 'invalid value "unavailable"' in output


def test_calls_reach_both_backends(balanced: Balanced) -> None:
    before = answered_ok(balanced.a), answered_ok(balanced.b)
    assert good_calls(balanced.nginx.address) == {"OK": CALLS}
    after = answered_ok(balanced.a), answered_ok(balanced.b)
    served = [after[0] - before[0], after[1] - before[1]]
    assert sum(served) == CALLS
    assert min(served) > 0, f"one backend got nothing: {served}"


def test_calls_keep_succeeding_with_one_backend_stopped(balanced: Balanced) -> None:
    assert balanced.b.stop() is not None
    before = answered_ok(balanced.a)
    assert good_calls(balanced.nginx.address) == {"OK": CALLS}
    assert answered_ok(balanced.a) - before == CALLS


def test_without_retries_a_stopped_backend_fails_calls(
    balanced: Balanced, nginx_bin: Path, tmp_path: Path
) -> None:
    """The previous test can fail: the same setup without grpc_next_upstream loses calls."""
    assert not balanced.b.running()
    template = NGINX_TEMPLATE.read_text()
    no_retry = template.replace(
        "grpc_next_upstream error timeout non_idempotent;", "grpc_next_upstream off;"
    )
    assert no_retry != template
    nginx = NginxProcess(nginx_bin, tmp_path)
    try:
        nginx.start([balanced.b.grpc_address, balanced.a.grpc_address], template=no_retry)
        codes = good_calls(nginx.address)
    finally:
        nginx.stop()
    assert codes.get("UNAVAILABLE", 0) > 0, codes
