"""Training runs: reproducible, resumable, on the user's own images, and what gets published."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.conftest import tiny_train_config, write_image_folder
from training import checkpoint
from training import train as train_module
from training.config import TrainConfig
from training.data import DataConfig
from training.engine import make_deterministic, resolve_device
from training.errors import ConfigError
from training.model import build_classifier
from training.train import FitResult, fit, main, resolve_model_config


def tiny_fit(config: TrainConfig, dataset, resume_state=None) -> tuple[FitResult, dict]:
    make_deterministic(config.seed)
    classifier = build_classifier(resolve_model_config(config, dataset), [0.13], [0.31])
    result = fit(
        classifier,
        dataset,
        config,
        resolve_device("cpu"),
        Path(config.checkpoint_dir),
        resume_state,
    )
    return result, classifier.state_dict()


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_same_seed_same_weights_and_metrics(tmp_path: Path, tiny_dataset) -> None:
    config = tiny_train_config(tmp_path, augment="affine")
    first, first_weights = tiny_fit(config, tiny_dataset)
    second, second_weights = tiny_fit(config, tiny_dataset)
    assert_same_weights(first_weights, second_weights)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in first.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in second.history]
    _, other_weights = tiny_fit(replace(config, seed=1), tiny_dataset)
    assert not torch.equal(
        first_weights["network.head.1.weight"], other_weights["network.head.1.weight"]
    )


def test_resume_continues_exactly_where_it_stopped(
    tmp_path: Path, tiny_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, straight_weights = tiny_fit(
        tiny_train_config(tmp_path / "a", augment="affine"), tiny_dataset
    )
    config = tiny_train_config(tmp_path / "b", augment="affine")
    real_evaluate = train_module.evaluate
    calls: list[int] = []

    def crash_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "evaluate", crash_in_the_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            tiny_fit(config, tiny_dataset)
    state = checkpoint.load_checkpoint(Path(config.checkpoint_dir) / checkpoint.LAST)
    assert state["epoch"] == 1
    resumed, resumed_weights = tiny_fit(config, tiny_dataset, resume_state=state)
    assert_same_weights(straight_weights, resumed_weights)
    assert [r["val_accuracy"] for r in resumed.history] == [
        r["val_accuracy"] for r in straight.history
    ]


def test_a_published_version_has_everything_the_contract_lists(tiny_version) -> None:
    directory = tiny_version.path
    assert directory.name == "1"
    assert sorted(p.name for p in directory.iterdir()) == [
        "labels.txt",
        "metadata.json",
        "model.onnx",
        "report",
    ]
    assert (directory / "labels.txt").read_text().splitlines() == [str(d) for d in range(10)]
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["convserve.dataset"] == "mnist5k"
    assert metadata["convserve.preprocessing"]["color_mode"] == "L"
    assert metadata["convserve.model_config"]["blocks"] == [[8], [16]]
    assert metadata["convserve.training"]["epochs"] == 3
    assert metadata["convserve.test_accuracy"] == f"{tiny_version.test_accuracy:.4f}"
    assert tiny_version.test_accuracy > 0.6  # three epochs of a tiny CNN on 210 digits


def test_imagefolder_training_end_to_end(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", classes=3, per_class=10, size=24)
    config = tiny_train_config(
        tmp_path,
        data=DataConfig(dataset="imagefolder", data_dir=str(images), image_size=16),
        model_overrides={"blocks": ((4,), (8,)), "hidden_units": (16,)},
        epochs=3,
        batch_size=8,
        augment="affine-hflip",
        model_name="bars",
        report=False,
    )
    published = main(config)
    metadata = json.loads((published.path / "metadata.json").read_text())
    assert metadata["convserve.labels"] == ["class_0", "class_1", "class_2"]
    preprocessing = metadata["convserve.preprocessing"]
    assert (preprocessing["color_mode"], preprocessing["channels"]) == ("RGB", 3)
    assert (preprocessing["height"], preprocessing["width"]) == (16, 16)
    assert metadata["convserve.training"]["split_sizes"] == {"train": 21, "val": 3, "test": 6}
    # The exported model answers for an image prepared the way the service prepares it.
    from training.onnx_eval import onnx_session
    from training.preprocessing import prepare_image

    with Image.open(images / "class_2" / "0.png") as image:
        pixels = prepare_image(image, "RGB", 16, 16)[np.newaxis]
    (logits,) = onnx_session(published.path / "model.onnx").run(None, {"images": pixels})
    assert logits.shape == (1, 3)


def test_resume_refuses_to_stretch_a_planned_schedule(tmp_path: Path) -> None:
    from training.config import resumed_config

    stored = tiny_train_config(tmp_path, epochs=2)
    with pytest.raises(ConfigError, match="planned for 2 epochs"):
        resumed_config(stored, replace(stored, epochs=5))
    assert resumed_config(stored, replace(stored, epochs=None)).epochs == 2


def test_resume_of_a_finished_run_exports_its_best_weights_again(tmp_path: Path) -> None:
    config = tiny_train_config(tmp_path, report=False)
    first = main(config)
    (run,) = (Path(config.checkpoint_dir) / "tiny_cnn").iterdir()
    last = run / checkpoint.LAST
    again = main(replace(config, resume=str(last), seed=99))  # the checkpoint's seed wins
    assert (first.version, again.version) == (1, 2)
    assert again.test_accuracy == first.test_accuracy
    metadata = json.loads((again.path / "metadata.json").read_text())
    assert metadata["convserve.training"]["seed"] == 0


def test_every_run_has_its_own_checkpoint_directory(tmp_path: Path) -> None:
    # Two trainings of one model (at once, or one resuming) must not share last.pt/best.pt.
    config = tiny_train_config(tmp_path, epochs=1, report=False)
    main(config)
    main(config)
    runs = sorted((Path(config.checkpoint_dir) / "tiny_cnn").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert sorted(p.name for p in run.iterdir()) == [checkpoint.BEST, checkpoint.LAST]
    # <UTC start>-<pid>-<hex>: sorted by start time, apart within one second and one process.
    assert all(len(run.name.split("-")) == 3 and run.name[8] == "T" for run in runs)


def test_run_directories_of_one_process_in_one_second_differ(tmp_path: Path) -> None:
    names = {checkpoint.run_directory(tmp_path, "m").name for _ in range(50)}
    assert len(names) == 50


def test_determinism_settings_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: check the settings a CUDA run depends on. cuBLAS needs the workspace variable
    # before its first use; a value the user chose wins; warn_only stays on (strict mode raises
    # on CUDA for adaptive_avg_pool2d backward and nll_loss).
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    make_deterministic(0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    make_deterministic(0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_device_choice() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cuda")
        return
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda was asked for but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'; choose one of: auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize(("channels", "preset"), [(1, "small"), (3, "deep")])
def test_auto_gets_the_schedule_of_the_preset_it_stands_for(channels: int, preset: str) -> None:
    """An RGB `auto` run builds the deep network, so it trains with the deep preset's epochs,
    batch size and learning rate (it used to get the small preset's); given values still win."""
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.model_config import PRESETS
    from training.train import with_concrete_preset

    data = SimpleNamespace(channels=channels)
    resolved = with_concrete_preset(TrainConfig(preset="auto"), data)  # type: ignore[arg-type]
    assert resolved.preset == preset
    plan = (resolved.resolved_epochs(), resolved.resolved_batch_size(), resolved.resolved_lr())
    assert plan == (PRESETS[preset].epochs, PRESETS[preset].batch_size, PRESETS[preset].lr)
    small, deep = PRESETS["small"], PRESETS["deep"]
    # Else this test proves nothing.
    assert small.batch_size != deep.batch_size and small.lr != deep.lr
    given = with_concrete_preset(
        TrainConfig(preset="auto", epochs=3, batch_size=8, lr=0.1),
        data,  # type: ignore[arg-type]
    )
    assert (given.resolved_epochs(), given.resolved_batch_size(), given.resolved_lr()) == (
        3,
        8,
        0.1,
    )
    assert with_concrete_preset(TrainConfig(preset="small"), data).preset == "small"  # type: ignore[arg-type]
