"""``python -m training quantize``: a trained model -> an INT8 sibling that the server serves.

The tiny trained model is quantized once per module into a copy of its repository; the INT8
version is then served for real (gRPC on 127.0.0.1) and classifies the held-out test images as
the offline ONNX Runtime measurement says, within the accuracy bound of its FP32 source.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from contract.runtime import SPIN_MIN_RUN_S
from service._proto import classification_pb2 as cls_pb2
from service.engine.runtime import OnnxModel, RuntimeOptions
from tests.model_factory import TinySpec, write_version
from tests.service.conftest import StartServer, start_server  # noqa: F401 (the fixture)
from training import quantize_bench
from training.cli import main
from training.data import Dataset
from training.errors import ConfigError, ExportError, RepositoryError
from training.onnx_eval import evaluate_onnx
from training.quantize import QuantizeConfig
from training.quantize_bench import find_pair, measure_pair
from training.quantize_run import QUANTIZATION_KEY, QuantizedVersion, quantize_version

SOURCE = "tiny_cnn"
TARGET = "tiny_cnn_int8"
MAX_DROP = 0.005  # the default --max-accuracy-drop, 0.5 points, as a fraction


@pytest.fixture(scope="module")
def repository(tiny_version, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny trained model's repository (the session's version stays read-only)."""
    root = tmp_path_factory.mktemp("quantize")
    shutil.copytree(tiny_version.path.parent, root / SOURCE)
    return root


@pytest.fixture(scope="module")
def quantized(repository: Path) -> QuantizedVersion:
    return quantize_version(QuantizeConfig(repository, SOURCE))


def _png(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_chw[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_int8_is_the_next_version_of_a_sibling_with_the_sources_contract(
    quantized: QuantizedVersion, repository: Path
) -> None:
    assert (quantized.model, quantized.version) == (TARGET, 1)
    assert quantized.path == repository / TARGET / "1"
    # The source's own versions are untouched: what its clients get does not change.
    assert sorted(p.name for p in (repository / SOURCE).iterdir()) == ["1"]

    source = json.loads((repository / SOURCE / "1" / "metadata.json").read_text())
    int8 = json.loads((quantized.path / "metadata.json").read_text())
    assert set(int8) == set(source) | {QUANTIZATION_KEY}
    for key in ("convserve.labels", "convserve.preprocessing", "convserve.training"):
        assert int8[key] == source[key]
    embedded = {p.key: p.value for p in onnx.load(quantized.path / "model.onnx").metadata_props}
    assert json.loads(embedded[QUANTIZATION_KEY]) == int8[QUANTIZATION_KEY]

    record = int8[QUANTIZATION_KEY]
    assert (record["format"], record["method"]) == ("QDQ", "static")
    assert record["source"]["model"] == SOURCE and record["source"]["version"] == 1
    # Calibrated on the training split only: all 210 training images (fewer than 512).
    assert record["calibration"]["source"] == "train" and record["calibration"]["images"] == 210
    assert "Conv" in record["quantized_ops"] and "QLinearConv" in record["runtime_graph"]
    # The input cast and normalisation stay FP32, and the first conv reads quantized input.
    assert len(record["fp32_nodes"]) == 4
    assert int8["convserve.test_accuracy"] == f"{record['int8_test_accuracy']:.4f}"
    assert record["int8_test_accuracy"] >= record["fp32_test_accuracy"] - MAX_DROP

    report = (quantized.path / "report" / "quantization.md").read_text()
    fp32_text, int8_text = (
        f"{record[k]:.4f}" for k in ("fp32_test_accuracy", "int8_test_accuracy")
    )
    assert f"| test accuracy | {fp32_text} | {int8_text} |" in report
    assert f"--model {SOURCE}" in report


def test_the_server_serves_the_int8_model_and_it_classifies_within_the_bound(
    quantized: QuantizedVersion,
    repository: Path,
    tiny_dataset: Dataset,
    start_server: StartServer,  # noqa: F811 (the fixture imported above)
) -> None:
    test = tiny_dataset.test
    classes = len(tiny_dataset.classes)
    fp32 = evaluate_onnx(
        repository / SOURCE / "1" / "model.onnx", test.images, test.labels, classes
    )
    offline = evaluate_onnx(quantized.path / "model.onnx", test.images, test.labels, classes)
    assert offline.accuracy == pytest.approx(quantized.record["int8_test_accuracy"], abs=1e-6)

    server = start_server(repository, max_batch_size=16)
    stub = server.classification_stub()
    request = cls_pb2.ClassifyRequest(
        images=[_png(image) for image in test.images], model_name=TARGET, top_k=1
    )
    reply = stub.Classify(request, timeout=60)
    assert (reply.model_name, reply.model_version) == (TARGET, "1")
    served = np.array([result.classes[0].index for result in reply.results])
    assert served.tolist() == offline.predictions.tolist()
    served_accuracy = float(np.mean(served == test.labels))
    assert served_accuracy >= fp32.accuracy - MAX_DROP, (served_accuracy, fp32.accuracy)


def test_an_untrained_model_calibrates_on_random_pixels_only_when_asked(tmp_path: Path) -> None:
    write_version(tmp_path, "linear", 1, TinySpec())  # contract metadata, no training data
    with pytest.raises(ConfigError, match=r"not trained on a data set.*--calibration random"):
        quantize_version(QuantizeConfig(tmp_path, "linear"))
    assert not (tmp_path / "linear_int8").exists()

    result = quantize_version(QuantizeConfig(tmp_path, "linear", calibration="random"))
    assert result.record["int8_test_accuracy"] is None
    assert result.record["calibration"]["source"] == "random"
    # The runtime's contract checks (signature, metadata) accept it.
    model = OnnxModel.load("linear_int8", 1, result.path / "model.onnx", RuntimeOptions())
    images = np.random.default_rng(0).integers(0, 256, size=(4, 1, 28, 28), dtype=np.uint8)
    assert model.run_blocking(images).shape == (4, 10)
    model.close()


def _strip_metadata(repository: Path, name: str, source: Path) -> None:
    graph = onnx.load(source / "model.onnx")
    del graph.metadata_props[:]
    (repository / name / "1").mkdir(parents=True)
    onnx.save(graph, repository / name / "1" / "model.onnx")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"model": "missing"}, RepositoryError, "no model 'missing' in the repository"),
        ({"version": 7}, RepositoryError, f"model '{SOURCE}' has no version 7; versions: 1"),
        ({"model": "bare"}, ConfigError, "is not a convserve model: .* no convserve.format"),
        ({"model": TARGET}, ConfigError, f"already quantized \\(INT8 of {SOURCE} version 1\\)"),
        ({"calibration_method": "best"}, ConfigError, "choose one of: minmax, entropy"),
        ({"max_accuracy_drop": -100.0}, ExportError, "nothing was published"),
    ],
)
def test_what_cannot_be_quantized_fails_with_a_message_and_publishes_nothing(
    quantized: QuantizedVersion,
    repository: Path,
    tmp_path: Path,
    change: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(repository, root)
    _strip_metadata(root, "bare", repository / SOURCE / "1")
    before = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    config = replace(QuantizeConfig(root, SOURCE, to_model="out"), **change)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        quantize_version(config)
    after = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert after == before


def test_the_cli_names_the_problem(
    quantized: QuantizedVersion, repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["quantize", "--repository", str(repository), "--model", SOURCE, "--version", "3"]
    )
    assert status == 2
    assert f"error: model '{SOURCE}' has no version 3; versions: 1" in capsys.readouterr().err


def test_the_benchmark_finds_the_source_and_measures_both(
    quantized: QuantizedVersion, repository: Path
) -> None:
    pair = find_pair(repository / TARGET)  # a model directory: its latest version
    assert pair.fp32 == repository / SOURCE / "1" / "model.onnx"
    result = measure_pair(pair, batch_sizes=(1, 4), rounds=1, seconds=0.01, intra_op_threads=1)
    assert result.batch_sizes == [1, 4]
    assert all(rate > 0 for rate in result.fp32 + result.int8 + result.paired_ratio)
    with pytest.raises(RepositoryError, match=r"no convserve\.quantization metadata"):
        find_pair(repository / SOURCE)


@pytest.mark.parametrize(("spinning", "batch_of_one_s", "spins"), [
    ("on", None, True),
    ("off", None, False),
    ("auto", SPIN_MIN_RUN_S, True),  # the service's rule (contract/runtime.py)
    ("auto", 0.9 * SPIN_MIN_RUN_S, False),
])  # fmt: skip
def test_the_benchmark_spins_as_the_service_would(
    quantized: QuantizedVersion,
    repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    spinning: str,
    batch_of_one_s: float | None,
    spins: bool,
) -> None:
    timed: list[Any] = []

    def scripted(session: Any) -> float:
        timed.append(session)
        assert batch_of_one_s is not None, "on and off time nothing"
        return batch_of_one_s

    monkeypatch.setattr(quantize_bench, "batch_of_one_s", scripted)
    pair = find_pair(repository / TARGET)
    result = measure_pair(pair, (1,), rounds=1, seconds=0.01, intra_op_threads=1, spinning=spinning)
    assert result.spinning == {"fp32": spins, "int8": spins}
    assert len(timed) == (2 if spinning == "auto" else 0)
