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


def test_every_setting_is_a_flag_with_its_docstring_as_help() -> None:
    import argparse
    import dataclasses

    from training.cli import FROM_THE_DATA, get_args_parser
    from training.config import TrainConfig
    from training.data import DataConfig
    from training.flags import field_docs
    from training.model_config import ModelConfig

    (subparsers,) = (
        a for a in get_args_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    train = subparsers.choices["train"]
    by_dest = {action.dest: action for action in train._actions}
    expected = [
        *(f for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "model_overrides")),
        *dataclasses.fields(DataConfig),
        *(f for f in dataclasses.fields(ModelConfig) if f.name not in FROM_THE_DATA),
    ]
    for item in expected:
        action = by_dest[item.name]
        assert "--" + item.name.replace("_", "-") in action.option_strings
        owner = next(
            cls for cls in (TrainConfig, DataConfig, ModelConfig) if item in dataclasses.fields(cls)
        )
        assert action.help is not None
        assert action.help.replace("%%", "%").startswith(field_docs(owner)[item.name])


def test_the_flags_of_no_arguments_are_the_default_config() -> None:
    from training.cli import get_args_parser, train_config
    from training.config import TrainConfig

    assert train_config(get_args_parser().parse_args(["train"])) == TrainConfig()


def test_flags_of_every_kind_reach_the_config(tmp_path: Path) -> None:
    from training.cli import get_args_parser, train_config
    from training.data import DataConfig

    args = ["train", "--blocks", "8,8/16", "--hidden", "64,32", "--no-batch-norm"]
    args += ["--dropout", "0.2", "--epochs", "3", "--lr", "0.01", "--no-report", "--download"]
    args += ["--max-samples", "300", "--preset", "small", "--resume", str(tmp_path / "last.pt")]
    config = train_config(get_args_parser().parse_args(args))
    assert config.model_overrides == {
        "blocks": ((8, 8), (16,)),
        "hidden_units": (64, 32),
        "batch_norm": False,
        "dropout": 0.2,
    }
    assert (config.epochs, config.lr, config.report, config.progress) == (3, 0.01, False, True)
    assert config.resume == str(tmp_path / "last.pt")
    # The small preset's input size, as the ImageFolder resize when none is given.
    assert config.data == DataConfig(download=True, max_samples=300, image_size=28)
    assert train_config(
        get_args_parser().parse_args(["train", "--hidden", ""])
    ).model_overrides == {"hidden_units": ()}


def test_compare_takes_the_training_flags_but_publishes_only_with_its_repository() -> None:
    from training.cli import get_args_parser, train_config
    from training.config import TrainConfig

    args = get_args_parser().parse_args(["compare", "--epochs", "2", "--no-progress"])
    config = train_config(args)
    assert (config.epochs, config.progress) == (2, False)
    assert config.repository == TrainConfig.repository and config.resume is None
    assert args.publish_to is None and args.dense_layers == 2


def test_a_new_config_field_becomes_a_flag_without_editing_the_cli() -> None:
    import argparse
    from dataclasses import dataclass, field

    from training.flags import HelpFormatter, add_fields, values

    @dataclass(frozen=True)
    class Settings:
        warmup_epochs: int | None = None
        """Epochs of linear warm-up before the schedule; none: no warm-up."""
        widths: tuple[int, ...] = (4, 8)
        """Widths, comma-separated."""
        ema: bool = False
        """Keep an exponential moving average of the weights."""
        decay: float = field(default=0.99, metadata={"flag": "--ema-decay", "help": "EMA decay."})

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    assert add_fields(parser, Settings) == ["warmup_epochs", "widths", "ema", "decay"]
    parsed = parser.parse_args(["--warmup-epochs", "2", "--widths", "1,2,3", "--ema"])
    assert values(parsed, Settings) == Settings(2, (1, 2, 3), True, 0.99)
    assert values(parser.parse_args(["--ema-decay", "0.5"]), Settings) == Settings(decay=0.5)
    help_text = " ".join(parser.format_help().split())
    assert "--warmup-epochs WARMUP_EPOCHS Epochs of linear warm-up before the schedule" in help_text
    assert "--ema, --no-ema Keep an exponential moving average of the weights. (default: off)" in (
        help_text
    )
    assert "--ema-decay DECAY EMA decay. (default: 0.99)" in help_text


def test_a_bad_list_is_a_usage_error_naming_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--blocks", "32,x"])
    assert exit_info.value.code == 2
    assert "argument --blocks: invalid groups '32,x': write integers like 32,32/64,64/128" in (
        capsys.readouterr().err
    )
