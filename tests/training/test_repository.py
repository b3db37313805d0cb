"""Versioning: next integer, one rename, never overwrite, temporary entries ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import repository
from training.errors import RepositoryError
from training.repository import (
    check_model_name,
    latest_version,
    publish,
    resolve_model_path,
    staging_directory,
    versions,
)


def stage(model_dir: Path, content: str) -> Path:
    with staging_directory(model_dir) as staging:
        (staging / "model.onnx").write_text(content)
        _, path = publish(staging, model_dir)
    assert not staging.exists()
    return path


def test_versions_count_up_from_one(tmp_path: Path) -> None:
    model_dir = tmp_path / "mnist_cnn"
    assert stage(model_dir, "first") == model_dir / "1"
    assert stage(model_dir, "second") == model_dir / "2"
    assert versions(model_dir) == [1, 2]
    assert (model_dir / "1" / "model.onnx").read_text() == "first"
    assert (model_dir / "1").stat().st_mode & 0o777 == 0o755  # the server may be another user


def test_non_integer_entries_are_ignored(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    for name in (".tmp-abc", "0", "latest", "v3", "-1"):
        (model_dir / name).mkdir(parents=True)
    (model_dir / "7").write_text("a file, not a version")
    assert versions(model_dir) == []
    # A file named "7" is not a version either.
    assert stage(model_dir, "x") == model_dir / "1"


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_text("precious")
    (model_dir / "2").mkdir()  # empty, e.g. someone's half-made directory
    assert stage(model_dir, "new") == model_dir / "3"
    assert (model_dir / "1" / "model.onnx").read_text() == "precious"
    assert list((model_dir / "2").iterdir()) == []


def test_an_empty_version_directory_is_no_version_and_is_never_reused(tmp_path: Path) -> None:
    # The service serves only integer directories holding a model.onnx; a stray empty 1/ is
    # not a version (so --if-missing must train), yet the next export still skips its name.
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    assert versions(model_dir) == []
    assert latest_version(model_dir) is None
    with pytest.raises(RepositoryError):
        resolve_model_path(model_dir)
    assert stage(model_dir, "new") == model_dir / "2"
    assert versions(model_dir) == [2]
    assert list((model_dir / "1").iterdir()) == []


def test_rename_refuses_an_existing_empty_directory(tmp_path: Path) -> None:
    # Plain rename(2) would silently replace an empty target directory.
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "f").write_text("x")
    (tmp_path / "target").mkdir()
    with pytest.raises(FileExistsError):
        repository._rename_noreplace(tmp_path / "source", tmp_path / "target")
    assert list((tmp_path / "target").iterdir()) == []


def test_losing_the_race_for_a_number_takes_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "m"
    real = repository._rename_noreplace
    calls: list[Path] = []

    def another_trainer_wins(source: Path, target: Path) -> None:
        if not calls:  # between our choice of N and our rename, someone publishes N
            target.mkdir()
            (target / "model.onnx").write_text("theirs")
        calls.append(target)
        real(source, target)

    monkeypatch.setattr(repository, "_rename_noreplace", another_trainer_wins)
    assert stage(model_dir, "ours") == model_dir / "2"
    assert calls == [model_dir / "1", model_dir / "2"]
    assert (model_dir / "1" / "model.onnx").read_text() == "theirs"
    assert (model_dir / "2" / "model.onnx").read_text() == "ours"


def test_a_failed_export_leaves_no_version_and_no_temporary(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    with pytest.raises(RuntimeError), staging_directory(model_dir) as staging:
        (staging / "model.onnx").write_text("half")
        raise RuntimeError("export failed")
    assert list(model_dir.iterdir()) == []


def test_model_paths_resolve_to_the_latest_version(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    stage(model_dir, "1")
    stage(model_dir, "2")
    assert resolve_model_path(model_dir) == model_dir / "2" / "model.onnx"
    assert resolve_model_path(model_dir / "1") == model_dir / "1" / "model.onnx"
    assert resolve_model_path(model_dir / "1" / "model.onnx") == model_dir / "1" / "model.onnx"
    with pytest.raises(RepositoryError, match="no model at"):
        resolve_model_path(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "-x", "with space"])
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(RepositoryError, match=f"invalid model name '{name}'"):
        check_model_name(name)
