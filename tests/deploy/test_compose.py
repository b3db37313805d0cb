"""docker-compose.yml and its variants, parsed by the real Docker Compose v2 binary (`config`).

Nothing is started: `docker compose config` validates and merges the files without an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.checks import compose_config, compose_policy
from tests.deploy.tools import REPO_ROOT

BASE = REPO_ROOT / "docker-compose.yml"
GPU = REPO_ROOT / "docker-compose.gpu.yml"
SCALE = REPO_ROOT / "docker-compose.scale.yml"
VARIANTS = {
    "base": [BASE],
    "gpu": [BASE, GPU],
    "scale": [BASE, SCALE],
    "gpu+scale": [BASE, GPU, SCALE],
}


def config(compose: Path, *files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    model, problems = compose_config(compose, files, env)
    assert problems == []
    assert model is not None
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_valid_and_pinned(compose: Path, variant: str) -> None:
    model = config(compose, *VARIANTS[variant])
    assert compose_policy(model) == []


def test_server_waits_for_the_trainer_and_shares_its_volume(compose: Path) -> None:
    model = config(compose, BASE)
    trainer, server = model["services"]["trainer"], model["services"]["server"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert trainer.get("restart", "no") == "no"
    (trainer_mount,) = trainer["volumes"]
    (server_mount,) = server["volumes"]
    assert trainer_mount["type"] == server_mount["type"] == "volume"
    assert trainer_mount["source"] == server_mount["source"] == "models"
    assert trainer_mount["target"] == "/models" and "--repository" in trainer["command"]
    assert trainer["command"][trainer["command"].index("--repository") + 1] == "/models"
    assert server_mount["read_only"] is True
    assert server["environment"]["CONVSERVE_MODEL_REPOSITORY"] == "/models"
    assert "models" in model["volumes"]


def test_server_health_is_the_grpc_health_protocol(compose: Path) -> None:
    server = config(compose, BASE)["services"]["server"]
    check = server["healthcheck"]["test"]
    assert check[0] == "CMD"
    assert check[1:5] == ["python", "-m", "service.tools.client", "health"]
    assert check[check.index("--address") + 1] == "127.0.0.1:8001"


def test_monitoring_state_lives_in_named_volumes(compose: Path) -> None:
    model = config(compose, BASE)
    for service, target in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
        mounts = {m["target"]: m for m in model["services"][service]["volumes"]}
        assert mounts[target]["type"] == "volume", service
        assert mounts[target]["source"] in model["volumes"]
    prometheus = {m["target"]: m["source"] for m in model["services"]["prometheus"]["volumes"]}
    assert Path(prometheus["/etc/prometheus"]) == REPO_ROOT / "deploy" / "prometheus"
    assert (
        "--config.file=/etc/prometheus/prometheus.yml" in model["services"]["prometheus"]["command"]
    )


def test_grafana_credentials_come_from_the_environment(compose: Path) -> None:
    default = config(compose, BASE)["services"]["grafana"]["environment"]
    assert (default["GF_SECURITY_ADMIN_USER"], default["GF_SECURITY_ADMIN_PASSWORD"]) == (
        "admin",
        "admin",
    )
    chosen = config(compose, BASE, env={"GRAFANA_ADMIN_PASSWORD": "s3cret"})
    assert chosen["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"


def test_ports_are_published_on_loopback_unless_asked(compose: Path) -> None:
    ports = config(compose, BASE)["services"]["server"]["ports"]
    assert {(p["host_ip"], p["target"]) for p in ports} == {
        ("127.0.0.1", 8001),
        ("127.0.0.1", 8002),
    }
    opened = config(compose, BASE, env={"CONVSERVE_BIND_ADDRESS": "0.0.0.0"})
    assert {p["host_ip"] for p in opened["services"]["server"]["ports"]} == {"0.0.0.0"}


def test_gpu_variant_reserves_a_gpu_and_selects_cuda(compose: Path) -> None:
    server = config(compose, BASE, GPU)["services"]["server"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == 1
    assert server["environment"]["CONVSERVE_PROVIDERS"] == "cuda"
    assert server["build"]["dockerfile"] == "deploy/docker/server-gpu.Dockerfile"
    assert server["image"].startswith("convserve-server-gpu:")
    # Everything else about the server is kept from the base file.
    assert server["healthcheck"]["test"][1:5] == ["python", "-m", "service.tools.client", "health"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert config(compose, BASE)["services"]["server"].get("deploy") is None


def test_scale_variant_balances_replicas_with_nginx(compose: Path) -> None:
    model = config(compose, BASE, SCALE)
    server, lb = model["services"]["server"], model["services"]["lb"]
    assert server["deploy"]["replicas"] >= 2
    assert not server.get("ports"), "replicas cannot share host ports"
    assert lb["depends_on"]["server"]["condition"] == "service_healthy"
    assert lb["environment"]["CONVSERVE_BACKEND"] == "server:8001"
    (template,) = lb["volumes"]
    assert Path(template["source"]).is_file()
    assert template["target"].startswith("/etc/nginx/templates/")
    assert [p["target"] for p in lb["ports"]] == [int(lb["environment"]["CONVSERVE_LB_PORT"])]


def test_a_broken_compose_file_fails_the_check(compose: Path, tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        BASE.read_text().replace(
            "condition: service_completed_successfully", "condition: service_finished"
        )
    )
    model, problems = compose_config(compose, [broken])
    assert model is None
    assert "depends_on.trainer.condition value must be one of" in problems[0]


def test_an_unpinned_image_fails_the_policy(compose: Path, tmp_path: Path) -> None:
    unpinned = tmp_path / "docker-compose.yml"
    unpinned.write_text(BASE.read_text().replace("grafana/grafana:11.4.0", "grafana/grafana"))
    model = config(compose, unpinned)
    assert compose_policy(model) == [
        "service grafana: image 'grafana/grafana' is not pinned to an exact tag"
    ]
