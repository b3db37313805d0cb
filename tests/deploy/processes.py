"""Real processes for the live deployment tests: the service, Prometheus and nginx on loopback.

Each class starts its process in `start()` and stops it in `stop()` (SIGTERM, then SIGKILL after
a bounded wait); fixtures call `stop()` in their teardown. The service reports its own ports
(--port-file); Prometheus and nginx cannot, so they get a free port found by binding port 0,
and a start that loses the port to another process is retried.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.deploy.tools import DEPLOY, REPO_ROOT

LOOPBACK = "127.0.0.1"
NGINX_TEMPLATE = DEPLOY / "nginx" / "templates" / "convserve-grpc.conf.template"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def http_get(url: str, timeout_s: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return str(response.read().decode())


def send_traffic(address: str, timeout_s: float = 60, **options: object) -> dict[str, Any]:
    """Runs tests/deploy/traffic.py against `address`; returns its JSON report.

    Options are its flags (`infer=20` is `--infer 20`).
    """
    argv = [sys.executable, "-m", "tests.deploy.traffic", "--address", address]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"traffic failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout))


class ManagedProcess:
    """A child process with its output in a log file, stopped for sure by `stop()`."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str | Path], env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(arg) for arg in argv],
                cwd=REPO_ROOT,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def fail(self, message: str) -> RuntimeError:
        return RuntimeError(f"{self.name}: {message}\n--- log tail ---\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL. Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


class ServiceProcess(ManagedProcess):
    """`python -m service` on loopback with OS-chosen ports, read back from its port file;
    `flags` are added to its command line (TLS files, a token file)."""

    def __init__(
        self, name: str, workdir: Path, repository: Path, flags: Sequence[str | Path] = ()
    ) -> None:
        super().__init__(name, workdir)
        self.repository = repository
        self.flags = tuple(flags)
        self.port_file = workdir / f"{name}.ports.json"
        self.grpc_port = 0
        self.metrics_port = 0

    def start(self) -> ServiceProcess:
        env = {
            **os.environ,
            "CONVSERVE_PROVIDERS": "cpu",
            "CONVSERVE_INTRA_OP_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self._spawn(
            [
                sys.executable, "-m", "service",
                "--model-repository", self.repository,
                "--host", LOOPBACK, "--grpc-port", "0", "--metrics-port", "0",
                "--port-file", self.port_file, *self.flags,
            ],
            env,
        )  # fmt: skip
        return self

    def wait_ready(self, timeout_s: float = 60) -> ServiceProcess:
        def ready() -> bool:
            if not self.running():
                raise self.fail(f"exited with status {self.process and self.process.returncode}")
            if not self.port_file.exists():
                return False
            try:
                ports = json.loads(self.port_file.read_text())
            except ValueError:
                return False  # written but not complete yet
            self.grpc_port, self.metrics_port = int(ports["grpc_port"]), int(ports["metrics_port"])
            return True

        wait_for(ready, timeout_s, f"{self.name} to write {self.port_file.name}")
        return self

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"


class PrometheusProcess(ManagedProcess):
    """A throw-away Prometheus: temp storage, 1s scrapes of the given targets, given rules."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        super().__init__("prometheus", workdir)
        self.binary = binary
        self.port = 0

    def start(self, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> PrometheusProcess:
        every_second = {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        }
        job = {"job_name": "convserve", "static_configs": [{"targets": list(targets)}]}
        config = {
            "global": every_second,
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [job],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        for _attempt in range(3):
            self.port = free_port()
            self._spawn(
                [
                    self.binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{self.port}",
                    "--log.level=warn",
                ]
            )
            try:
                wait_for(self._ready, 30, "prometheus /-/ready", poll_s=0.2)
                return self
            except (TimeoutError, RuntimeError):
                self.stop()
        raise self.fail("did not become ready")

    def _ready(self) -> bool:
        if not self.running():
            raise self.fail("exited")
        try:
            http_get(f"{self.url}/-/ready", timeout_s=1)
            return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


_TEMPLATE_VARIABLE = re.compile(r"\$\{(CONVSERVE_[A-Z_]+)\}")


def render_nginx_template(template: str, backends: Sequence[str], listen: str) -> str:
    """Renders the shipped template as the nginx image's envsubst would, one line per backend.

    Only ${CONVSERVE_*} is substituted (nginx's own $variables stay); the line that names
    ${CONVSERVE_BACKEND} is repeated for each backend, which is what Docker's DNS does for the
    replicas of `server`.
    """
    lines = []
    for line in template.splitlines():
        if "${CONVSERVE_BACKEND}" in line:
            lines += [line.replace("${CONVSERVE_BACKEND}", backend) for backend in backends]
        else:
            lines.append(line)
    rendered = "\n".join(lines).replace("${CONVSERVE_LB_PORT}", listen) + "\n"
    leftover = _TEMPLATE_VARIABLE.findall(rendered)
    if leftover:
        raise KeyError(f"template variables without a value: {leftover}")
    return rendered


class NginxProcess(ManagedProcess):
    """nginx in the foreground with every path (pid, logs, temp) inside the work directory."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        super().__init__("nginx", workdir)
        self.binary = binary
        self.port = 0

    def config(self, site: str) -> str:
        paths = {k: self.workdir / k for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in paths.values():
            path.mkdir(exist_ok=True)
        # As root, the workers would otherwise drop to `nobody`, who cannot enter pytest's tmp.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return (
            f"{user}worker_processes 1;\npid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.workdir / 'error.log'} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"  access_log {self.workdir / 'access.log'};\n"
            f"  client_body_temp_path {paths['client_body']};\n"
            f"  proxy_temp_path {paths['proxy']};\n  fastcgi_temp_path {paths['fastcgi']};\n"
            f"  uwsgi_temp_path {paths['uwsgi']};\n  scgi_temp_path {paths['scgi']};\n"
            f"{site}}}\n"
        )

    def check(self, site: str) -> tuple[int, str]:
        """`nginx -t` on a site config: (exit status, output)."""
        conf = self.workdir / "nginx-check.conf"
        conf.write_text(self.config(site))
        argv = [self.binary, "-t", "-p", self.workdir, "-e", self.workdir / "error.log", "-c", conf]
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout + done.stderr

    def start(self, backends: Sequence[str], template: str | None = None) -> NginxProcess:
        """Starts nginx on the shipped template (or `template`) with these backends."""
        template = NGINX_TEMPLATE.read_text() if template is None else template
        for _attempt in range(3):
            self.port = free_port()
            conf = self.workdir / "nginx.conf"
            conf.write_text(
                self.config(render_nginx_template(template, backends, f"{LOOPBACK}:{self.port}"))
            )
            self._spawn(
                [
                    self.binary, "-p", self.workdir, "-e", self.workdir / "error.log",
                    "-c", conf, "-g", "daemon off;",
                ]
            )  # fmt: skip
            try:
                wait_for(self._listening, 10, "nginx to listen")
                return self
            except (TimeoutError, RuntimeError):
                self.stop()
        raise self.fail("did not start")

    def _listening(self) -> bool:
        if not self.running():
            raise self.fail(f"exited\n{(self.workdir / 'error.log').read_text(errors='replace')}")
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"
