"""Each image's exact dependency set installs on its Python, and what it installs runs.

No Docker engine: tests/deploy/images.py replays each Dockerfile's build stage (a copy of its
build context, its one install line `bash scripts/install-deps.sh <image>`) in a fresh virtual
environment made by the image's Python version, then starts the result with the image's own
ENTRYPOINT, CMD, ENV and HEALTHCHECK. The servers answer the health check and a ModelInfer on the
tiny test model from a real gRPC channel; the trainer trains and exports a (very short) model.

Python versions: the images run 3.11.11 (python:3.11.11-slim-bookworm) and 3.12 (Ubuntu 24.04's
python3, under the GPU image); these run on the same minor versions here (pyenv), so the gap is
the patch level only. onnxruntime-gpu here has no GPU: the GPU image's CUDA provider falls back to
the CPU, which proves that its set installs, loads and serves, not that CUDA works.

Marked `image_install`: they download wheels on a cold cache (pip's, ~/.cache/pip) and the
trainer's set is several GB (about a minute and a half from a warm cache).
`pytest -m "not image_install"` leaves them out.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.deploy.conftest import missing
from tests.deploy.images import Recipe, Replay, find_python, image_pins, read_pins
from tests.deploy.processes import LOOPBACK, wait_for
from tests.deploy.tools import DEPLOY, REPO_ROOT
from tests.model_factory import TinySpec, reference_logits, write_version

pytestmark = pytest.mark.image_install

DOCKER = DEPLOY / "docker"
# Settings the replay changes from the image's: loopback, OS-chosen ports it reports, one thread.
LOOPBACK_SETTINGS = {
    "CONVSERVE_HOST": LOOPBACK,
    "CONVSERVE_GRPC_PORT": "0",
    "CONVSERVE_METRICS_PORT": "0",
    "CONVSERVE_INTRA_OP_THREADS": "1",
}
# Appended to the trainer's CMD: a few seconds of training instead of minutes.
QUICK_TRAINING = [
    "--max-samples", "300", "--epochs", "1", "--blocks", "8/16", "--hidden", "32",
    "--augment", "none", "--no-report", "--no-progress",
]  # fmt: skip


@pytest.fixture
def replay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replay]:
    """The image named by the test's parameter, built (installed) into tmp_path."""
    recipe = Recipe.read(DOCKER / request.param)
    python = find_python(recipe.python_version)
    if python is None:
        missing(f"Python {recipe.python_version} ({recipe.final.base})", "install it (pyenv)")
    assert python is not None
    replayed = Replay(recipe, tmp_path, python)
    try:
        replayed.build()
        yield replayed
    finally:
        # A trainer environment is several GB: never leave it to pytest's tmp retention.
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def assert_installs_exactly_its_pins(replay: Replay) -> dict[str, str]:
    """Every distribution in the environment is pinned, at its pinned version."""
    installed = replay.installed()
    installed.pop("convserve")
    pins = image_pins(replay.recipe)
    unpinned = sorted(name for name in installed if name not in pins)
    assert unpinned == [], f"installed without a pin in constraints.txt: {unpinned}"
    drift = {n: (v, pins[n]) for n, v in installed.items() if pins[n] != v.split("+")[0]}
    assert drift == {}, "installed (version, pin)"
    return installed


def infer(address: str, pixels: np.ndarray) -> np.ndarray:
    from service._proto import grpc_service_pb2, grpc_service_pb2_grpc

    request = grpc_service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    with grpc.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [2, 10])
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)


def serve_and_infer(replay: Replay) -> None:
    """Starts the image's ENTRYPOINT on the tiny model: health check, then one ModelInfer."""
    spec = TinySpec()
    write_version(replay.paths["/models"], "tiny", 1, spec)
    port_file = replay.root / "ports.json"
    env = replay.runtime_environment({**LOOPBACK_SETTINGS, "CONVSERVE_PORT_FILE": str(port_file)})
    argv = replay.command()
    argv[0] = replay.executable(argv[0], env)
    log_path = replay.root / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            argv, cwd=replay.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:

        def ready() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"the server exited:\n{log_path.read_text()[-4000:]}")
            return port_file.exists() and port_file.read_text().endswith("}")

        wait_for(ready, timeout_s=120, what="the server's port file")
        port = json.loads(port_file.read_text())["grpc_port"]

        image_port = replay.recipe.final.last("EXPOSE").split()[0]  # type: ignore[union-attr]
        health = [
            word.replace(f":{image_port}", f":{port}")
            for word in replay.recipe.json_array("HEALTHCHECK")
        ]
        health[0] = replay.executable(health[0], env)
        checked = replay.run(health, cwd=replay.workdir, env=env, timeout_s=60)
        assert checked.returncode == 0 and "SERVING" in checked.stdout, replay.transcript()

        pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
        logits = infer(f"{LOOPBACK}:{port}", pixels)
        np.testing.assert_allclose(logits, reference_logits(spec, pixels), rtol=1e-4, atol=1e-5)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    assert server.returncode == 0, log_path.read_text()[-4000:]


@pytest.mark.parametrize("replay", ["server.Dockerfile"], indirect=True)
def test_cpu_server_image_installs_the_tested_onnxruntime_and_answers(replay: Replay) -> None:
    assert replay.recipe.image_argument == "server"
    installed = assert_installs_exactly_its_pins(replay)
    tested = importlib.metadata.version("onnxruntime-gpu")
    assert installed["onnxruntime"] == tested, "the CPU image must ship the ORT the tests run"
    assert not {"onnxruntime-gpu", "torch"} & installed.keys()
    serve_and_infer(replay)


@pytest.mark.parametrize("replay", ["server-gpu.Dockerfile"], indirect=True)
def test_gpu_server_image_installs_its_pinned_onnxruntime_gpu_and_answers(replay: Replay) -> None:
    assert replay.recipe.image_argument == "server-gpu"
    installed = assert_installs_exactly_its_pins(replay)
    (pinned,) = read_pins(REPO_ROOT / "constraints-gpu-image.txt").items()
    assert pinned == ("onnxruntime-gpu", installed["onnxruntime-gpu"])
    assert not {"onnxruntime", "torch"} & installed.keys()
    # The CUDA the wheel was built with must be what the base image carries: same major, and
    # a minor no newer than the base's.
    probe = replay.run(
        [
            replay.paths["/opt/venv"] / "bin" / "python",
            "-c",
            "from onnxruntime.capi import build_and_package_info as b; print(b.cuda_version)",
        ],
        cwd=replay.root,
        env=replay.runtime_environment(),
        timeout_s=60,
    )
    assert probe.returncode == 0, replay.transcript()
    built = tuple(int(n) for n in probe.stdout.strip().split(".")[:2])
    base = tuple(int(n) for n in replay.recipe.final.base.split(":")[1].split(".")[:2])
    assert built[0] == base[0] and built <= base, (built, replay.recipe.final.base)
    serve_and_infer(replay)


@pytest.mark.parametrize("replay", ["trainer.Dockerfile"], indirect=True)
def test_trainer_image_installs_and_its_command_trains_and_exports(replay: Replay) -> None:
    assert replay.recipe.image_argument == "trainer"
    installed = assert_installs_exactly_its_pins(replay)
    assert installed["onnxruntime-gpu"] == importlib.metadata.version("onnxruntime-gpu")
    assert installed["torch"] == importlib.metadata.version("torch")
    env = replay.runtime_environment()
    argv = replay.command(QUICK_TRAINING)
    argv[0] = replay.executable(argv[0], env)
    trained = replay.run(argv, cwd=replay.workdir, env=env, timeout_s=300)
    assert trained.returncode == 0, replay.transcript()
    version = replay.paths["/models"] / "mnist_cnn" / "1"
    assert f"wrote version 1: {version}" in trained.stdout
    assert "test accuracy (ONNX Runtime)" in trained.stdout
    assert (version / "model.onnx").is_file()
