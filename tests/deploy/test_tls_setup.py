"""The TLS set-up of the deployment files (docs/security.md): the compose TLS variants, the
Kubernetes TLS overlay, and the nginx TLS template, live with mutual-TLS backends and tokens.

The overlay's patches are JSON patches (RFC 6902), applied here as kustomize would, so that the
patched Deployment is validated and its probes, ports, variables and mounts checked together.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from tests.certificates import Pki, make_pki
from tests.deploy.checks import compose_config, compose_policy, kubernetes_problems
from tests.deploy.processes import NGINX_TEMPLATE, NginxProcess, ServiceProcess, http_get
from tests.deploy.test_k8s import K8S, by_kind, render
from tests.deploy.tools import DEPLOY, REPO_ROOT

BASE = REPO_ROOT / "docker-compose.yml"
TLS = REPO_ROOT / "docker-compose.tls.yml"
SCALE = REPO_ROOT / "docker-compose.scale.yml"
SCALE_TLS = REPO_ROOT / "docker-compose.scale-tls.yml"
GPU = REPO_ROOT / "docker-compose.gpu.yml"
NGINX_TLS_TEMPLATE = DEPLOY / "nginx" / "templates" / "convserve-grpcs.conf.template"
SECRET_PATH = re.compile(r"/run/secrets/([\w-]+)")
TOKEN = "balanced-token-0123456789abcdef"
CALLS = 8


def config(compose: Path, *files: Path) -> dict[str, Any]:
    model, problems = compose_config(compose, files)
    assert problems == []
    assert model is not None
    return model


# --- docker compose ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files", [[BASE, TLS], [BASE, GPU, TLS], [BASE, SCALE, TLS, SCALE_TLS]], ids=str
)
def test_tls_variants_are_valid_and_pinned(compose: Path, files: list[Path]) -> None:
    assert compose_policy(config(compose, *files)) == []


def test_tls_server_reads_every_file_from_a_mounted_secret(compose: Path) -> None:
    model = config(compose, BASE, TLS)
    server = model["services"]["server"]
    environment = server["environment"]
    mounted = {secret["source"] for secret in server["secrets"]}
    for variable in (
        "CONVSERVE_TLS_CERT_FILE", "CONVSERVE_TLS_KEY_FILE", "CONVSERVE_TLS_CLIENT_CA_FILE",
        "CONVSERVE_TOKEN_FILE",
    ):  # fmt: skip
        (name,) = SECRET_PATH.fullmatch(environment[variable]).groups()  # type: ignore[union-attr]
        assert name in mounted, variable
        assert Path(model["secrets"][name]["file"]).parent == REPO_ROOT / "secrets"
    # The image's plaintext HEALTHCHECK would hit the TLS port: it moves to the health port,
    # which stays on the container's loopback and is not published.
    check = server["healthcheck"]["test"]
    assert check[1:5] == ["python", "-m", "service.tools.client", "health"]
    port = environment["CONVSERVE_HEALTH_PORT"]
    assert check[check.index("--address") + 1] == f"127.0.0.1:{port}"
    assert environment["CONVSERVE_HEALTH_HOST"] == "127.0.0.1"
    assert int(port) not in {p["target"] for p in server["ports"]}
    # Prometheus scrapes from its own container, TLS or not
    assert environment["CONVSERVE_METRICS_HOST"] == "0.0.0.0"
    assert config(compose, BASE)["services"]["server"]["environment"]["CONVSERVE_METRICS_HOST"] == (
        "0.0.0.0"
    )


def test_tls_secrets_come_from_the_chosen_folder(compose: Path, tmp_path: Path) -> None:
    model, problems = compose_config(compose, [BASE, TLS], {"CONVSERVE_SECRETS_DIR": str(tmp_path)})
    assert problems == [] and model is not None
    assert {Path(secret["file"]).parent for secret in model["secrets"].values()} == {tmp_path}


def test_tls_balancer_runs_the_tls_template_with_its_secrets(compose: Path) -> None:
    model = config(compose, BASE, SCALE, TLS, SCALE_TLS)
    lb = model["services"]["lb"]
    (template,) = lb["volumes"]
    assert Path(template["source"]) == NGINX_TLS_TEMPLATE
    assert template["target"] == "/etc/nginx/templates/default.conf.template"
    needed = set(SECRET_PATH.findall(NGINX_TLS_TEMPLATE.read_text()))
    assert needed == {secret["source"] for secret in lb["secrets"]}
    assert needed <= model["secrets"].keys()
    assert lb["environment"]["CONVSERVE_BACKEND"] == "server:8001"


def location(template: str) -> list[str]:
    """The `grpc_next_upstream*` and timeout lines of the template's location block."""
    return [
        line.strip()
        for line in template.splitlines()
        if re.match(r"\s*grpc_(next_upstream|connect_timeout|read_timeout|send_timeout)", line)
    ]


def test_the_tls_template_retries_and_times_out_as_the_plaintext_one() -> None:
    plain, tls = location(NGINX_TEMPLATE.read_text()), location(NGINX_TLS_TEMPLATE.read_text())
    assert len(plain) == 6 and tls == plain


# --- Kubernetes -------------------------------------------------------------------------------


def _pointer(document: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    parent = document
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        return parent, len(parent) if last == "-" else int(last)
    return parent, last


def json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / replace / remove, as kustomize applies them (a missing path fails)."""
    patched = copy.deepcopy(document)
    for operation in operations:
        parent, key = _pointer(patched, operation["path"])
        if operation["op"] == "add" and isinstance(parent, list):
            parent.insert(key, operation["value"])  # type: ignore[arg-type]
        elif operation["op"] in ("add", "replace"):
            if operation["op"] == "replace" and isinstance(parent, dict) and key not in parent:
                raise KeyError(f"replace: {operation['path']} does not exist")
            parent[key] = operation["value"]
        elif operation["op"] == "remove":
            del parent[key]
        else:
            raise ValueError(f"unsupported op {operation['op']}")
    return patched


def render_tls_overlay() -> list[dict[str, Any]]:
    folder = K8S / "tls"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents = render(folder)
    for patch in kustomization["patches"]:
        target = patch["target"]
        matched = [
            i
            for i, doc in enumerate(documents)
            if (doc["kind"], doc["metadata"]["name"]) == (target["kind"], target["name"])
        ]
        assert len(matched) == 1, target
        documents[matched[0]] = json_patch(documents[matched[0]], yaml.safe_load(patch["patch"]))
    return documents


def test_the_tls_overlay_is_valid(kubernetes_validate: Path, tmp_path: Path) -> None:
    files = []
    for number, document in enumerate(render_tls_overlay()):
        path = tmp_path / f"{number}-{document['kind']}.yaml"
        path.write_text(yaml.safe_dump(document))
        files.append(path)
    assert kubernetes_problems(kubernetes_validate, files) == []


def test_the_tls_overlay_probes_the_plaintext_health_port() -> None:
    kinds = by_kind(render_tls_overlay())
    (deployment,) = kinds["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "server"
    env = {item["name"]: item["value"] for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002, "health": int(env["CONVSERVE_HEALTH_PORT"])}
    # kubelet probes from the node, to the pod's IP: the health port listens on every interface
    assert env["CONVSERVE_HEALTH_HOST"] == env["CONVSERVE_METRICS_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    # no Service publishes the health port; the gRPC port is TLS now, not h2c
    for service in kinds["Service"]:
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= {"grpc", "metrics"}
        grpc_port = next(port for port in service["spec"]["ports"] if port["name"] == "grpc")
        assert "appProtocol" not in grpc_port


def test_the_tls_overlay_reads_every_file_from_a_mounted_secret() -> None:
    (deployment,) = by_kind(render_tls_overlay())["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "secrets"]
    projected = {
        f"{mount['mountPath']}/{item['path']}": (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    files = {
        variable: env[variable]
        for variable in (
            "CONVSERVE_TLS_CERT_FILE", "CONVSERVE_TLS_KEY_FILE", "CONVSERVE_TLS_CLIENT_CA_FILE",
            "CONVSERVE_TOKEN_FILE",
        )
    }  # fmt: skip
    assert set(files.values()) == projected.keys()
    assert projected[env["CONVSERVE_TLS_KEY_FILE"]] == ("convserve-tls", "tls.key")
    # readable by the server's group (fsGroup), by nobody else
    assert volume["projected"]["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


def test_the_base_deployments_bind_metrics_for_prometheus() -> None:
    for variant in ("cpu", "gpu"):
        (deployment,) = by_kind(render(K8S / variant))["Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["CONVSERVE_METRICS_HOST"] == "0.0.0.0", variant


# --- nginx, live ----------------------------------------------------------------------------------


def tls_site(template: str, pki: Pki) -> str:
    """The template with the compose secrets' paths replaced by the test's files."""
    files = {
        "convserve-ca": pki.ca,
        "convserve-server-cert": pki.server_cert,
        "convserve-server-key": pki.server_key,
        "convserve-client-ca": pki.client_ca,
        "convserve-lb-client-cert": pki.client_cert,
        "convserve-lb-client-key": pki.client_key,
    }
    return SECRET_PATH.sub(lambda match: str(files[match.group(1)]), template)


def test_the_tls_template_is_a_valid_nginx_config(nginx_bin: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    site = tls_site(NGINX_TLS_TEMPLATE.read_text(), pki)
    site = site.replace("${CONVSERVE_BACKEND}", "127.0.0.1:1")
    site = site.replace("${CONVSERVE_LB_PORT}", "127.0.0.1:3")
    status, output = NginxProcess(nginx_bin, tmp_path).check(site)
    assert status == 0, output
    assert "listen 127.0.0.1:3 ssl http2;" in site
    assert "grpc_pass grpcs://convserve_grpc;" in site


@dataclass
class TlsBalanced:
    backends: list[ServiceProcess]
    nginx: NginxProcess
    pki: Pki


@pytest.fixture(scope="module")
def tls_balanced(
    service_available: None,
    nginx_bin: Path,
    tiny_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TlsBalanced]:
    workdir = tmp_path_factory.mktemp("tls-balancer")
    pki = make_pki(workdir / "pki")
    (workdir / "tokens").write_text(TOKEN + "\n")
    flags = [
        "--tls-cert-file", pki.server_cert, "--tls-key-file", pki.server_key,
        "--tls-client-ca-file", pki.client_ca, "--token-file", workdir / "tokens",
    ]  # fmt: skip
    backends = [ServiceProcess(f"backend-{n}", workdir, tiny_repository, flags) for n in "ab"]
    nginx = NginxProcess(nginx_bin, workdir)
    try:
        for backend in backends:
            backend.start()
        for backend in backends:
            backend.wait_ready()
        template = tls_site(NGINX_TLS_TEMPLATE.read_text(), pki)
        nginx.start([b.grpc_address for b in backends], template=template)
        yield TlsBalanced(backends, nginx, pki)
    finally:
        nginx.stop()
        for backend in backends:
            backend.stop()


def stub(balanced: TlsBalanced, certificate: bool = True) -> pb2_grpc.GRPCInferenceServiceStub:
    pki = balanced.pki
    key, chain = (pki.client_key, pki.client_cert) if certificate else (None, None)
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(),
        key.read_bytes() if key else None,
        chain.read_bytes() if chain else None,
    )
    channel = grpc.secure_channel(balanced.nginx.address, credentials)
    return pb2_grpc.GRPCInferenceServiceStub(channel)


def answered_ok(backend: ServiceProcess) -> float:
    """The backend's ModelInfer calls answered OK, from its own /metrics."""
    pattern = r'^convserve_requests_total\{[^}]*code="OK"[^}]*rpc="ModelInfer"[^}]*\} (\S+)$'
    values = re.findall(pattern, http_get(backend.metrics_url), flags=re.MULTILINE)
    return sum(float(value) for value in values)


def infer_request() -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(bytes(28 * 28))
    return request


def test_calls_pass_nginx_over_mutual_tls_with_the_token(tls_balanced: TlsBalanced) -> None:
    client = stub(tls_balanced)
    metadata = [("authorization", f"Bearer {TOKEN}")]
    before = [answered_ok(backend) for backend in tls_balanced.backends]
    for _ in range(CALLS):
        assert client.ModelInfer(infer_request(), metadata=metadata, timeout=10).model_name
    served = [answered_ok(b) - n for b, n in zip(tls_balanced.backends, before, strict=True)]
    assert sum(served) == CALLS and min(served) > 0, served  # both replicas, over mTLS
    with pytest.raises(grpc.RpcError) as caught:
        client.ModelInfer(infer_request(), timeout=10)
    # the backend's answer, through nginx: the token is checked by the servers
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "missing or invalid bearer token in the authorization metadata"


def test_nginx_refuses_a_client_without_a_certificate(tls_balanced: TlsBalanced) -> None:
    before = [answered_ok(backend) for backend in tls_balanced.backends]
    with pytest.raises(grpc.RpcError) as caught:
        stub(tls_balanced, certificate=False).ModelInfer(
            infer_request(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10
        )
    # nginx completes the handshake, then answers HTTP 400 ("No required SSL certificate was
    # sent"), which gRPC reports as INTERNAL; no backend saw the call
    assert caught.value.code() == grpc.StatusCode.INTERNAL, caught.value
    assert "status: 400" in str(caught.value.details())
    assert [answered_ok(backend) for backend in tls_balanced.backends] == before
