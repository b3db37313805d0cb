"""Malformed requests against a real server: each gets INVALID_ARGUMENT or NOT_FOUND with a
short message naming the problem, nothing is logged above DEBUG for it (no traceback), and the
server answers correctly afterwards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto import classification_pb2 as cls_pb2
from service._proto import grpc_service_pb2 as pb2
from service.errors import client_text
from tests.model_factory import TinySpec, write_version
from tests.service.conftest import RunningServer, StartServer, encode_image, random_images
from tests.service.test_images import png_header_only
from tests.service.test_inference_api import assert_still_serving, infer_request, rpc_error

LONG = "z" * 8192  # past gRPC's 8 KiB metadata limit if echoed whole into the status message
LONG_MARK = f"{LONG[:64]!r}... (8192 characters)"
SHORT = 400  # the longest message any of these may get


@pytest.fixture(autouse=True)
def quiet_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Bad input is the client's problem: DEBUG at most, and never a traceback."""
    with caplog.at_level(logging.DEBUG):
        yield
    loud = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


@pytest.fixture
def tiny_server(start_server: StartServer, tiny_repository: Path) -> RunningServer:
    return start_server(tiny_repository)


def test_client_text_is_quoted_and_shortened_with_its_length() -> None:
    assert client_text("mnist") == "'mnist'"
    assert client_text("a\nb") == "'a\\nb'"
    assert client_text("x" * 64) == repr("x" * 64)
    assert client_text("x" * 65) == f"{'x' * 64!r}... (65 characters)"
    assert client_text("reason " * 10, 10, quote=False) == "reason rea... (70 characters)"


NOT_PLAIN_DIGITS = {
    "superscript-two": "²",  # str.isdigit() is true for it, int() refuses it
    "arabic-indic-three": "٣",  # int() reads it as 3
    "leading-space": " 1",
    "negative": "-3",
    "exponent": "1e3",
    "empty": "",
    "5000-digits": "7" * 5000,  # int() refuses strings past 4,300 digits
}


@pytest.mark.parametrize("value", NOT_PLAIN_DIGITS.values(), ids=NOT_PLAIN_DIGITS.keys())
def test_integer_parameters_not_in_ascii_digits_are_invalid_argument(
    tiny_server: RunningServer, value: str
) -> None:
    stub = tiny_server.inference_stub()
    request = infer_request(random_images(1, seed=1))
    request.outputs.add(name="logits").parameters["classification"].string_param = value
    error = rpc_error(stub.ModelInfer, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(
        "parameter classification must be an integer in 1..100 (int64_param, uint64_param, "
        f"or string_param of ASCII digits); got string_param {client_text(value)}"
    )
    request = infer_request(random_images(1, seed=1))
    request.parameters["timeout"].string_param = value
    error = rpc_error(stub.ModelInfer, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("parameter timeout must be an integer in 0..")
    assert len(error.details()) < SHORT
    assert_still_serving(tiny_server)


def test_integer_parameters_out_of_range_or_of_another_type_are_invalid_argument(
    tiny_server: RunningServer,
) -> None:
    stub = tiny_server.inference_stub()
    cases = {
        "uint64_param": (2**64 - 1, "must be in 0..9223372036854775807, got 18446744073709551615"),
        "double_param": (1.5, "got double_param 1.5"),
        "bool_param": (True, "got bool_param true"),
    }
    for field, (value, message) in cases.items():
        request = infer_request(random_images(1, seed=1))
        setattr(request.parameters["timeout"], field, value)
        error = rpc_error(stub.ModelInfer, request, timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert message in error.details()
    assert_still_serving(tiny_server)


def long_text_requests() -> dict[str, tuple[str, object, grpc.StatusCode]]:
    """Each field a client can fill with text, filled with 8 KiB: (rpc, request, code)."""
    images = random_images(1, seed=2)
    named_input = infer_request(images)
    named_input.inputs[0].name = LONG
    datatype = infer_request(images)
    datatype.inputs[0].datatype = LONG
    output = infer_request(images)
    output.outputs.add(name=LONG)
    classification = infer_request(images)
    classification.outputs.add(name="logits").parameters["classification"].string_param = LONG
    timeout = infer_request(images)
    timeout.parameters["timeout"].string_param = LONG
    png = encode_image(np.zeros((28, 28), dtype=np.uint8))
    not_found, invalid = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    return {
        "ModelInfer model_name": ("ModelInfer", infer_request(images, model=LONG), not_found),
        "ModelInfer model_version": (
            "ModelInfer", infer_request(images, model_version=LONG), not_found,
        ),
        "ModelMetadata name": ("ModelMetadata", pb2.ModelMetadataRequest(name=LONG), not_found),
        "ModelMetadata version": (
            "ModelMetadata", pb2.ModelMetadataRequest(name="tiny", version=LONG), not_found,
        ),
        "Classify model_name": (
            "Classify", cls_pb2.ClassifyRequest(images=[png], model_name=LONG), not_found,
        ),
        "Classify model_version": (
            "Classify", cls_pb2.ClassifyRequest(images=[png], model_version=LONG), not_found,
        ),
        "input name": ("ModelInfer", named_input, invalid),
        "datatype": ("ModelInfer", datatype, invalid),
        "output name": ("ModelInfer", output, invalid),
        "classification": ("ModelInfer", classification, invalid),
        "timeout": ("ModelInfer", timeout, invalid),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(long_text_requests()))
def test_long_client_text_is_shortened_in_the_message(
    tiny_server: RunningServer, case: str
) -> None:
    # Echoed whole, 8 KiB of text made the status message exceed gRPC's metadata limit, and
    # the client got RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead.
    rpc, request, code = long_text_requests()[case]
    stub = tiny_server.classification_stub() if rpc == "Classify" else tiny_server.inference_stub()
    error = rpc_error(getattr(stub, rpc), request, timeout=10)
    assert error.code() == code, error.details()
    assert LONG_MARK in error.details()
    assert len(error.details()) < SHORT
    assert_still_serving(tiny_server)


def test_model_ready_with_long_names_is_false(tiny_server: RunningServer) -> None:
    stub = tiny_server.inference_stub()
    assert not stub.ModelReady(pb2.ModelReadyRequest(name=LONG), timeout=10).ready
    assert not stub.ModelReady(pb2.ModelReadyRequest(name="tiny", version=LONG), timeout=10).ready


@pytest.mark.parametrize("field", ["fp32_contents", "int_contents", "bytes_contents"])
def test_raw_and_typed_contents_together_are_invalid_argument(
    tiny_server: RunningServer, field: str
) -> None:
    request = infer_request(random_images(1, seed=3))
    value = {"fp32_contents": 1.0, "int_contents": 1, "bytes_contents": b"1"}[field]
    getattr(request.inputs[0].contents, field).append(value)
    error = rpc_error(tiny_server.inference_stub().ModelInfer, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"input images has both raw_input_contents and contents.{field}; "
        "use either raw_input_contents or contents, not both"
    )
    assert_still_serving(tiny_server)


def test_typed_contents_in_the_wrong_field_are_invalid_argument(
    tiny_server: RunningServer,
) -> None:
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
    tensor.contents.fp32_contents.extend([0.0] * 28 * 28)
    error = rpc_error(tiny_server.inference_stub().ModelInfer, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "input images is UINT8, whose typed contents go in contents.uint_contents; "
        "got contents.fp32_contents"
    )


def test_a_version_on_disk_but_not_served_is_described_as_it_is(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_version(tmp_path, "tiny", 1, TinySpec())
    (tmp_path / "tiny" / "2").mkdir()  # no model.onnx (yet): on disk, not servable
    running = start_server(tmp_path)
    request = infer_request(random_images(1, seed=4), model_version="2")
    error = rpc_error(running.inference_stub().ModelInfer, request, timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == (
        "model tiny version '2' is not served; ready versions: 1 (version policy: latest 1; "
        "versions on disk: 1, 2 (2 without model.onnx))"
    )


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "TGA"])
def test_images_in_formats_not_allowed_are_invalid_argument(
    tiny_server: RunningServer, fmt: str
) -> None:
    data = encode_image(np.zeros((28, 28), dtype=np.uint8), fmt)
    stub = tiny_server.classification_stub()
    error = rpc_error(stub.Classify, cls_pb2.ClassifyRequest(images=[data]), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"image 0: cannot decode the image ({len(data)} bytes): not an image in an accepted "
        "format; accepted: PNG, JPEG, BMP, GIF, TIFF, WEBP"
    )


def test_default_pixel_limit_takes_a_phone_photo_and_refuses_past_4096_squared(
    tiny_server: RunningServer,
) -> None:
    stub = tiny_server.classification_stub()
    photo = encode_image(np.zeros((3000, 4000), dtype=np.uint8), "JPEG")  # 12 megapixels
    assert len(stub.Classify(cls_pb2.ClassifyRequest(images=[photo]), timeout=30).results) == 1
    error = rpc_error(
        stub.Classify, cls_pb2.ClassifyRequest(images=[png_header_only(4097, 4096)]), timeout=10
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "image 0: the image is 4097x4096 = 16781312 pixels; the limit is 16777216 pixels"
    )


def test_the_server_decodes_only_the_image_formats_it_was_given(
    start_server: StartServer, tiny_repository: Path
) -> None:
    running = start_server(tiny_repository, image_formats=("PNG",))
    stub = running.classification_stub()
    png = encode_image(np.zeros((28, 28), dtype=np.uint8), "PNG")
    assert len(stub.Classify(cls_pb2.ClassifyRequest(images=[png]), timeout=30).results) == 1
    jpeg = encode_image(np.zeros((28, 28), dtype=np.uint8), "JPEG")
    error = rpc_error(stub.Classify, cls_pb2.ClassifyRequest(images=[jpeg]), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().endswith("not an image in an accepted format; accepted: PNG")
