"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_factory import TinySpec, write_version


@pytest.fixture(scope="session")
def tiny_spec() -> TinySpec:
    return TinySpec()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_spec: TinySpec) -> Path:
    """A model repository with one tiny 28x28 grayscale model, `tiny`, version 1.

    Session-scoped and shared: tests must not write into it (copy it to change it).
    """
    repository = tmp_path_factory.mktemp("repository")
    write_version(repository, "tiny", 1, tiny_spec)
    return repository
