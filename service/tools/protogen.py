"""Regenerates the Python code for the wire contract in `protos/` into `service/_proto/`.

    python -m service.tools.protogen            # what `make proto` runs
    python -m service.tools.protogen --out DIR  # into DIR/service/_proto (the staleness test)

The import path is mapped at generation time (`-Iservice/_proto=protos`), so the generated
modules import each other as `service._proto.x_pb2` without any rewriting. Type stubs (.pyi)
come from mypy-protobuf. Never edit the generated files by hand.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PROTO_PACKAGE = "service/_proto"
"""The import path the generated modules live under (and the folder, relative to --out)."""


def repository_root() -> Path:
    """The project checkout this module belongs to."""
    return Path(__file__).resolve().parents[2]


def proto_files(protos_dir: Path) -> list[Path]:
    """The contract's .proto files, in a stable order."""
    return sorted(protos_dir.glob("*.proto"))


def _plugin(name: str) -> str:
    # Next to the interpreter first: a venv's bin/ is not on PATH unless it is activated.
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install mypy-protobuf (the 'dev' extra)")
    return found


def generate(out_dir: Path, protos_dir: Path | None = None) -> list[Path]:
    """Generates the modules and stubs into `out_dir/service/_proto`; returns the files written."""
    from grpc_tools import protoc  # a dev dependency: imported only when generating

    protos_dir = protos_dir or repository_root() / "protos"
    sources = proto_files(protos_dir)
    if not sources:
        raise RuntimeError(f"no .proto files in {protos_dir}")
    target = out_dir / PROTO_PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_PACKAGE}={protos_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(source) for source in sources),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    init = target / "__init__.py"
    init.write_text(
        '"""Generated from protos/ by `python -m service.tools.protogen`; do not edit."""\n'
    )
    return sorted(path for path in target.iterdir() if path.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m service.tools.protogen [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m service.tools.protogen", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=repository_root(),
        help="root to generate into; the files land in OUT/service/_proto (default: the checkout)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in generate(args.out):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
