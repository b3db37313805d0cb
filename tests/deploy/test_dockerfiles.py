"""The Dockerfiles: hadolint, and the house rules hadolint does not know (nothing is built)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.checks import dockerfile_instructions, dockerfile_policy, hadolint_problems
from tests.deploy.tools import DEPLOY, REPO_ROOT

DOCKER = DEPLOY / "docker"
SERVERS = ["server.Dockerfile", "server-gpu.Dockerfile"]
ALL = [*SERVERS, "trainer.Dockerfile"]


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


@pytest.mark.parametrize("name", SERVERS)
def test_server_images_carry_no_pytorch(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert "[serving]" in text and "[training]" not in text and "torch" not in text
    assert "COPY training" not in text
    assert ("EXPOSE", "8001 8002") in instructions(name)
    assert ("ENTRYPOINT", '["python", "-m", "service"]') in instructions(name)


def test_cpu_image_swaps_in_the_cpu_onnxruntime() -> None:
    text = (DOCKER / "server.Dockerfile").read_text()
    assert "pip uninstall --yes onnxruntime-gpu" in text
    assert re.search(r"ARG ONNXRUNTIME_VERSION=\d+\.\d+\.\d+", text)


def test_gpu_image_matches_onnxruntime_gpu_to_its_cuda() -> None:
    text = (DOCKER / "server-gpu.Dockerfile").read_text()
    bases = set(re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE))
    (base,) = bases
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    assert cuda, base
    # onnxruntime-gpu 1.19 to 1.22 link CUDA 12 (libcudart.so.12) and cuDNN 9; 1.22.0 is built
    # with CUDA 12.2, so the runtime must be 12.2 or newer within 12.
    version = re.search(r"ARG ONNXRUNTIME_GPU_VERSION=(\d+)\.(\d+)\.(\d+)", text)
    assert version and (int(version[1]), 19 <= int(version[2]) <= 22) == (1, True)
    assert int(cuda[1]) == 12 and int(cuda[2]) >= 2
    assert "CONVSERVE_PROVIDERS=cuda" in text


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
        "no HEALTHCHECK through the gRPC health protocol (service.client health)",
    ]
