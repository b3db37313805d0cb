"""The fault suite: the real server as a process, driven past its limits; figures printed.

Each test starts `python -m service` (or the gated wrapper, whose batches wait for SIGUSR1)
on 127.0.0.1 with a port file, drives it with real gRPC clients, and prints what it measured
(`pytest tests/faults -s` shows the figures; docs/reliability.md records them). Assertions are
about outcomes (status codes, messages, counts, leaks), never about how fast the machine is.
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.model_factory import TinySpec, write_version
from tests.service.test_lifecycle import ServerProcess


class FaultServer(ServerProcess):
    """A server process, with the figures the fault tests read from outside it."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found is not None
        return int(found.group(1)) / 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as reply:
            return str(reply.read().decode())

    def sample(self, name: str, **labels: str) -> float:
        """One series' value, 0 when absent (labels matched exactly, in any order)."""
        for line in self.metrics_text().splitlines():
            if not line.startswith(name + "{") and line.split(" ")[0] != name:
                continue
            series, value = line.rsplit(" ", 1)
            found = dict(re.findall(r'(\w+)="([^"]*)"', series))
            if series.split("{")[0] == name and found == labels:
                return float(value)
        return 0.0


@pytest.fixture(scope="session")
def fault_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` version 1: the model every fault test serves."""
    repository = tmp_path_factory.mktemp("fault-repository")
    write_version(repository, "tiny", 1, TinySpec())
    return repository


@pytest.fixture
def fault_server(
    request: pytest.FixtureRequest, fault_repository: Path, tmp_path: Path
) -> Iterator[FaultServer]:
    """The server process; a test's `server_flags` marker adds flags, `gated` holds batches."""
    marker = request.node.get_closest_marker("server_flags")
    flags: tuple[str, ...] = tuple(marker.args) if marker else ()
    module = "tests.service.gated_server" if request.node.get_closest_marker("gated") else "service"
    server = FaultServer(fault_repository, tmp_path, *flags, module=module)
    yield server
    server.close()
