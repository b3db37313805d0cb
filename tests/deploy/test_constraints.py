"""One set of pins: constraints.txt is the tested environment, and every install goes through it.

The Makefile (so CI) installs with `-c constraints.txt`; the images run scripts/install-deps.sh,
which does the same (test_dockerfiles checks that they do, test_image_installs replays them).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.deploy.images import read_pins
from tests.deploy.tools import REPO_ROOT

CONSTRAINTS = REPO_ROOT / "constraints.txt"
GPU_IMAGE = REPO_ROOT / "constraints-gpu-image.txt"


def test_constraints_are_the_versions_this_environment_runs() -> None:
    # Fails after an upgrade in .venv until `make constraints` records it (or the reverse).
    checked = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "freeze-constraints.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_cpu_image_and_the_tests_run_one_onnxruntime_version() -> None:
    pins = read_pins(CONSTRAINTS)
    tested = importlib.metadata.version("onnxruntime-gpu")
    assert pins["onnxruntime"] == pins["onnxruntime-gpu"] == tested


def test_the_gpu_image_departs_only_in_onnxruntime_gpu() -> None:
    # Each override replaces a pin (scripts/install-deps.sh drops the line of the same name).
    overrides = read_pins(GPU_IMAGE)
    assert list(overrides) == ["onnxruntime-gpu"]
    assert overrides.keys() <= read_pins(CONSTRAINTS).keys()
    for line in GPU_IMAGE.read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z0-9-]+==[\w.]+", line), line


def test_every_pip_install_in_the_makefile_uses_the_constraints() -> None:
    text = (REPO_ROOT / "Makefile").read_text()
    (definition,) = re.findall(r"^PIP_INSTALL\s*:=\s*(.+)$", text, flags=re.MULTILINE)
    recipes = [
        line.strip().replace("$(PIP_INSTALL)", definition)
        for line in text.splitlines()
        if line.startswith("\t")
    ]
    installs = [line for line in recipes if "pip install" in line]
    assert len(installs) >= 3  # the tools, the run set, the dev set
    assert [line for line in installs if "-c constraints.txt" not in line] == []
    assert [line for line in installs if " -e " in line and "--build-constraint" not in line] == []


def test_the_install_script_names_the_images_it_knows() -> None:
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "install-deps.sh"), "servre"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "unknown image 'servre'; choose one of: server, server-gpu, trainer"
    )


def build_wheel(
    tmp_path: Path, setuptools: str, requires: str | None = None
) -> subprocess.CompletedProcess[str]:
    """An isolated `pip wheel` of a copy of the project, its setuptools constrained (and its
    build-system requirement replaced by `requires` when given)."""
    source = tmp_path / "source"
    source.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "README.md", source / "README.md")
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    if requires is not None:
        pyproject = re.sub(r"(?m)^requires = .*$", f"requires = [{requires!r}]", pyproject, count=1)
    (source / "pyproject.toml").write_text(pyproject)
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info")
    for package in ("service", "training"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=ignore)
    build_constraint = tmp_path / "build-constraints.txt"
    build_constraint.write_text(f"setuptools{setuptools}\n")
    return subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
            "--build-constraint", str(build_constraint),
            "--wheel-dir", str(tmp_path / "wheels"), str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip


@pytest.mark.image_install
def test_the_declared_setuptools_floor_builds_the_project_and_the_one_below_does_not(
    tmp_path: Path,
) -> None:
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]
    (floor,) = [re.fullmatch(r"setuptools>=(\d+)", r) for r in requires["requires"]]
    assert floor, requires
    major = int(floor[1])

    built = build_wheel(tmp_path / "floor", f">={major},<{major + 1}")
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "floor" / "wheels").glob("convserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("convserve-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()

    # The same sources with the floor lifted: the setuptools just below it rejects them.
    below = build_wheel(tmp_path / "below", f"<{major}", requires="setuptools")
    assert below.returncode != 0
    assert "project.license" in below.stderr, below.stderr[-3000:]
