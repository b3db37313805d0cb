"""Export: a self-contained ONNX file on the contract, equal to PyTorch at batch 1 and N."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from training.errors import ExportError
from training.export import check_parity, contract_metadata, embed_metadata, export_onnx
from training.model import build_classifier
from training.onnx_eval import onnx_session, read_metadata


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_model_config, tiny_dataset):
    torch.manual_seed(0)
    classifier = build_classifier(tiny_model_config, [0.13], [0.31]).eval()
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(classifier, path, tiny_dataset.test.images[:2])
    return classifier, path


def test_graph_takes_uint8_images_with_a_dynamic_batch(exported) -> None:
    _, path = exported
    model = onnx.load(str(path))
    (image,) = model.graph.input
    (logits,) = model.graph.output
    assert image.name == "images" and logits.name == "logits"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert model.graph.node[0].op_type == "Cast"  # the normalisation is inside the graph
    assert list(path.parent.iterdir()) == [path]  # no external data next to it
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_onnx_runtime_equals_pytorch(exported, tiny_dataset, batch: int) -> None:
    classifier, path = exported
    images = tiny_dataset.test.images[:batch]
    (actual,) = onnx_session(path).run(None, {"images": images})
    with torch.inference_mode():
        expected = classifier(torch.from_numpy(images)).numpy()
    assert actual.shape == (batch, 10) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-5)
    assert check_parity(path, classifier, tiny_dataset.test.images, (1, batch)) < 1e-4


def test_a_model_that_differs_fails_parity_with_the_difference(exported, tiny_dataset) -> None:
    classifier, path = exported
    import copy

    other = copy.deepcopy(classifier)
    with torch.no_grad():
        other.network.head[-1].bias += 0.01
    with pytest.raises(ExportError) as raised:
        check_parity(path, other, tiny_dataset.test.images, (1, 8))
    message = str(raised.value)
    assert message.startswith("ONNX Runtime output differs from PyTorch at batch 1: max abs diff")
    assert "0.01" in message


class BatchDependent(torch.nn.Module):
    """The exported classifier, plus a term that is zero for a batch of one and not beyond.

    ``shift``: logits move by 0.01 per extra image (a bug that reads ``x.shape[0]``).
    ``leak``: each row gets 0.01 x the sum of the other rows (what batch statistics, e.g. batch
    norm left in training mode, do): every image changes its neighbours' answers.
    """

    def __init__(self, classifier: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.classifier = classifier
        self.kind = kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)
        if self.kind == "shift":
            return logits + 0.01 * (images.shape[0] - 1)
        return logits + 0.01 * (logits.sum(dim=0, keepdim=True) - logits)


@pytest.mark.parametrize("kind", ["shift", "leak"])
def test_a_model_that_differs_only_beyond_batch_1_fails_parity_at_batch_n(
    exported, tiny_dataset, kind: str
) -> None:
    # Batch 1 alone cannot catch a graph that is wrong only for real batches (the server's case).
    classifier, path = exported
    reference = BatchDependent(classifier, kind)
    assert check_parity(path, reference, tiny_dataset.test.images, (1,)) < 1e-4
    with pytest.raises(ExportError) as raised:
        check_parity(path, reference, tiny_dataset.test.images, (1, 8))
    assert str(raised.value).startswith(
        "ONNX Runtime output differs from PyTorch at batch 8: max abs diff"
    )


def test_metadata_follows_the_contract(tmp_path: Path, exported) -> None:
    _, path = exported
    copy_path = tmp_path / "model.onnx"
    copy_path.write_bytes(path.read_bytes())
    metadata = contract_metadata(
        labels=["a", "b"],
        preprocessing={"height": 28},
        model_config={"blocks": [[8]]},
        training={"epochs": 2},
        dataset="mnist5k",
        test_accuracy=0.98765,
    )
    embed_metadata(copy_path, metadata)
    read = read_metadata(copy_path)
    assert {k for k in read if k.startswith("convserve.")} == {
        "convserve.format",
        "convserve.labels",
        "convserve.preprocessing",
        "convserve.model_config",
        "convserve.training",
        "convserve.dataset",
        "convserve.test_accuracy",
        "convserve.created",
    }
    assert read["convserve.format"] == "1"
    assert json.loads(read["convserve.labels"]) == ["a", "b"]
    assert read["convserve.test_accuracy"] == "0.9877"
    assert read["convserve.created"].endswith("Z")
    embed_metadata(copy_path, {"convserve.test_accuracy": ""})  # replaces, does not duplicate
    keys = [p.key for p in onnx.load(str(copy_path)).metadata_props]
    assert keys.count("convserve.test_accuracy") == 1
