"""The import direction of the house, read from the source (no import is executed).

- `contract` imports neither half; `training` never imports `service`; `service` never imports
  `training` or torch (the serving image carries no PyTorch).
- Inside `service`, the wire layer (`service/wire/`) is the only part of the server that imports
  the generated protobuf code (`service._proto`); the command-line tools (`service/tools/`) talk
  gRPC too and may. The engine, the repository and observability know nothing of gRPC.
- `service.server` is the one composition root: only it imports from every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from a import b` gives a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_proto" not in p.parts)


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources(package)
        for name in sorted(imports_of(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("contract", ("training", "service", "torch", "torchvision", "grpc")),
        ("training", ("service",)),
        ("service", ("training", "torch", "torchvision")),
    ],
)
def test_the_halves_import_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    assert not offenders(package, forbidden)


def test_only_the_wire_layer_and_the_tools_import_the_generated_code() -> None:
    allowed = (ROOT / "service" / "wire", ROOT / "service" / "tools")
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources("service")
        if not path.is_relative_to(allowed[0]) and not path.is_relative_to(allowed[1])
        and path.name != "server.py"  # the composition root registers the services
        for name in imports_of(path)
        if name.startswith("service._proto")
    ]  # fmt: skip
    assert not found


@pytest.mark.parametrize("layer", ["engine", "repository", "observability"])
def test_the_inner_layers_know_nothing_of_grpc_or_the_outer_ones(layer: str) -> None:
    forbidden = ("grpc", "grpc_health", "grpc_reflection", "service.wire", "service.tools",
                 "service.server")  # fmt: skip
    assert not offenders(f"service/{layer}", forbidden)


def test_the_tools_are_not_imported_by_the_server() -> None:
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources("service")
        if "tools" not in path.relative_to(ROOT / "service").parts
        for name in imports_of(path)
        if name.startswith("service.tools")
    ]
    assert not found
