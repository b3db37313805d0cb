"""Writing versions into the model repository (docs/model-repository.md), never overwriting one.

A version is a positive-integer directory holding ``model.onnx`` (what the service serves). It is
prepared completely in ``<model>/.tmp-<random>/`` and then published by one rename to
``<model>/<N>/``, ``N`` one past the largest integer directory, empty or not. The rename must
fail if ``N`` exists: plain ``rename(2)`` silently replaces an existing *empty* directory, so on
Linux the rename is ``renameat2(RENAME_NOREPLACE)``. Where that call is missing, an existence
check comes first and ``rename(2)`` still refuses any non-empty directory (every published
version is non-empty). If ``N`` was taken meanwhile (another trainer won the race), the next
number is tried.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from contract.layout import MODEL_FILE, MODEL_NAME, TMP_PREFIX, version_number
from training.errors import RepositoryError

logger = logging.getLogger(__name__)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_MAX_ATTEMPTS = 100


def check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise RepositoryError(
            f"invalid model name '{name}': use letters, digits, '_', '.' and '-', "
            f"not starting with '.' or '-' (e.g. mnist_cnn)"
        )


def _numbered_directories(model_dir: Path) -> list[int]:
    """Every directory named by a positive integer, ascending, whether it holds a model or not."""
    if not model_dir.is_dir():
        return []
    found = []
    for entry in model_dir.iterdir():
        number = version_number(entry.name)
        if number is not None and entry.is_dir():
            found.append(number)
    return sorted(found)


def versions(model_dir: Path) -> list[int]:
    """The published versions of a model, ascending: integer directories holding a model.onnx.

    The service serves only such directories (docs/model-repository.md); an empty or
    half-copied ``1/`` is no version, so ``--if-missing`` must not count it either.
    """
    return [
        n for n in _numbered_directories(model_dir) if (model_dir / str(n) / MODEL_FILE).is_file()
    ]


def latest_version(model_dir: Path) -> int | None:
    published = versions(model_dir)
    return published[-1] if published else None


def next_version_number(model_dir: Path) -> int:
    """One past every integer directory, with a model or not: an export never lands in (or
    below) a directory someone else made, so the new version is also the latest."""
    taken = _numbered_directories(model_dir)
    return taken[-1] + 1 if taken else 1


@contextlib.contextmanager
def staging_directory(model_dir: Path) -> Iterator[Path]:
    """A fresh ``.tmp-*`` directory inside the model directory, removed unless published."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=model_dir))
    # mkdtemp makes it 0700; a published version must be readable by the service's user.
    staging.chmod(0o755)
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _rename_noreplace(source: Path, target: Path) -> None:
    """``rename`` that raises FileExistsError when ``target`` exists (even as an empty dir)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        result = renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    # No RENAME_NOREPLACE here: rename(2) still fails on any non-empty directory.
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def publish(staging: Path, model_dir: Path) -> tuple[int, Path]:
    """Renames a complete staging directory to the next free version; returns (N, path)."""
    for _ in range(_MAX_ATTEMPTS):
        number = next_version_number(model_dir)
        while (model_dir / str(number)).exists():  # e.g. an empty or stray directory
            number += 1
        target = model_dir / str(number)
        try:
            _rename_noreplace(staging, target)
        except FileExistsError:
            logger.info("version %d was taken meanwhile; trying the next one", number)
            continue
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue
            raise RepositoryError(f"cannot publish '{staging}' as '{target}': {error}") from error
        logger.info("published %s", target)
        return number, target
    raise RepositoryError(f"no free version number in '{model_dir}' after {_MAX_ATTEMPTS} tries")


def resolve_model_path(path: Path) -> Path:
    """``model.onnx`` from a file, a version directory, or a model directory (latest version)."""
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    latest = latest_version(path)
    if latest is not None:
        return path / str(latest) / MODEL_FILE
    raise RepositoryError(
        f"no model at '{path}': give a model.onnx file, a version directory "
        f"(<repository>/<model>/<N>) or a model directory (<repository>/<model>, latest version)"
    )
