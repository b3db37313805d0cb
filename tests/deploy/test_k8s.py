"""The Kubernetes manifests: kubernetes-validate --strict (a warning fails), then the wiring.

There is no kubectl/kustomize here: `render` follows the kustomizations' `resources` lists
(files and folders), which is all these kustomizations use besides common labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.checks import kubernetes_problems
from tests.deploy.shipped import adapter_rules
from tests.deploy.tools import DEPLOY

K8S = DEPLOY / "k8s"
MANIFESTS = sorted(
    path
    for path in K8S.rglob("*.yaml")
    if path.name != "kustomization.yaml"  # kustomize's own kind, no Kubernetes schema
)
VARIANTS = ["cpu", "gpu"]
LABELS = {"app.kubernetes.io/name": "convserve", "app.kubernetes.io/component": "server"}


def render(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (folder / entry).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(documents: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        kinds.setdefault(document["kind"], []).append(document)
    return kinds


def test_every_manifest_is_valid(kubernetes_validate: Path) -> None:
    assert len(MANIFESTS) >= 7
    assert kubernetes_problems(kubernetes_validate, MANIFESTS) == []


def test_kustomizations_list_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_wires_deployment_service_autoscaler_and_budget(variant: str) -> None:
    kinds = by_kind(render(K8S / variant))
    assert sorted(kinds) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    (deployment,) = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= pod["metadata"]["labels"].items()
    for service in kinds["Service"]:
        assert service["spec"]["selector"] == LABELS
    (budget,) = kinds["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"] == LABELS
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > budget["spec"]["minAvailable"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_server_pod_probes_grpc_health_and_runs_unprivileged(variant: str) -> None:
    (deployment,) = by_kind(render(K8S / variant))["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    # readiness follows the models; liveness only the process (no restart loop for a bad model)
    assert container["startupProbe"]["grpc"].get("service", "") == ""
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["CONVSERVE_GRPC_PORT"] == str(ports["grpc"])
    assert env["CONVSERVE_METRICS_PORT"] == str(ports["metrics"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_gpu_variant_requests_a_gpu_and_cuda() -> None:
    (gpu,) = by_kind(render(K8S / "gpu"))["Deployment"]
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "CONVSERVE_PROVIDERS", "value": "cuda"} in container["env"]
    assert container["image"].startswith("convserve-server-gpu:")
    (cpu,) = by_kind(render(K8S / "cpu"))["Deployment"]
    (cpu_container,) = cpu["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two parsed manifests differ (lists of named items are matched by name)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            p
            for key in a.keys() | b.keys()
            for p in differences(a.get(key), b.get(key), f"{path}.{key}")
        ]
    if (
        isinstance(a, list)
        and isinstance(b, list)
        and all(isinstance(i, dict) and "name" in i for i in a + b)
    ):
        return differences({i["name"]: i for i in a}, {i["name"]: i for i in b}, path)
    return [] if a == b else [path]


def test_cpu_and_gpu_deployments_differ_only_where_they_must() -> None:
    cpu = yaml.safe_load((K8S / "cpu" / "deployment.yaml").read_text())
    gpu = yaml.safe_load((K8S / "gpu" / "deployment.yaml").read_text())
    container = ".spec.template.spec.containers.server"
    allowed = {
        ".spec.template.spec.tolerations",
        f"{container}.image",
        f"{container}.env.CONVSERVE_PROVIDERS.value",
        f"{container}.startupProbe.failureThreshold",
    }
    changed = {p for p in differences(cpu, gpu) if not p.startswith(f"{container}.resources")}
    assert changed == allowed


def test_autoscaler_metric_is_served_by_the_adapter_rules() -> None:
    (hpa,) = by_kind(render(K8S / "cpu"))["HorizontalPodAutoscaler"]
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    published = {rule["name"]["as"]: rule for rule in adapter_rules()}
    rule = published[pods["metric"]["name"]]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "convserve_requests_in_flight" in rule["seriesQuery"]
    assert pods["target"]["type"] == "AverageValue"


def test_a_broken_manifest_fails_the_check(kubernetes_validate: Path, tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    text = (K8S / "cpu" / "deployment.yaml").read_text()
    broken.write_text(text.replace("readinessProbe:", "readinessProbes:"))
    problems = kubernetes_problems(kubernetes_validate, [broken])
    assert len(problems) == 1 and "'readinessProbes' was unexpected" in problems[0]
    unknown = tmp_path / "cronjob.yaml"
    unknown.write_text("apiVersion: batch/v1beta1\nkind: CronJob\nmetadata: {name: x}\n")
    assert kubernetes_problems(kubernetes_validate, [unknown])[0].startswith("WARN")
