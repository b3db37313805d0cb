"""The committed service/_proto matches what protos/ generates (run `make proto` if not)."""

from __future__ import annotations

from pathlib import Path

from service.tools.protogen import PROTO_PACKAGE, generate, repository_root


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    generated = {path.name: path.read_bytes() for path in generate(tmp_path)}
    committed_dir = repository_root() / PROTO_PACKAGE
    committed = {
        path.name: path.read_bytes()
        for path in committed_dir.iterdir()
        if path.is_file() and path.suffix in (".py", ".pyi")
    }
    assert sorted(generated) == sorted(committed), "files differ: run `make proto`"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run `make proto` and commit"
    assert any(name.endswith("_pb2.pyi") for name in generated)


def test_imports_are_mapped_at_generation_time() -> None:
    grpc_module = (repository_root() / PROTO_PACKAGE / "grpc_service_pb2_grpc.py").read_text()
    assert "from service._proto import grpc_service_pb2" in grpc_module
