"""The Dockerfiles: hadolint, and the house rules hadolint does not know (nothing is built here;
test_image_installs replays each image's install and start)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.deploy.checks import dockerfile_instructions, dockerfile_policy, hadolint_problems
from tests.deploy.tools import DEPLOY, REPO_ROOT

DOCKER = DEPLOY / "docker"
SERVERS = ["server.Dockerfile", "server-gpu.Dockerfile"]
ALL = [*SERVERS, "trainer.Dockerfile"]
# The argument each image passes to scripts/install-deps.sh.
IMAGES = {
    "server.Dockerfile": "server",
    "server-gpu.Dockerfile": "server-gpu",
    "trainer.Dockerfile": "trainer",
}


def instructions(name: str) -> list[tuple[str, str]]:
    return [(i.keyword, i.arguments) for i in dockerfile_instructions((DOCKER / name).read_text())]


@pytest.mark.parametrize("name", ALL)
def test_hadolint_passes(hadolint: Path, name: str) -> None:
    assert hadolint_problems(hadolint, DOCKER / name) == []


@pytest.mark.parametrize("name", ALL)
def test_pinned_bases_non_root_and_health(name: str) -> None:
    assert dockerfile_policy((DOCKER / name).read_text(), server=name in SERVERS) == []


@pytest.mark.parametrize("name", ALL)
def test_multi_stage_build_copies_only_the_environment(name: str) -> None:
    froms = [args for keyword, args in instructions(name) if keyword == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    copies = [args for keyword, args in instructions(name) if keyword == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies


def install_runs(name: str) -> list[str]:
    """The build stage's RUN lines that install Python packages."""
    build = dockerfile_instructions((DOCKER / name).read_text())
    build = build[: [i.keyword for i in build].index("FROM", 1)]
    runs = [i.arguments for i in build if i.keyword == "RUN"]
    return [run for run in runs if re.search(r"\bpip\b|install-deps", run)]


@pytest.mark.parametrize(("name", "image"), IMAGES.items())
def test_every_image_installs_through_the_one_script_with_the_pins(name: str, image: str) -> None:
    # One line, the one tests/deploy/test_image_installs.py replays: no pip of its own.
    assert install_runs(name) == [f"bash scripts/install-deps.sh {image}"]
    copies = [args for keyword, args in instructions(name) if keyword == "COPY"]
    assert any("constraints.txt" in args.split()[:-1] for args in copies)
    assert "scripts/install-deps.sh scripts/" in copies


@pytest.mark.parametrize("name", SERVERS)
def test_server_images_carry_no_pytorch(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert "torch" not in text and "COPY training" not in text
    assert ("EXPOSE", "8001 8002") in instructions(name)
    assert ("ENTRYPOINT", '["python", "-m", "service"]') in instructions(name)


def extra_requirements(extra: str) -> list[Requirement]:
    """An extra's requirements, convserve[...] self-references expanded."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    found = []
    for requirement in map(Requirement, extras[extra]):
        if requirement.name == "convserve":
            found += [r for e in sorted(requirement.extras) for r in extra_requirements(e)]
        else:
            found.append(requirement)
    return found


def test_cpu_image_installs_only_the_cpu_onnxruntime() -> None:
    # No onnxruntime-gpu downloaded and uninstalled: the image's extra never names it.
    script = (REPO_ROOT / "scripts" / "install-deps.sh").read_text()
    assert re.search(r"^\s*server\) extra=serving-cpu ;;$", script, flags=re.MULTILINE)
    names = {r.name for r in extra_requirements("serving-cpu")}
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names
    assert {"grpcio", "protobuf"} <= names
    assert not any("uninstall" in run for name in ALL for run in install_runs(name))


def test_gpu_image_matches_onnxruntime_gpu_to_its_cuda() -> None:
    text = (DOCKER / "server-gpu.Dockerfile").read_text()
    bases = set(re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE))
    (base,) = bases
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)", base)
    assert cuda, base
    # onnxruntime-gpu 1.19 to 1.26 link CUDA 12 (libcudart.so.12) and cuDNN 9; 1.27 and later
    # link CUDA 13. 1.24 and later need Python 3.11+: Ubuntu 24.04 (python3 3.12), not 22.04
    # (3.10). test_image_installs checks the installed wheel's own CUDA version against the base.
    (line,) = [
        line
        for line in (REPO_ROOT / "constraints-gpu-image.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    version = re.fullmatch(r"onnxruntime-gpu==1\.(\d+)\.\d+", line)
    assert version and 19 <= int(version[1]) <= 26, line
    assert int(cuda[1]) == 12 and cuda[3] == "24.04"
    assert "CONVSERVE_PROVIDERS=cuda" in text


def test_trainer_offers_the_cpu_only_pytorch_as_a_build_argument() -> None:
    arguments = [args for keyword, args in instructions("trainer.Dockerfile") if keyword == "ARG"]
    assert 'TORCH_INDEX_URL=""' in arguments, "empty by default: PyPI's (CUDA) build"
    script = (REPO_ROOT / "scripts" / "install-deps.sh").read_text()
    assert '--extra-index-url "$TORCH_INDEX_URL"' in script


def test_dockerignore_sends_only_the_sources() -> None:
    lines = [
        line
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is ignored unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "service", "training"} <= allowed
    assert not allowed & {".venv", ".git", "model_repository", "data", "runs"}
    copied = {
        args.split()[0].rstrip("/")
        for name in ALL
        for keyword, args in instructions(name)
        if keyword == "COPY" and not args.startswith("--from")
    }
    assert copied <= allowed, "a COPY source the build context does not send"


def test_a_broken_dockerfile_fails_both_checks(hadolint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "COPY . /app\n"
        'CMD ["python", "-m", "service"]\n'
    )
    assert hadolint_problems(hadolint, broken)
    assert dockerfile_policy(broken.read_text(), server=True) == [
        "base image 'python:latest' is not pinned to an exact tag",
        "the final image runs as root: add a USER with a non-root uid",
        "no HEALTHCHECK through the gRPC health protocol (service.tools.client health)",
    ]
