"""Explain: the server's occlusion map of one image equals what the training report's code
computes for the same model and image, goes through the batcher, and is bounded."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from contract.occlusion import occlusion_map, pixel_map
from service._proto import classification_pb2 as cls_pb2
from service.tools import client
from tests.model_factory import REGION, TinySpec, reference_logits, write_region_version
from tests.service.conftest import StartServer, encode_image


def digit(seed: int) -> np.ndarray:
    """A 28x28 'digit': a bright bar on black, so some patches matter and some do not."""
    image = np.zeros((28, 28), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    image[6:22, 12:16] = rng.integers(150, 256, (16, 4), dtype=np.uint8)
    return image


def test_the_server_explains_as_the_report_does(
    start_server: StartServer, tiny_repository: Path, tiny_spec: TinySpec
) -> None:
    running = start_server(tiny_repository)
    stub = running.classification_stub()
    image = digit(1)
    reply = stub.Explain(
        cls_pb2.ExplainRequest(image=encode_image(image), patch=7, stride=3), timeout=30
    )
    expected = occlusion_map(
        lambda batch: reference_logits(tiny_spec, batch), image[np.newaxis], patch=7, stride=3
    )
    assert (reply.rows, reply.columns) == expected.drops.shape == (8, 8)
    assert list(reply.tops) == expected.tops.tolist() and reply.patch == 7
    assert reply.target.index == expected.target == reply.classes[0].index
    np.testing.assert_allclose(np.asarray(reply.drops).reshape(8, 8), expected.drops, atol=1e-5)
    pixels = pixel_map(expected.drops, expected.tops, expected.lefts, 7, 28, 28)
    np.testing.assert_allclose(np.asarray(reply.pixel_drops).reshape(28, 28), pixels, atol=1e-5)
    assert reply.target.score == pytest.approx(expected.probabilities[expected.target], abs=1e-5)
    # one request counted; its 1 + 64 images went through the batcher
    assert (
        running.metric(
            "convserve_requests_total", model="tiny", version="1", rpc="Explain", code="OK"
        )
        == 1
    )
    assert running.metric("convserve_images_total", model="tiny", version="1") == 65

    other = stub.Explain(cls_pb2.ExplainRequest(image=encode_image(image), target=3), timeout=30)
    assert other.target.index == 3 and other.target.label == tiny_spec.labels[3]
    assert (other.rows, other.patch) == (12, 7)  # defaults: patch = 28 // 4, stride 2


def test_explain_refuses_what_it_cannot_do_with_a_message(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository, max_explain_positions=200)
    stub = running.classification_stub()
    image = encode_image(digit(2))
    for request, message in (
        (cls_pb2.ExplainRequest(image=image, patch=1, stride=1),
         "patch 1 with stride 1 gives 784 positions on a 28x28 input; this server explains at "
         "most 200 (raise the stride or the patch)"),
        (cls_pb2.ExplainRequest(image=image, patch=29),
         "patch must be an integer in 1..28 (the shorter side of a 28x28 image), got 29"),
        (cls_pb2.ExplainRequest(image=image, target=10),
         "target must be a class index in 0..9, got 10"),
        (cls_pb2.ExplainRequest(image=image, fill=[1, 2]),
         "fill must be a pixel value in 0..255 or 1 of them (one per channel), got [1, 2]"),
        (cls_pb2.ExplainRequest(image=b"not an image"), "image 0: cannot decode the image"),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
    assert running.metric(
        "convserve_requests_total", model="tiny", version="1", rpc="Explain",
        code="INVALID_ARGUMENT",
    ) == 5  # fmt: skip
    assert running.metric("convserve_images_total", model="tiny", version="1") in (None, 0)


def test_the_client_draws_the_map(
    start_server: StartServer,
    tiny_repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start_server(tiny_repository)
    path = tmp_path / "digit.png"
    path.write_bytes(encode_image(digit(3)))
    assert client.main(["explain", str(path), "--address", running.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: ") and "(tiny v1)" in lines[0]
    assert lines[1].startswith("why '")
    heatmap = lines[2:-1]
    assert len(heatmap) == 28 and all(len(row) == 2 + 56 for row in heatmap)
    assert "@" in "".join(heatmap)  # the largest drop is drawn
    assert lines[-1].startswith("largest drop ")


def test_through_the_server_the_map_is_high_exactly_where_the_model_looks(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_region_version(tmp_path, "region", 1)  # logits read only REGION of the image
    running = start_server(tmp_path)
    white = np.full((28, 28), 255, dtype=np.uint8)
    reply = running.classification_stub().Explain(
        cls_pb2.ExplainRequest(image=encode_image(white), patch=7, stride=2), timeout=30
    )
    assert reply.target.label == "region"
    drops = np.asarray(reply.drops).reshape(reply.rows, reply.columns)
    rows, columns = REGION
    for i, top in enumerate(reply.tops):
        for j, left in enumerate(reply.lefts):
            over = top < rows.stop and top + 7 > rows.start and left < columns.stop
            over = over and left + 7 > columns.start
            assert (drops[i, j] > 1e-4) if over else (abs(drops[i, j]) < 1e-6), (top, left)
    pixels = np.asarray(reply.pixel_drops).reshape(28, 28)
    assert np.unravel_index(np.argmax(pixels), pixels.shape)[0] in range(rows.start, rows.stop)


def test_the_client_writes_overlays(
    start_server: StartServer, tiny_repository: Path, tmp_path: Path
) -> None:
    running = start_server(tiny_repository)
    images = []
    for seed, size in ((4, (28, 28)), (5, (60, 45))):  # one at the model's size, one not
        path = tmp_path / f"digit{seed}.png"
        path.write_bytes(encode_image(np.resize(digit(seed), size)))
        images.append(path)
    out = tmp_path / "out"
    argv = ["explain", *map(str, images), "--out", str(out), "--address", running.address]
    assert client.main(argv) == 0
    for path in images:
        with Image.open(out / f"{path.stem}.explain.png") as overlay:
            original = Image.open(path)
            assert overlay.mode == "RGB" and overlay.size == original.size
