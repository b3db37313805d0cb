"""convserve.v1.ImageClassification/Classify over gRPC: images in, top-k probabilities out."""

from __future__ import annotations

import asyncio
import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import grpc
import numpy as np
import pytest
from PIL import Image

from service._proto import classification_pb2 as cls_pb2
from service.engine.batcher import Batcher
from service.engine.classify import (
    INLINE_DECODE_MAX_BYTES,
    INLINE_DECODE_MAX_PIXELS,
    Classifier,
)
from service.engine.manager import LoadedModel
from service.errors import InvalidInput, Overloaded
from service.repository.disk import Preprocessing
from tests.model_factory import TinySpec, reference_logits, write_version
from tests.service.conftest import RunningServer, StartServer, encode_image


def expected_top(spec: TinySpec, data: bytes, k: int) -> list[tuple[str, float]]:
    """The contract's preprocessing, the reference model and softmax, computed by the test."""
    image = Image.open(io.BytesIO(data)).convert(spec.color_mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    logits = reference_logits(spec, array[None]).astype(np.float64)[0]
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(spec.labels[i], float(probabilities[i])) for i in order]


def assert_matches(result: cls_pb2.Classification, expected: list[tuple[str, float]]) -> None:
    assert [c.label for c in result.classes] == [label for label, _ in expected]
    np.testing.assert_allclose(
        [c.score for c in result.classes], [p for _, p in expected], atol=1e-5
    )


@pytest.fixture
def tiny_server(start_server: StartServer, tiny_repository: Path) -> RunningServer:
    return start_server(tiny_repository, max_image_pixels=250_000, max_image_bytes=200_000)


def test_classify_many_images_of_any_format_in_order(
    tiny_server: RunningServer, tiny_spec: TinySpec
) -> None:
    rng = np.random.default_rng(0)
    images = [
        encode_image(rng.integers(0, 256, (28, 28), dtype=np.uint8), "PNG"),
        encode_image(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "JPEG"),
        encode_image(rng.integers(0, 256, (14, 14), dtype=np.uint8), "BMP"),
    ]
    response = tiny_server.classification_stub().Classify(
        cls_pb2.ClassifyRequest(images=images, top_k=3)
    )
    assert (response.model_name, response.model_version) == ("tiny", "1")
    assert len(response.results) == 3
    for result, data in zip(response.results, images, strict=True):
        assert_matches(result, expected_top(tiny_spec, data, 3))
        assert [c.index for c in result.classes] == [int(c.label) for c in result.classes]


def test_top_k_defaults_to_five_and_is_capped_at_the_classes(
    tiny_server: RunningServer, tiny_spec: TinySpec
) -> None:
    data = encode_image(np.full((28, 28), 200, dtype=np.uint8))
    stub = tiny_server.classification_stub()
    response = stub.Classify(cls_pb2.ClassifyRequest(images=[data], model_name="tiny"))
    assert_matches(response.results[0], expected_top(tiny_spec, data, 5))
    everything = stub.Classify(cls_pb2.ClassifyRequest(images=[data], top_k=50))
    assert len(everything.results[0].classes) == 10
    assert sum(c.score for c in everything.results[0].classes) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"images": [b"not an image"]}, "image 0: cannot decode the image"),
        ({"images": []}, "no images"),
        ({"top_k": 101}, "top_k must be at most 100"),
        (
            {"images": [encode_image(np.zeros((600, 600), dtype=np.uint8))]},
            "the limit is 250000 pixels",
        ),
        ({"images": [b"\x89PNG" + b"\x00" * 200_001]}, "200005 bytes; the limit is 200000 bytes"),
    ],
)
def test_bad_classify_requests_are_invalid_argument(
    tiny_server: RunningServer, request_fields: dict, message: str
) -> None:
    fields = {"images": [encode_image(np.zeros((28, 28), dtype=np.uint8))], **request_fields}
    stub = tiny_server.classification_stub()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(cls_pb2.ClassifyRequest(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    ok = stub.Classify(cls_pb2.ClassifyRequest(images=[encode_image(np.zeros((28, 28), np.uint8))]))
    assert len(ok.results) == 1


def test_model_choice_default_and_not_found(start_server: StartServer, tmp_path: Path) -> None:
    write_version(tmp_path, "gray", 1, TinySpec())
    color = TinySpec(channels=3, height=16, width=16, labels=("cat", "dog", "fish"))
    write_version(tmp_path, "color", 1, color)
    data = encode_image(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8))

    running = start_server(tmp_path)
    stub = running.classification_stub()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(cls_pb2.ClassifyRequest(images=[data]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "several: color, gray" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(cls_pb2.ClassifyRequest(images=[data], model_name="colour"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    response = stub.Classify(cls_pb2.ClassifyRequest(images=[data], model_name="color", top_k=2))
    assert_matches(response.results[0], expected_top(color, data, 2))

    with_default = start_server(tmp_path, default_model="color")
    response = with_default.classification_stub().Classify(cls_pb2.ClassifyRequest(images=[data]))
    assert response.model_name == "color"


def _classifier_over(batcher: Batcher) -> tuple[Classifier, LoadedModel]:
    """A Classifier and a stand-in model whose decode would fail on any image it reached."""
    model = cast(
        LoadedModel, SimpleNamespace(spec=SimpleNamespace(labels=("a", "b")), batcher=batcher)
    )
    classifier = Classifier(
        ThreadPoolExecutor(1), max_image_bytes=1000, max_image_pixels=1000, max_top_k=5
    )
    return classifier, model


async def _never(items: np.ndarray) -> np.ndarray:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_too_many_images_are_refused_before_decoding() -> None:
    async def scenario() -> None:
        batcher = Batcher(_never, max_batch_size=2, max_queue_delay_s=0.001, queue_capacity=3)
        classifier, model = _classifier_over(batcher)
        with pytest.raises(InvalidInput, match="accepts at most 3 per request"):
            await classifier.classify(model, [b"not an image"] * 4, 1)

    asyncio.run(scenario())


def test_a_full_queue_refuses_before_decoding() -> None:
    async def scenario() -> None:
        batcher = Batcher(_never, max_batch_size=2, max_queue_delay_s=0.001, queue_capacity=3)
        classifier, model = _classifier_over(batcher)
        waiting = asyncio.ensure_future(batcher.infer(np.zeros((3, 1), np.float32)))
        await asyncio.sleep(0)  # not started: the three items stay queued
        with pytest.raises(Overloaded, match="3 of 3 queue places taken"):
            await classifier.classify(model, [b"not an image"], 1)
        waiting.cancel()

    asyncio.run(scenario())


def decoding_model(preprocessing: Preprocessing, observed: list[float]) -> LoadedModel:
    """What Classifier.decode needs of a model: its preprocessing and a decode-time metric
    that records into `observed`."""
    return cast(
        LoadedModel,
        SimpleNamespace(
            spec=SimpleNamespace(preprocessing=preprocessing),
            metrics=SimpleNamespace(image_decode=SimpleNamespace(observe=observed.append)),
        ),
    )


def test_the_classifier_decodes_only_its_image_formats() -> None:
    observed: list[float] = []
    model = decoding_model(Preprocessing(28, 28, 1, "L"), observed)
    png = encode_image(np.full((28, 28), 7, dtype=np.uint8), "PNG")
    jpeg = encode_image(np.full((28, 28), 7, dtype=np.uint8), "JPEG")
    with ThreadPoolExecutor(1) as executor:
        classifier = Classifier(
            executor,
            max_image_bytes=10_000,
            max_image_pixels=10_000,
            max_top_k=5,
            image_formats=("PNG",),
        )
        rows = asyncio.run(classifier.decode(model, [png]))
        assert rows.shape == (1, 1, 28, 28) and len(observed) == 1
        with pytest.raises(InvalidInput) as caught:
            asyncio.run(classifier.decode(model, [png, jpeg]))
    assert str(caught.value) == (
        f"image 1: cannot decode the image ({len(jpeg)} bytes): not an image in an accepted "
        "format; accepted: PNG"
    )


class CountingExecutor(ThreadPoolExecutor):
    """A decode pool that counts what is handed to it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_small_calls_are_decoded_on_the_loop_and_larger_ones_in_the_pool() -> None:
    """A hand-off to a decode thread costs more than decoding a tiny image; a large call must
    not hold the event loop. Decided from the images' headers, per call."""
    observed: list[float] = []
    model = decoding_model(Preprocessing(28, 28, 1, "L"), observed)
    side = math.isqrt(INLINE_DECODE_MAX_PIXELS // 4)  # four of these make the budget
    small = encode_image(np.full((side, side), 7, dtype=np.uint8), "PNG")
    whole = math.isqrt(INLINE_DECODE_MAX_PIXELS)
    at_limit = encode_image(np.full((whole, whole), 7, dtype=np.uint8), "PNG")
    large = encode_image(np.full((whole + 1, whole + 1), 7, dtype=np.uint8), "PNG")
    with CountingExecutor() as executor:
        classifier = Classifier(
            executor, max_image_bytes=1 << 20, max_image_pixels=10_000, max_top_k=5
        )

        def decode(images: list[bytes]) -> tuple[tuple[int, ...], int]:
            before = executor.submitted
            rows = asyncio.run(classifier.decode(model, images))
            return rows.shape, executor.submitted - before

        assert decode([small] * 4) == ((4, 1, 28, 28), 0)  # the budget, on the loop
        assert decode([at_limit]) == ((1, 1, 28, 28), 0)
        assert decode([small] * 5) == ((5, 1, 28, 28), 5)  # over it: all to the pool
        assert decode([large]) == ((1, 1, 28, 28), 1)
        padded = small + bytes(INLINE_DECODE_MAX_BYTES)  # a small header over a large file
        assert decode([padded]) == ((1, 1, 28, 28), 1)
        with pytest.raises(InvalidInput, match="image 1: cannot decode the image"):
            asyncio.run(classifier.decode(model, [small, b"not an image"]))
        assert executor.submitted == 9  # unreadable: the pool's decode says why
        big_model = decoding_model(Preprocessing(224, 224, 1, "L"), observed)
        rows = asyncio.run(classifier.decode(big_model, [small]))  # the resize is the cost
        assert (rows.shape, executor.submitted) == ((1, 1, 224, 224), 10)
    assert len(observed) == 4 + 1 + 5 + 1 + 1 + 1 + 1  # every decode is timed, wherever it ran
