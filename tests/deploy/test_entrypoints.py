"""The commands and settings the deployment files hand to the two programs are ones they accept.

The trainer command (compose, Kubernetes Job, Dockerfile CMD) is parsed by the trainer's own
argument parser; every CONVSERVE_* variable (compose variants, Kubernetes, Dockerfile ENV) is a
real setting, and together they build valid server settings.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploy.checks import compose_config, dockerfile_instructions
from tests.deploy.conftest import missing
from tests.deploy.tools import DEPLOY, REPO_ROOT

DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"{name} ({error})", "it is part of this repository")
        raise


def trainer_commands(compose: Path) -> dict[str, list[str]]:
    model, problems = compose_config(compose, [REPO_ROOT / "docker-compose.yml"])
    assert problems == [] and model is not None
    job = yaml.safe_load((K8S / "model" / "trainer-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (cmd,) = [
        i.arguments
        for i in dockerfile_instructions((DOCKER / "trainer.Dockerfile").read_text())
        if i.keyword == "CMD"
    ]
    return {
        "compose": model["services"]["trainer"]["command"],
        "kubernetes": container["args"],
        "dockerfile": json.loads(cmd),
    }


def server_environments(compose: Path) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for name, files in {
        "compose": ["docker-compose.yml"],
        "compose-gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
    }.items():
        model, problems = compose_config(compose, [REPO_ROOT / f for f in files])
        assert problems == [] and model is not None
        found[name] = dict(model["services"]["server"]["environment"])
    for variant in ("cpu", "gpu"):
        deployment = yaml.safe_load((K8S / variant / "deployment.yaml").read_text())
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        found[f"kubernetes-{variant}"] = {e["name"]: e["value"] for e in container["env"]}
    for dockerfile in ("server.Dockerfile", "server-gpu.Dockerfile"):
        env: dict[str, str] = {}
        for item in dockerfile_instructions((DOCKER / dockerfile).read_text()):
            if item.keyword == "ENV":
                env.update(word.split("=", 1) for word in item.arguments.split() if "=" in word)
        found[dockerfile] = {k: v for k, v in env.items() if k.startswith("CONVSERVE_")}
    return found


def test_trainer_commands_parse_with_the_trainer_cli(compose: Path) -> None:
    parser = module("training.cli").get_args_parser()
    for where, argv in trainer_commands(compose).items():
        args = parser.parse_args(argv)
        assert (args.command, args.repository, args.model_name, args.if_missing) == (
            "train", "/models", "mnist_cnn", True,
        ), where  # fmt: skip


def test_server_environments_are_valid_settings(compose: Path) -> None:
    settings = module("service.settings")
    known = {settings.env_name(field.name) for field in settings.fields()}
    providers: dict[str, Any] = {}
    for where, env in server_environments(compose).items():
        assert set(env) - known == set(), f"{where}: unknown settings"
        built = settings.settings_from(argv=[], environ=env)
        assert str(built.model_repository) == "/models", where
        assert (built.grpc_port, built.metrics_port) == (8001, 8002), where
        assert built.host == "0.0.0.0", where
        providers[where] = built.providers
    assert providers == {
        "compose": "cpu", "compose-gpu": "cuda", "kubernetes-cpu": "cpu", "kubernetes-gpu": "cuda",
        "server.Dockerfile": "cpu", "server-gpu.Dockerfile": "cuda",
    }  # fmt: skip


def test_a_misspelled_setting_is_caught(compose: Path) -> None:
    settings = module("service.settings")
    env = server_environments(compose)["compose"]
    env["CONVSERVE_PROVIDER"] = env.pop("CONVSERVE_PROVIDERS")
    with pytest.raises(
        settings.ConfigurationError,
        match=r"variable CONVSERVE_PROVIDER \(did you mean CONVSERVE_PROVIDERS\?\)",
    ):
        settings.settings_from(argv=[], environ=env)
    with pytest.raises(settings.ConfigurationError, match="choose one of: auto, cuda, cpu"):
        settings.settings_from(argv=[], environ={"CONVSERVE_PROVIDERS": "gpu"})


def test_every_other_convserve_variable_of_the_deployment_is_allowed() -> None:
    """Compose interpolation and nginx variables (CONVSERVE_BIND_ADDRESS, ...) are no settings;
    the server must not refuse to start when one is exported in its environment."""
    settings = module("service.settings")
    known = {settings.env_name(field.name) for field in settings.fields()}
    files = [*REPO_ROOT.glob("docker-compose*.yml"), *DEPLOY.rglob("*")]
    used = {
        name
        for path in files
        if path.is_file() and path.suffix != ".json"
        for name in re.findall(r"\bCONVSERVE_[A-Z0-9_]*[A-Z0-9]", path.read_text())
    }
    others = used - known
    assert others, "expected compose interpolation variables such as CONVSERVE_BIND_ADDRESS"
    assert others <= settings.OTHER_CONVSERVE_VARIABLES
    settings.settings_from(argv=[], environ=dict.fromkeys(others, "x"))
