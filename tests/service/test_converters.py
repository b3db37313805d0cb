"""service.converters: protobuf <-> numpy, without gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from service import converters
from service._proto import grpc_service_pb2 as pb2
from service.errors import InvalidInput
from service.repository import ModelSpec, Preprocessing
from service.results import ScoredClass

SPEC = ModelSpec(
    name="tiny",
    version=3,
    labels=tuple("abcdefghij"),
    preprocessing=Preprocessing(height=4, width=5, channels=1, color_mode="L"),
)


def raw_request(
    images: np.ndarray, datatype: str = "UINT8", **kwargs: object
) -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name="tiny", id="req-1", **kwargs)  # type: ignore[arg-type]
    request.inputs.add(name="images", datatype=datatype, shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


def test_raw_input_is_decoded_to_the_same_array() -> None:
    images = np.arange(2 * 20, dtype=np.uint8).reshape(2, 1, 4, 5)
    decoded = converters.decode_input(raw_request(images), SPEC)
    np.testing.assert_array_equal(decoded, images)


def test_typed_contents_are_decoded() -> None:
    images = np.arange(20, dtype=np.uint8).reshape(1, 1, 4, 5)
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 4, 5])
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    np.testing.assert_array_equal(converters.decode_input(request, SPEC), images)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: setattr(r.inputs[0], "name", "pixels"), "unknown input 'pixels'"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "datatype FP32"),
        (lambda r: r.inputs[0].shape.__setitem__(2, 7), "shape [2, 1, 7, 5]"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 3), "raw contents are 3 bytes"),
        (lambda r: r.inputs.add(name="extra"), "2 inputs"),
        (lambda r: r.inputs[0].contents.uint_contents.append(1), "either raw_input_contents"),
    ],
)
def test_bad_inputs_name_the_problem_and_the_expectation(mutate, message: str) -> None:
    request = raw_request(np.zeros((2, 1, 4, 5), dtype=np.uint8))
    mutate(request)
    with pytest.raises(InvalidInput) as caught:
        converters.decode_input(request, SPEC)
    assert message in str(caught.value)
    if "unknown input" in message or "datatype" in message or "shape" in message:
        assert "images UINT8 [-1, 1, 4, 5]" in str(caught.value)


def test_typed_contents_out_of_uint8_range_are_refused() -> None:
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 4, 5])
    tensor.contents.uint_contents.extend([300] * 20)
    with pytest.raises(InvalidInput, match=r"0\.\.255"):
        converters.decode_input(request, SPEC)


def test_classification_strings_follow_triton_format() -> None:
    values = np.array([[0.5, 2.0, -1.0], [3.0, 3.0, 1.0]], dtype=np.float32)
    strings = converters.classification_strings(values, 2, ["x", "y", "z"])
    assert strings == [b"2.000000:1:y", b"0.500000:0:x", b"3.000000:0:x", b"3.000000:1:y"]


def test_bytes_serialization_round_trips() -> None:
    elements = [b"", b"a", b"hello:1:x" * 10]
    raw = converters.serialize_bytes(elements)
    assert raw[:4] == b"\x00\x00\x00\x00"
    assert converters.deserialize_bytes(raw) == elements


def test_response_carries_raw_logits_and_classification() -> None:
    request = raw_request(np.zeros((2, 1, 4, 5), dtype=np.uint8))
    request.outputs.add(name="logits")
    classification = request.outputs.add(name="logits")
    classification.parameters["classification"].int64_param = 3
    outputs = converters.requested_outputs(request, SPEC, max_top_k=10)
    values = np.arange(20, dtype=np.float32).reshape(2, 10)
    response = converters.encode_infer_response(request, SPEC, outputs, values)
    assert (response.model_name, response.model_version, response.id) == ("tiny", "3", "req-1")
    assert [o.datatype for o in response.outputs] == ["FP32", "BYTES"]
    assert list(response.outputs[0].shape) == [2, 10]
    assert list(response.outputs[1].shape) == [2, 3]
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(logits, values)
    top = converters.deserialize_bytes(response.raw_output_contents[1])
    assert top[:3] == [b"9.000000:9:j", b"8.000000:8:i", b"7.000000:7:h"]


def test_no_requested_outputs_means_all_outputs() -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    assert converters.requested_outputs(request, SPEC, 10) == [converters.RequestedOutput("logits")]


@pytest.mark.parametrize(
    ("name", "k", "message"),
    [("probs", None, "unknown output 'probs'"), ("logits", 0, "1..10"), ("logits", 11, "1..10")],
)
def test_bad_requested_outputs_are_refused(name: str, k: int | None, message: str) -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    output = request.outputs.add(name=name)
    if k is not None:
        output.parameters["classification"].int64_param = k
    with pytest.raises(InvalidInput, match=message):
        converters.requested_outputs(request, SPEC, max_top_k=10)


def test_non_integer_classification_parameter_is_refused() -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    request.outputs.add(name="logits").parameters["classification"].bool_param = True
    with pytest.raises(InvalidInput, match="classification must be an integer"):
        converters.requested_outputs(request, SPEC, max_top_k=10)


def test_timeout_parameter_is_microseconds() -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    assert converters.request_timeout_s(request) is None
    request.parameters["timeout"].int64_param = 250_000
    assert converters.request_timeout_s(request) == pytest.approx(0.25)


def test_model_metadata_describes_the_tensors() -> None:
    metadata = converters.model_metadata(SPEC)
    assert list(metadata.versions) == ["3"]
    assert metadata.platform == "onnxruntime_onnx"
    assert (metadata.inputs[0].name, metadata.inputs[0].datatype) == ("images", "UINT8")
    assert list(metadata.inputs[0].shape) == [-1, 1, 4, 5]
    assert list(metadata.outputs[0].shape) == [-1, 10]


def test_classify_response_keeps_image_order() -> None:
    results = [[ScoredClass("b", 1, 0.9)], [ScoredClass("a", 0, 0.6), ScoredClass("c", 2, 0.4)]]
    response = converters.classify_response(SPEC, results)
    assert [[c.label for c in r.classes] for r in response.results] == [["b"], ["a", "c"]]
    assert response.results[1].classes[0].score == pytest.approx(0.6)


def test_typed_contents_not_matching_the_shape_are_refused_before_any_conversion() -> None:
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[3, 1, 4, 5])
    tensor.contents.uint_contents.extend([7] * 59)
    with pytest.raises(InvalidInput, match=r"has 59 elements; shape \[3, 1, 4, 5\] needs 60"):
        converters.checked_input(request, SPEC)


def test_only_large_typed_contents_are_costly(monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.arange(2 * 20, dtype=np.uint8).reshape(2, 1, 4, 5)
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[2, 1, 4, 5])
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    checked = converters.checked_input(request, SPEC)
    assert (checked.shape, checked.elements, checked.costly) == ((2, 1, 4, 5), 40, False)
    monkeypatch.setattr(converters, "INLINE_CONVERSION_LIMIT", 39)
    assert checked.costly
    assert not converters.checked_input(raw_request(images), SPEC).costly  # raw: no copy
    np.testing.assert_array_equal(checked.convert(), images)
