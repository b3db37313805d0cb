"""Writes constraints.txt: the exact version of every distribution the tested environment holds
for convserve's extras, so that `make`, CI and every image install what the tests ran.

    .venv/bin/python scripts/freeze-constraints.py           # rewrite it (`make constraints`)
    .venv/bin/python scripts/freeze-constraints.py --check   # exit 1 when it is stale

The requirements come from pyproject.toml (not from the installed metadata, which lags behind an
edit until the next `pip install -e`); their versions from the environment this interpreter runs
in, following each distribution's own requirements (markers evaluated for this machine: Linux
x86_64, this Python). A requirement that is not installed is an error, except a twin: the
CPU-only `onnxruntime` is pinned to the version of the tested `onnxruntime-gpu` (same sources,
same release), so the CPU image ships the version line the tests run.

To move a pin: install the new version into .venv (`pip install -U ...` without the constraints),
run `make test`, then `make constraints`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = "convserve"
# Every extra: the images take subsets, the development environment takes the union.
EXTRAS = ("training", "serving", "serving-cpu", "dev")
# Build and install tools: pip installs the rest, setuptools builds convserve itself
# (pip's --build-constraint gives the isolated build the same version).
TOOLS = ("pip", "setuptools")
# A distribution that is pinned to the installed version of its twin when it is not installed.
TWINS = {"onnxruntime": "onnxruntime-gpu"}

HEADER = """\
# The exact versions the tests ran, for every extra of convserve (the images take subsets).
# Generated from the tested environment by scripts/freeze-constraints.py (`make constraints`);
# do not edit. Used as `pip install -c constraints.txt --build-constraint constraints.txt` by
# the Makefile (so CI) and by scripts/install-deps.sh (so every image).
# onnxruntime (the CPU image) is pinned to the tested onnxruntime-gpu's version.
"""


def project_requirements(pyproject: Path) -> dict[str, list[Requirement]]:
    """The project's requirements per extra ("" for the unconditional ones)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = {"": [Requirement(text) for text in project.get("dependencies", [])]}
    for extra, texts in project.get("optional-dependencies", {}).items():
        requirements[extra] = [Requirement(text) for text in texts]
    return requirements


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether a requirement holds on this machine for a distribution asked for with `extras`."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def display_name(name: str) -> str:
    return str(importlib.metadata.metadata(name)["Name"])


def resolve_pins(pyproject: Path) -> dict[NormalizedName, str]:
    """`name==version` lines keyed by normalised name, for the closure of every extra."""
    own = project_requirements(pyproject)
    pins: dict[NormalizedName, str] = {}
    missing: list[str] = []
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    queue: list[tuple[str, set[str]]] = [(PROJECT, set(EXTRAS)), *((t, set()) for t in TOOLS)]
    while queue:
        name, extras = queue.pop()
        key = canonicalize_name(name)
        if (key, frozenset(extras)) in seen:
            continue
        seen.add((key, frozenset(extras)))
        if key == PROJECT:
            # Self-references (convserve[serving-base]) expand the project's own extras.
            requirements = [r for extra in {"", *extras} for r in own.get(extra, [])]
        else:
            version = installed_version(name)
            twin = TWINS.get(key)
            if version is None and twin is not None and installed_version(twin) is not None:
                # Its requirements are the twin's, which the closure already follows.
                pins[key] = f"{name}=={installed_version(twin)}"
                continue
            if version is None:
                missing.append(name)
                continue
            pins[key] = f"{display_name(name)}=={version}"
            requirements = [Requirement(text) for text in importlib.metadata.requires(name) or []]
        for requirement in requirements:
            if applies(requirement, extras):
                queue.append((requirement.name, set(requirement.extras)))
    if missing:
        raise SystemExit(
            "required but not installed here: "
            + ", ".join(sorted(set(missing)))
            + "\ninstall them (make's .venv has them) and run this again"
        )
    return pins


def render(pins: dict[NormalizedName, str]) -> str:
    return HEADER + "".join(f"{pins[key]}\n" for key in sorted(pins))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "constraints.txt")
    parser.add_argument("--pyproject", type=Path, default=REPO_ROOT / "pyproject.toml")
    parser.add_argument(
        "--check", action="store_true", help="compare instead of writing; exit 1 when they differ"
    )
    args = parser.parse_args(argv)
    text = render(resolve_pins(args.pyproject))
    if not args.check:
        args.output.write_text(text)
        return 0
    current = args.output.read_text() if args.output.exists() else ""
    if current == text:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        text.splitlines(keepends=True),
        f"{args.output.name} (committed)",
        f"{args.output.name} (this environment)",
    )
    sys.stdout.writelines(diff)
    print(f"{args.output} is stale: run `make constraints`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
