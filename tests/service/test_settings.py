"""service.settings: one typed object from CONVSERVE_* variables and mirrored CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import ConfigurationError
from service.server import main
from service.settings import Settings, build_parser, env_name, fields, flag_name, settings_from


def test_every_field_has_help_an_env_variable_and_a_flag() -> None:
    help_text = build_parser().format_help()
    for item in fields():
        assert item.metadata.get("help"), f"{item.name} has no docstring"
        assert env_name(item.name).startswith("CONVSERVE_")
        assert flag_name(item) in help_text
        assert env_name(item.name) in help_text


def test_defaults_match_the_documented_ports() -> None:
    settings = settings_from([], environ={})
    assert (settings.host, settings.grpc_port, settings.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert settings.providers == "auto"


def test_flags_win_over_variables_which_win_over_defaults() -> None:
    environ = {
        "CONVSERVE_MODEL_REPOSITORY": "/models",
        "CONVSERVE_MAX_BATCH_SIZE": "16",
        "CONVSERVE_STRICT_READINESS": "false",
        "CONVSERVE_MODEL_VERSIONS": "a=2,b=3",
    }
    settings = settings_from(["--max-batch-size", "4", "--model-version", "c=1"], environ)
    assert settings.model_repository == Path("/models")
    assert settings.max_batch_size == 4
    assert settings.strict_readiness is False
    assert settings.model_versions == {"c": 1}
    assert settings_from([], environ).model_versions == {"a": 2, "b": 3}


def test_image_limits_default_to_4096_squared_and_six_formats() -> None:
    settings = settings_from([], environ={})
    assert settings.max_image_pixels == 16_777_216 == 4096 * 4096
    assert settings.image_formats == ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def test_image_formats_are_a_comma_separated_list_in_any_case() -> None:
    environ = {"CONVSERVE_IMAGE_FORMATS": "png, Jpeg"}
    assert settings_from([], environ).image_formats == ("PNG", "JPEG")
    assert settings_from(["--image-formats", "gif"], environ).image_formats == ("GIF",)


def test_port_file_and_queue_delay_units() -> None:
    settings = settings_from(
        ["--port-file", "/tmp/p.json", "--max-queue-delay-us", "1500"], environ={}
    )
    assert settings.port_file == Path("/tmp/p.json")
    assert settings.max_queue_delay_s == pytest.approx(0.0015)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--providers", "tpu"], {}, None),
        (["--port", "8001"], {}, None),  # no abbreviations: --port is not --port-file
        ([], {"CONVSERVE_PROVIDERS": "tpu"}, "unknown providers 'tpu'; choose one of: auto, cuda"),
        ([], {"CONVSERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size must be at least 1"),
        ([], {"CONVSERVE_GRPC_PORT": "70000"}, "grpc_port must be in 0..65535"),
        ([], {"CONVSERVE_STRICT_READINESS": "maybe"}, "not a boolean"),
        ([], {"CONVSERVE_MODEL_VERSIONS": "mnist"}, "expected NAME=VERSION"),
        ([], {"CONVSERVE_MODEL_VERSIONS": "mnist=²"}, "expected NAME=VERSION"),
        (
            [],
            {"CONVSERVE_IMAGE_FORMATS": "png,jpg"},
            r"^unknown image_formats 'JPG'; this Pillow reads: AVIF, BLP, BMP, .*EPS.*, JPEG,",
        ),
        ([], {"CONVSERVE_IMAGE_FORMATS": " , "}, "image_formats must name at least one format"),
    ],
)
def test_bad_values_fail_fast_naming_the_allowed_ones(
    argv: list[str], environ: dict[str, str], message: str | None
) -> None:
    if message is None:  # argparse reports bad choices itself, and exits
        with pytest.raises(SystemExit):
            settings_from(argv, environ)
        return
    with pytest.raises(ConfigurationError, match=message):
        settings_from(argv, environ)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.max_batch_size = 3  # type: ignore[misc]


def test_every_setting_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    missing = [env_name(item.name) for item in fields() if env_name(item.name) not in docs]
    assert not missing, f"docs/service.md lacks {missing}"


def test_unknown_convserve_variables_fail_fast_naming_the_closest_setting() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^unknown environment variable CONVSERVE_PROVIDER "
        r"\(did you mean CONVSERVE_PROVIDERS\?\)",
    ):
        settings_from([], {"CONVSERVE_PROVIDER": "cuda"})
    with pytest.raises(
        ConfigurationError, match=r"MAX_BATCH \(did you mean CONVSERVE_MAX_BATCH_SIZE"
    ):
        settings_from([], {"CONVSERVE_MAX_BATCH": "8"})
    with pytest.raises(ConfigurationError, match=r"CONVSERVE_ZZZ \(no setting is close\)"):
        settings_from([], {"CONVSERVE_ZZZ": "1"})
    # the client's address and compose interpolation are no settings but are let be
    allowed = {"CONVSERVE_ADDRESS": "h:1", "CONVSERVE_BIND_ADDRESS": "0.0.0.0", "OTHER": "x"}
    assert settings_from([], allowed).providers == "auto"


def test_main_exits_2_on_an_unknown_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVSERVE_PROVIDER", "cuda")
    assert main([]) == 2
    assert "CONVSERVE_PROVIDER (did you mean CONVSERVE_PROVIDERS?)" in capsys.readouterr().err


def test_security_settings_default_to_today_s_behaviour() -> None:
    settings = settings_from([], environ={})
    assert (settings.tls, settings.token_file, settings.health_port) == (False, None, None)
    assert settings.reflection is True and settings.auth_health is False
    assert settings.metrics_bind_host == settings.host == "0.0.0.0"
    assert settings_from(["--host", "10.0.0.5"], environ={}).metrics_bind_host == "10.0.0.5"


def test_security_settings_from_variables_and_flags() -> None:
    environ = {
        "CONVSERVE_METRICS_HOST": "0.0.0.0",
        "CONVSERVE_HEALTH_PORT": "8003",
        "CONVSERVE_REFLECTION": "false",
        "CONVSERVE_TLS_CERT_FILE": "/tls/tls.crt",
        "CONVSERVE_TLS_KEY_FILE": "/tls/tls.key",
        "CONVSERVE_TOKEN_FILE": "/tokens/tokens",
    }
    settings = settings_from(["--host", "127.0.0.1", "--tls-client-ca-file", "/ca.pem"], environ)
    assert (settings.host, settings.metrics_bind_host) == ("127.0.0.1", "0.0.0.0")
    assert (settings.health_port, settings.health_host) == (8003, "127.0.0.1")
    assert settings.reflection is False and settings.tls
    assert settings.tls_client_ca_file == Path("/ca.pem")
    assert settings.token_file == Path("/tokens/tokens")
    assert settings_from(["--reflection", "--health-port", ""], environ).reflection is True
    assert settings_from(["--health-port", ""], environ).health_port is None
    # the client's token variable is let be, as its address is
    assert settings_from([], {"CONVSERVE_TOKEN": "x"}).token_file is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"CONVSERVE_TLS_CERT_FILE": "c.pem"},
            r"^tls_cert_file is set but tls_key_file is not; TLS needs both",
        ),
        (
            {"CONVSERVE_TLS_KEY_FILE": "k.pem"},
            r"^tls_key_file is set but tls_cert_file is not; TLS needs both",
        ),
        (
            {"CONVSERVE_TLS_CLIENT_CA_FILE": "ca.pem"},
            r"^tls_client_ca_file \(mutual TLS\) needs tls_cert_file and tls_key_file",
        ),
        ({"CONVSERVE_AUTH_HEALTH": "true"}, r"^auth_health needs token_file"),
        ({"CONVSERVE_HEALTH_PORT": "-1"}, r"^health_port must be in 0..65535, got -1"),
        ({"CONVSERVE_HEALTH_PORT": "x"}, r"^CONVSERVE_HEALTH_PORT: invalid literal"),
        ({"CONVSERVE_TOKEN_FLIE": "t"}, r"did you mean CONVSERVE_TOKEN_FILE\?"),
    ],
)
def test_inconsistent_security_settings_fail_fast(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        settings_from([], environ)


def test_help_shows_the_security_defaults_in_words() -> None:
    help_text = " ".join(build_parser().format_help().split())
    assert "(default: the same as --host)" in help_text
    assert "(default: none: plaintext)" in help_text
    assert "--reflection, --no-reflection" in help_text
