"""The command line as a user meets it: help, refusals with their messages, evaluate, if-missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import write_idx_mnist
from training.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_presets_and_datasets() -> None:
    result = run_cli("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "small: 28x28 grayscale (default)" in text
    assert "deep: 32x32 RGB (cifar10)" in text
    assert "mnist5k, mnist, fashion-mnist, cifar10, imagefolder" in text


def test_unknown_dataset_exits_2_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--dataset", "mnsit", "--repository", "/nonexistent/r"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown dataset 'mnsit'; choose one of: mnist5k, mnist, fashion-mnist, "
        "cifar10, imagefolder"
    )


def test_missing_image_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / "none"),
            "--repository",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert f"error: data directory '{tmp_path / 'none'}' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_if_missing_does_nothing_when_a_version_exists(tiny_version) -> None:
    repository = tiny_version.path.parent.parent
    result = run_cli(
        "train", "--repository", str(repository), "--model-name", "tiny_cnn", "--if-missing"
    )
    assert result.returncode == 0
    assert "already has version 1; nothing to do (--if-missing)" in result.stdout
    assert sorted(p.name for p in (repository / "tiny_cnn").iterdir()) == ["1"]


def test_if_missing_trains_when_the_only_version_directory_is_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stray empty 1/ is no model for the server: --if-missing must train, into 2/.
    model_dir = tmp_path / "r" / "tiny_cnn"
    (model_dir / "1").mkdir(parents=True)
    args = ["train", "--repository", str(tmp_path / "r"), "--model-name", "tiny_cnn"]
    args += ["--if-missing", "--max-samples", "300", "--epochs", "1", "--blocks", "8/16"]
    args += ["--hidden", "32", "--augment", "none", "--checkpoint-dir", str(tmp_path / "runs")]
    args += ["--no-report", "--no-progress", "-q"]
    assert main(args) == 0
    assert f"wrote version 2: {model_dir / '2'}" in capsys.readouterr().out
    assert (model_dir / "2" / "model.onnx").is_file()
    assert list((model_dir / "1").iterdir()) == []


def test_interrupt_prints_the_resume_path_of_this_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import train

    def interrupted(config, run_dir):
        run_dir.mkdir(parents=True)
        (run_dir / "last.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    args = ["train", "--repository", str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path)]
    assert main(args) == 130
    (run,) = (tmp_path / "mnist_cnn").iterdir()
    assert capsys.readouterr().err.strip() == (
        f"interrupted; continue with --resume {run / 'last.pt'}"
    )


def test_evaluate_prints_the_accuracy_written_at_export(
    tiny_version, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(tiny_version.path)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy: {tiny_version.test_accuracy:.4f} (60 images)" in out
    assert "per-class accuracy:" in out
    assert len([line for line in out.splitlines() if "(6 images)" in line]) == 10


@pytest.mark.parametrize(("option", "value"), [("--split-seed", "1"), ("--max-samples", "200")])
def test_evaluate_refuses_a_split_that_would_hold_training_images(
    tiny_version, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    # tiny_version: mnist5k, split seed 0, --max-samples 300. Another seed or cap redraws the
    # split, so its "test split" would be mostly images the model was trained on.
    assert main(["evaluate", "--model", str(tiny_version.path), option, value]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(
        "error: the model was trained on mnist5k with split seed 0 and --max-samples 300; "
        f"evaluating on another split ({option}) would include training images"
    )
    assert "accuracy" not in captured.out


def test_evaluate_accepts_the_split_the_model_was_trained_with(
    tiny_version, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "--model", str(tiny_version.path), "--split-seed", "0"]
    assert main([*args, "--max-samples", "300"]) == 0
    assert f"accuracy: {tiny_version.test_accuracy:.4f} (60 images)" in capsys.readouterr().out


def test_evaluate_on_an_official_test_set_allows_any_split_seed(
    tiny_version, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The public data sets test on their official test set: the split seed only moves the
    # validation images, and --max-samples subsamples the test set itself.
    write_idx_mnist(tmp_path, train=200, test=50)
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_version.path),
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--split-seed",
            "7",
            "--max-samples",
            "30",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "(30 images)" in capsys.readouterr().out


def test_evaluate_of_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "nothing")]) == 2
    assert "error: no model at" in capsys.readouterr().err


def test_training_never_imports_service() -> None:
    package = Path(__file__).resolve().parents[2] / "training"
    offenders = [
        str(path)
        for path in package.rglob("*.py")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("import service", "from service"))
    ]
    assert offenders == []


def test_the_cli_module_does_not_import_torch() -> None:
    # --help and --if-missing answer without loading torch.
    code = (
        "import sys, training.cli; print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
