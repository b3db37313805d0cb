"""The server's settings: one typed object, read from `CONVSERVE_*` variables and CLI flags.

Every field has an environment variable (`CONVSERVE_` + the field name in upper case) and a
CLI flag (`--` + the field name with dashes); the flag wins over the variable, which wins over
the default. `python -m service --help` lists them all with their help text (the `help`
metadata below is each field's docstring).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engine.images import DEFAULT_IMAGE_FORMATS, readable_formats
from service.errors import ConfigurationError
from service.repository.policy import CONTROL_MODES, Batching, VersionPolicy

ENV_PREFIX = "CONVSERVE_"
# CONVSERVE_* variables that are not server settings, so the server lets them be: the client's
# default address and bearer token, and docker-compose / nginx interpolation (published ports,
# the balancer, the folder of the TLS variant's secrets).
OTHER_CONVSERVE_VARIABLES = frozenset(
    {
        "CONVSERVE_ADDRESS", "CONVSERVE_TOKEN", "CONVSERVE_BIND_ADDRESS", "CONVSERVE_BACKEND",
        "CONVSERVE_LB_PORT", "CONVSERVE_SECRETS_DIR",
    }
)  # fmt: skip
PROVIDERS = ("auto", "cuda", "cpu")
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVENT_LOOPS = ("uvloop", "asyncio")
SPINNING = ("auto", "on", "off")


def _doc(help: str, **extra: Any) -> dict[str, Any]:
    """A field's docstring (its CLI help), plus the flag name or choices where they differ."""
    return {"help": help, **extra}


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; built once in `main()` and injected."""

    model_repository: Path = field(
        default=Path("model_repository"),
        metadata=_doc("model repository directory (<model>/<version>/model.onnx)"),
    )
    host: str = field(
        default="0.0.0.0",
        metadata=_doc("address the gRPC server listens on (and metrics, unless --metrics-host)"),
    )
    grpc_port: int = field(
        default=8001, metadata=_doc("gRPC port (KServe V2, Classify, health, reflection); 0 = any")
    )
    metrics_port: int = field(
        default=8002, metadata=_doc("Prometheus /metrics HTTP port; 0 = any free port")
    )
    metrics_host: str = field(
        default="",
        metadata=_doc(
            "address the metrics HTTP server listens on (plaintext, unauthenticated: keep it on "
            "a private interface, docs/security.md)",
            default_text="the same as --host",
        ),
    )
    health_port: int | None = field(
        default=None,
        metadata=_doc(
            "an extra plaintext port serving only grpc.health.v1, for probes that cannot speak "
            "TLS (docs/security.md); 0 = any free port",
            default_text="none",
        ),
    )
    health_host: str = field(
        default="127.0.0.1", metadata=_doc("address the --health-port listens on")
    )
    reflection: bool = field(
        default=True, metadata=_doc("serve gRPC server reflection (grpcurl without .proto files)")
    )
    tls_cert_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM certificate chain of the gRPC port: TLS on (with --tls-key-file); read at start",
            default_text="none: plaintext",
        ),
    )
    tls_key_file: Path | None = field(
        default=None,
        metadata=_doc("PEM private key of --tls-cert-file", default_text="none"),
    )
    tls_client_ca_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM CA certificates clients must present a certificate of: mutual TLS (needs "
            "--tls-cert-file)",
            default_text="none: no client certificate asked for",
        ),
    )
    token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "file of accepted bearer tokens, one a line: every call but health must send "
            "`authorization: Bearer <token>`; read at start",
            default_text="none: no token needed",
        ),
    )
    auth_health: bool = field(
        default=False,
        metadata=_doc("require the bearer token for grpc.health.v1 too (probes must send it)"),
    )
    port_file: Path | None = field(
        default=None,
        metadata=_doc('once ready, write {"grpc_port": N, "metrics_port": M} as JSON to this file'),
    )
    default_model: str = field(
        default="",
        metadata=_doc(
            "model used when a request names none (default: the only model, if there is one)"
        ),
    )
    model_versions: dict[str, int] = field(
        default_factory=dict,
        metadata=_doc(
            "pin a model to one version (its version policy becomes `specific VERSION`; a "
            "config.json policy still wins): NAME=VERSION (flag repeatable; the variable takes "
            "a comma-separated list)",
            flag="--model-version",
        ),
    )
    model_control_mode: str = field(
        default="poll",
        metadata=_doc(
            "how models come and go (Triton's modes): none = load at start only; poll = rescan "
            "the repository every --repository-poll-s and load/unload versions; explicit = "
            "only through RepositoryModelLoad/Unload (and --load-model at start)",
            choices=CONTROL_MODES,
        ),
    )
    repository_poll_s: float = field(
        default=5.0,
        metadata=_doc("seconds between two scans of the repository (model control mode poll)"),
    )
    version_policy: str = field(
        default="latest 1",
        metadata=_doc(
            "versions served per model: `latest N`, `all` or `specific V,V` (Triton's "
            "version_policy; a model's config.json may override it)"
        ),
    )
    load_models: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "models loaded at start in model control mode explicit; `*` = all (flag "
            "repeatable; the variable takes a comma-separated list)",
            flag="--load-model",
            default_text="none",
        ),
    )
    strict_readiness: bool = field(
        default=True,
        metadata=_doc("ready only when every model loaded; off: ready when at least one did"),
    )
    providers: str = field(
        default="auto",
        metadata=_doc(
            "ONNX Runtime providers: auto (CUDA if built in and a GPU is present), cuda, cpu",
            choices=PROVIDERS,
        ),
    )
    intra_op_threads: int = field(
        default=0, metadata=_doc("ONNX Runtime intra-op threads per model; 0 = one a core")
    )
    inter_op_threads: int = field(
        default=0, metadata=_doc("ONNX Runtime inter-op threads per model; 0 = default")
    )
    intra_op_spinning: str = field(
        default="auto",
        metadata=_doc(
            "let idle ONNX Runtime threads spin-wait for the next piece of work: on, off, or "
            "auto (on for a model on the CPU whose batch of one takes at least 0.5 ms, where "
            "the run outweighs the path around it; off for cheaper models, whose spinning "
            "threads would take the cores the gRPC work needs)",
            choices=SPINNING,
        ),
    )
    graph_optimization_level: str = field(
        default="all",
        metadata=_doc("ONNX Runtime graph optimisations", choices=GRAPH_OPTIMIZATION_LEVELS),
    )
    max_batch_size: int = field(
        default=32, metadata=_doc("most items (images) one batch may hold; 1 = no batching")
    )
    max_queue_delay_us: int = field(
        default=2000,
        metadata=_doc(
            "longest a request waits for a fuller batch while another batch computes and a "
            "slot is free, in µs (no effect with max_concurrent_batches 1)"
        ),
    )
    max_concurrent_batches: int = field(
        default=0,
        metadata=_doc(
            "batches one model may compute at the same time (runtime executor threads); 0 = "
            "auto: on the CPU two that share the cores out, a batch computed alone (no full "
            "batch waiting) on every core; on CUDA one"
        ),
    )
    inline_run_max_us: int = field(
        default=1000,
        metadata=_doc(
            "a batch whose measured run time is at most this, in µs, runs on the event loop "
            "itself when no other batch computes (no hand-off to the runtime's thread); "
            "0 = never"
        ),
    )
    queue_capacity: int = field(
        default=512,
        metadata=_doc("most items waiting per model; beyond it requests get RESOURCE_EXHAUSTED"),
    )
    grace_period_s: float = field(
        default=15.0,
        metadata=_doc("on SIGTERM/SIGINT, how long accepted requests get to finish, in seconds"),
    )
    max_message_bytes: int = field(
        default=64 * 2**20, metadata=_doc("largest gRPC message received or sent")
    )
    max_image_bytes: int = field(
        default=16 * 2**20, metadata=_doc("largest encoded image accepted by Classify")
    )
    max_image_pixels: int = field(
        default=4096 * 4096,
        metadata=_doc(
            "largest decoded image (width x height) accepted, checked before decoding: bounds "
            "one image's decode time and memory (docs/service.md)"
        ),
    )
    image_formats: tuple[str, ...] = field(
        default=DEFAULT_IMAGE_FORMATS,
        metadata=_doc(
            "image formats Classify decodes, comma-separated Pillow format names; others are "
            "refused unread"
        ),
    )
    max_top_k: int = field(
        default=100, metadata=_doc("largest top_k (Classify) or classification count accepted")
    )
    max_explain_positions: int = field(
        default=1024,
        metadata=_doc(
            "most patch positions one Explain call may ask for (each is one image through the "
            "model); more is refused with INVALID_ARGUMENT"
        ),
    )
    decode_threads: int = field(
        default=2, metadata=_doc("threads decoding and resizing images for Classify")
    )
    call_takers: int = field(
        default=64,
        metadata=_doc(
            "requests for the next call the server keeps outstanding in gRPC core for ModelInfer "
            "and Classify each, beside grpc.aio's own one (calls are taken up in bursts; "
            "docs/reliability.md); 0 = grpc.aio's one only"
        ),
    )
    event_loop: str = field(
        default="uvloop",
        metadata=_doc(
            "the server's event loop: uvloop (less CPU a request, docs/benchmark.md) or "
            "asyncio's own",
            choices=EVENT_LOOPS,
        ),
    )
    log_level: str = field(default="INFO", metadata=_doc("logging level", choices=LOG_LEVELS))

    def __post_init__(self) -> None:
        for name in ("grpc_port", "metrics_port", "health_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigurationError(f"{name} must be in 0..65535, got {port}")
        _check_security(self)
        positive = (
            "max_batch_size", "queue_capacity", "max_message_bytes",
            "max_image_bytes", "max_image_pixels", "max_top_k", "decode_threads",
            "max_explain_positions",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "max_concurrent_batches",
            "intra_op_threads",
            "inter_op_threads",
            "max_queue_delay_us",
            "inline_run_max_us",
            "call_takers",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.grace_period_s < 0:
            raise ConfigurationError(f"grace_period_s must be 0 or more, got {self.grace_period_s}")
        if not self.repository_poll_s > 0:
            raise ConfigurationError(
                f"repository_poll_s must be more than 0, got {self.repository_poll_s}"
            )
        try:
            VersionPolicy.parse(self.version_policy)
        except ValueError as error:
            raise ConfigurationError(f"version_policy: {error}") from None
        _check_image_formats(self.image_formats)
        for item in fields():
            choices = item.metadata.get("choices")
            if choices and getattr(self, item.name) not in choices:
                raise ConfigurationError(
                    f"unknown {item.name} {getattr(self, item.name)!r}; "
                    f"choose one of: {', '.join(choices)}"
                )

    @property
    def max_queue_delay_s(self) -> float:
        """max_queue_delay_us in seconds, the unit the batcher's clock uses."""
        return self.max_queue_delay_us / 1e6

    @property
    def policy(self) -> VersionPolicy:
        """The server's version policy, parsed."""
        return VersionPolicy.parse(self.version_policy)

    @property
    def batching(self) -> Batching:
        """The server's batching settings (a model's config.json may override them)."""
        return Batching(
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            queue_capacity=self.queue_capacity,
            max_concurrent_batches=self.max_concurrent_batches,
            inline_run_max_us=self.inline_run_max_us,
        )

    @property
    def metrics_bind_host(self) -> str:
        """The metrics server's address: metrics_host, else host."""
        return self.metrics_host or self.host

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return self.tls_cert_file is not None


def _check_security(settings: Settings) -> None:
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if (cert is None) != (key is None):
        given, missing = "tls_cert_file", "tls_key_file"
        if cert is None:
            given, missing = missing, given
        raise ConfigurationError(
            f"{given} is set but {missing} is not; TLS needs both (or neither: plaintext)"
        )
    if settings.tls_client_ca_file is not None and cert is None:
        raise ConfigurationError(
            "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file: the server "
            "must speak TLS before it can ask for a client certificate"
        )
    if settings.auth_health and settings.token_file is None:
        raise ConfigurationError("auth_health needs token_file: no token is configured")


def _check_image_formats(formats: Sequence[str]) -> None:
    if not formats:
        raise ConfigurationError("image_formats must name at least one format, e.g. PNG")
    readable = readable_formats()
    unknown = [name for name in formats if name.upper() not in readable]
    if unknown:
        raise ConfigurationError(
            f"unknown image_formats {', '.join(map(repr, unknown))}; this Pillow reads: "
            f"{', '.join(readable)}"
        )


def parse_image_formats(text: str) -> tuple[str, ...]:
    """`png, JPEG` -> ("PNG", "JPEG"): Pillow's format names are upper case."""
    return tuple(name.strip().upper() for name in text.split(",") if name.strip())


def fields() -> tuple[dataclasses.Field[Any], ...]:
    """The settings' fields, in declaration order."""
    return dataclasses.fields(Settings)


def env_name(name: str) -> str:
    """The environment variable of a field, e.g. CONVSERVE_MODEL_REPOSITORY."""
    return ENV_PREFIX + name.upper()


def flag_name(item: dataclasses.Field[Any]) -> str:
    """The CLI flag of a field, e.g. --model-repository."""
    return str(item.metadata.get("flag", "--" + item.name.replace("_", "-")))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}; use one of: true, false, 1, 0, yes, no, on, off")


def parse_model_version(text: str) -> tuple[str, int]:
    """Parses one pin, `NAME=VERSION`."""
    name, sep, version = text.partition("=")
    if not sep or not name or not version.isascii() or not version.isdigit() or int(version) < 1:
        raise ValueError(f"bad model version pin {text!r}; expected NAME=VERSION, e.g. mnist_cnn=2")
    return name, int(version)


def _converter(item: dataclasses.Field[Any]) -> Callable[[str], Any]:
    hint = typing.get_type_hints(Settings)[item.name]
    if hint is bool:
        return _parse_bool
    if hint in (int, float, str, Path):
        return typing.cast(Callable[[str], Any], hint)
    if hint == (Path | None):
        return lambda text: Path(text) if text else None
    if hint == (int | None):
        return lambda text: int(text) if text.strip() else None
    if item.name == "model_versions":
        return lambda text: dict(parse_model_version(p) for p in text.split(",") if p.strip())
    if item.name == "image_formats":
        return parse_image_formats
    if item.name == "load_models":
        return lambda text: tuple(name.strip() for name in text.split(",") if name.strip())
    raise TypeError(f"no converter for setting {item.name}: {hint}")


def _default_text(value: Any) -> str:
    """A default as it would be typed: tuples comma-separated, like their variable."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _default_of(item: dataclasses.Field[Any]) -> str:
    """The default as the help shows it: the field's own words where it has them."""
    if "default_text" in item.metadata:
        return str(item.metadata["default_text"])
    return _default_text(item.default)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Adds one flag per field. Defaults are suppressed so only given flags override."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m service",
        description="convserve inference server (KServe V2 gRPC + Classify, dynamic batching).",
        allow_abbrev=False,  # `--port 8001` is an error, not a port file named 8001
    )
    for item in fields():
        help_text = f"{item.metadata['help']} [env {env_name(item.name)}]"
        names = [flag_name(item)]
        if item.name == "model_versions":
            parser.add_argument(
                *names, dest=item.name, action="append", type=parse_model_version,
                metavar="NAME=VERSION", default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        elif item.name == "load_models":
            parser.add_argument(
                *names, dest=item.name, action="append", metavar="NAME",
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        elif typing.get_type_hints(Settings)[item.name] is bool:
            parser.add_argument(
                *names, dest=item.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                *names, dest=item.name, type=_converter(item), default=argparse.SUPPRESS,
                choices=item.metadata.get("choices"),
                help=f"{help_text} (default: {_default_of(item)})",
            )  # fmt: skip
    return parser


def check_no_unknown_variables(environ: Mapping[str, str]) -> None:
    """Raises ConfigurationError on a CONVSERVE_* variable that is no setting (a typo such as
    CONVSERVE_PROVIDER would otherwise be ignored silently), naming the closest valid one."""
    known = {env_name(item.name) for item in fields()}
    unknown = sorted(
        name for name in environ
        if name.startswith(ENV_PREFIX) and name not in known | OTHER_CONVSERVE_VARIABLES
    )  # fmt: skip
    if not unknown:
        return
    names = [item.name for item in fields()]
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX).lower(), names, n=1)
        hint = f"did you mean {env_name(close[0])}?" if close else "no setting is close"
        problems.append(f"{name} ({hint})")
    raise ConfigurationError(
        f"unknown environment variable {'; '.join(problems)}; a setting's variable is "
        f"{ENV_PREFIX}<FIELD> (docs/service.md)"
    )


def settings_from(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Builds the settings: defaults, then CONVSERVE_* variables, then flags, then overrides."""
    environ = os.environ if environ is None else environ
    check_no_unknown_variables(environ)
    values: dict[str, Any] = {}
    for item in fields():
        raw = environ.get(env_name(item.name))
        if raw is not None:
            try:
                values[item.name] = _converter(item)(raw)
            except ValueError as error:
                raise ConfigurationError(f"{env_name(item.name)}: {error}") from None
    if argv is not None:
        parsed = vars(build_parser().parse_args(argv))
        if "model_versions" in parsed:
            parsed["model_versions"] = dict(parsed["model_versions"])
        if "load_models" in parsed:
            parsed["load_models"] = tuple(parsed["load_models"])
        values.update(parsed)
    values.update(overrides)
    return Settings(**values)
