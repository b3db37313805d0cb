"""The contract between training and service, end to end.

train (a short real run on the embedded digits) -> export -> serve -> classify the held-out
test images sent as PNG bytes through the Classify RPC -> the served predictions equal the
exported model's predictions measured offline with ONNX Runtime, image for image, and so does
the accuracy. Neither package imports the other: only the model repository connects them.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service._proto import classification_pb2 as cls_pb2
from tests.service.conftest import StartServer
from training.data import DataConfig, load_data
from training.onnx_eval import evaluate_onnx

MODEL = "digits"


@pytest.fixture(scope="module")
def trained_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("roundtrip")
    command = [
        sys.executable, "-m", "training", "train",
        "--repository", str(repository), "--model-name", MODEL,
        "--epochs", "2", "--no-progress", "--no-report",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return repository


def _png(image_chw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_chw[0]).save(buffer, format="PNG")  # [1, H, W] grayscale digit
    return buffer.getvalue()


@pytest.mark.slow
def test_served_predictions_equal_offline_onnx_predictions(
    trained_repository: Path, start_server: StartServer
) -> None:
    version_dir = trained_repository / MODEL / "1"
    metadata = json.loads((version_dir / "metadata.json").read_text())
    test = load_data(DataConfig(**metadata["convserve.training"]["data"])).test
    labels = [line for line in (version_dir / "labels.txt").read_text().splitlines() if line]

    offline = evaluate_onnx(version_dir / "model.onnx", test.images, test.labels, len(labels))
    # The accuracy training wrote at export time is this same offline measurement.
    assert float(metadata["convserve.test_accuracy"]) == pytest.approx(offline.accuracy, abs=1e-4)
    assert offline.accuracy > 0.9, "a 2-epoch run on the digits should already be accurate"

    server = start_server(trained_repository, max_batch_size=32)
    stub = server.classification_stub()
    served: list[int] = []
    chunk = 50
    for start in range(0, len(test), chunk):
        images = [_png(image) for image in test.images[start : start + chunk]]
        reply = stub.Classify(cls_pb2.ClassifyRequest(images=images, top_k=1), timeout=60)
        assert reply.model_name == MODEL and reply.model_version == "1"
        served.extend(result.classes[0].index for result in reply.results)
        # The label the server returns is the one training wrote for that index.
        assert all(r.classes[0].label == labels[r.classes[0].index] for r in reply.results)

    served_predictions = np.array(served)
    assert len(served_predictions) == len(test)
    mismatches = np.flatnonzero(served_predictions != offline.predictions)
    assert mismatches.size == 0, f"served != offline for test images {mismatches[:20].tolist()}"
    served_accuracy = float(np.mean(served_predictions == test.labels))
    assert served_accuracy == offline.accuracy
