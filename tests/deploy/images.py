"""An image's build and start, replayed without a Docker engine.

What a Dockerfile says is read, not restated: the build stage's COPY lines make a copy of the
build context, its ENV and ARG defaults make the environment of its install line (the one RUN
that calls scripts/install-deps.sh), which runs with bash in a fresh virtual environment made by
the image's Python version; the final stage's ENV, WORKDIR, ENTRYPOINT, CMD and HEALTHCHECK
start the result. The image's paths (/opt/venv, /src, /models, /home/convserve) become folders
of the test's, and the servers listen on loopback ports the OS picks, which they report.
Deliberate departures: PIP_NO_CACHE_DIR is dropped so that the wheels come from pip's cache
(~/.cache/pip) after the first run, and the machine's own pip configuration applies.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

from tests.deploy.checks import Instruction, dockerfile_instructions
from tests.deploy.tools import REPO_ROOT

INSTALL_SCRIPT = "scripts/install-deps.sh"
# The python3 of the Ubuntu release an NVIDIA CUDA base image is built on.
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
# Environment variables of the build stage the replay leaves out (see the module docstring).
DROPPED_BUILD_ENV = {"PIP_NO_CACHE_DIR"}


@dataclass(frozen=True)
class Stage:
    """One FROM and the instructions up to the next."""

    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def stages(text: str) -> list[Stage]:
    result: list[Stage] = []
    for instruction in dockerfile_instructions(text):
        if instruction.keyword == "FROM":
            result.append(Stage(instruction.arguments.split()[0], []))
        elif result:
            result[-1].instructions.append(instruction)
    return result


def env_pairs(arguments: str) -> list[tuple[str, str]]:
    """`ENV A=1 B="x y"` -> [("A", "1"), ("B", "x y")]."""
    return [tuple(word.split("=", 1)) for word in shlex.split(arguments)]  # type: ignore[misc]


def expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)


@dataclass(frozen=True)
class Recipe:
    """What a Dockerfile says about installing and starting its image."""

    dockerfile: Path
    build: Stage
    final: Stage

    @classmethod
    def read(cls, dockerfile: Path) -> Recipe:
        found = stages(dockerfile.read_text())
        assert len(found) == 2, f"{dockerfile.name}: expected a build stage and a final stage"
        return cls(dockerfile, found[0], found[-1])

    @property
    def python_version(self) -> str:
        """major.minor of the Python the image runs."""
        python = re.fullmatch(r"python:(\d+\.\d+)\.\d+(-.*)?", self.final.base)
        if python:
            return python[1]
        ubuntu = re.search(r"-ubuntu(\d+\.\d+)$", self.final.base)
        if ubuntu and ubuntu[1] in UBUNTU_PYTHON:
            return UBUNTU_PYTHON[ubuntu[1]]
        raise AssertionError(f"which Python does {self.final.base} run? (add it to images.py)")

    @property
    def install_line(self) -> str:
        (line,) = [run for run in self.build.all("RUN") if INSTALL_SCRIPT in run]
        return line

    @property
    def image_argument(self) -> str:
        """The image name the install line passes to the script (server, server-gpu, trainer)."""
        words = shlex.split(self.install_line)
        return words[words.index(INSTALL_SCRIPT) + 1]

    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of each COPY from the build context into the build stage."""
        result = []
        for arguments in self.build.all("COPY"):
            words = shlex.split(arguments)
            assert not any(w.startswith("--") for w in words), f"unexpected COPY {arguments}"
            result.append((words[:-1], words[-1]))
        return result

    def json_array(self, keyword: str, stage: Stage | None = None) -> list[str]:
        arguments = (stage or self.final).last(keyword)
        if arguments is None:
            return []
        if keyword == "HEALTHCHECK":
            arguments = arguments.split(" CMD ", 1)[1]
        value = json.loads(arguments)
        assert isinstance(value, list), f"{keyword} must be the exec (JSON) form"
        return [str(v) for v in value]


def find_python(version: str) -> Path | None:
    """An interpreter of major.minor `version` on this machine: on PATH, or one pyenv keeps."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(
        glob.glob(str(pyenv_root / "versions" / f"{version}.*" / "bin" / f"python{version}")),
        reverse=True,
    )
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip().startswith(f"{version}."):
            return Path(candidate)
    return None


def read_pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a constraints file's `name==version` lines."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def image_pins(recipe: Recipe) -> dict[str, str]:
    """The pins an image installs with: constraints.txt and, over it, any overrides it copies."""
    pins = read_pins(REPO_ROOT / "constraints.txt")
    for sources, _ in recipe.copies():
        for source in sources:
            if source.startswith("constraints-") and source.endswith(".txt"):
                pins.update(read_pins(REPO_ROOT / source))
    return pins


@dataclass
class Replay:
    """The folders that stand in for one image's paths, and the commands run in them."""

    recipe: Recipe
    root: Path
    python: Path
    log: list[str] = field(default_factory=list)

    @property
    def paths(self) -> dict[str, Path]:
        return {
            "/opt/venv": self.root / "venv",
            "/src": self.root / "src",
            "/models": self.root / "models",
            "/home/convserve": self.root / "home",
        }

    def adapt(self, value: str) -> str:
        """An image path (or PATH-like list) in terms of this replay's folders."""
        for image_path, here in self.paths.items():
            value = re.sub(rf"(?<![\w/]){re.escape(image_path)}(?=/|:|$)", str(here), value)
        return value

    def _environment(self, stage: Stage, dropped: set[str]) -> dict[str, str]:
        """This machine's environment (less what would leak into the image's), then the stage's
        ARG defaults and ENV, in order (the Dockerfiles set them all before they RUN anything
        that reads them)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("CONVSERVE_") and key not in {"PYTHONPATH", "VIRTUAL_ENV"}
        }
        for arguments in stage.all("ARG"):
            name, _, default = arguments.partition("=")
            env[name] = default.strip('"')
        for arguments in stage.all("ENV"):
            for key, value in env_pairs(arguments):
                if key not in dropped:
                    env[key] = self.adapt(expand(value, env))
        return env

    def run(
        self, argv: Sequence[str | Path], *, cwd: Path, env: Mapping[str, str], timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        self.log.append(f"$ (cd {cwd}) {shlex.join(map(str, argv))}")
        done = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        self.log.append(done.stdout[-4000:] + done.stderr[-4000:])
        return done

    def build(self, timeout_s: float = 600) -> None:
        """Copies the build context, makes the venv and runs the image's install line."""
        for folder in self.paths.values():
            folder.mkdir(parents=True, exist_ok=True)
        # COPY destinations are relative to the build stage's WORKDIR, /src here.
        assert self.recipe.build.last("WORKDIR") == "/src", self.recipe.dockerfile.name
        src = self.paths["/src"]
        ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", ".*_cache", "*.egg-info")
        for sources, destination in self.recipe.copies():
            into = src / destination
            for source in sources:
                origin = REPO_ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, into, ignore=ignore, dirs_exist_ok=True)
                elif destination.endswith("/"):
                    into.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, into / origin.name)
                else:
                    shutil.copy2(origin, into)
        venv = self.paths["/opt/venv"]
        made = self.run(
            [self.python, "-m", "venv", venv], cwd=self.root, env=os.environ, timeout_s=120
        )
        assert made.returncode == 0, self.transcript()
        env = self._environment(self.recipe.build, DROPPED_BUILD_ENV)
        installed = self.run(
            ["bash", "-c", self.recipe.install_line],
            cwd=src,
            env=env,
            timeout_s=timeout_s,
        )
        assert installed.returncode == 0, self.transcript()

    def installed(self) -> dict[str, str]:
        """{normalised name: version} of every distribution in the image's environment."""
        listing = self.run(
            [self.paths["/opt/venv"] / "bin" / "python", "-m", "pip", "list", "--format=json"],
            cwd=self.root,
            env=os.environ,
            timeout_s=60,
        )
        assert listing.returncode == 0, self.transcript()
        return {
            canonicalize_name(entry["name"]): entry["version"]
            for entry in json.loads(listing.stdout)
        }

    def runtime_environment(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**self._environment(self.recipe.final, set()), **(overrides or {})}

    def command(self, extra: Sequence[str] = ()) -> list[str]:
        """ENTRYPOINT + CMD with the image's paths adapted, `extra` appended."""
        argv = self.recipe.json_array("ENTRYPOINT") + self.recipe.json_array("CMD")
        return [self.adapt(word) for word in argv] + list(extra)

    @property
    def workdir(self) -> Path:
        return Path(self.adapt(self.recipe.final.last("WORKDIR") or "/"))

    def executable(self, name: str, env: Mapping[str, str]) -> str:
        found = shutil.which(name, path=env["PATH"])
        assert found, f"{name} not on the image's PATH {env['PATH']}"
        assert Path(found).is_relative_to(self.paths["/opt/venv"]), found
        return found

    def transcript(self) -> str:
        return "\n".join(self.log)[-12000:]
