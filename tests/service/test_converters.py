"""service.wire.converters: protobuf <-> numpy, without gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from service._proto import grpc_service_pb2 as pb2
from service.engine.results import ScoredClass
from service.errors import InvalidInput
from service.repository.disk import ModelSpec, Preprocessing
from service.wire import converters

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


INTEGER_FORM = "(int64_param, uint64_param, or string_param of ASCII digits)"
FIVE_THOUSAND_DIGITS = "7" * 5000  # int() itself refuses strings past 4,300 digits


def set_parameter(parameter: pb2.InferParameter, value: object) -> None:
    field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}
    setattr(parameter, field[type(value)], value)


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("²", "got string_param '²'"),  # str.isdigit() is true for it
        ("٣", "got string_param '٣'"),  # Arabic-Indic three: int() reads it as 3
        (" 1", "got string_param ' 1'"),
        ("-3", "got string_param '-3'"),
        ("1e3", "got string_param '1e3'"),
        ("", "got string_param ''"),
        (FIVE_THOUSAND_DIGITS, "got string_param '7777"),
        (True, "got bool_param true"),
        (2.0, "got double_param 2.0"),
    ],
)
def test_classification_must_be_an_integer(value: object, got: str) -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    set_parameter(request.outputs.add(name="logits").parameters["classification"], value)
    with pytest.raises(InvalidInput) as caught:
        converters.requested_outputs(request, SPEC, max_top_k=10)
    message = str(caught.value)
    assert message.startswith(
        f"parameter classification must be an integer in 1..10 {INTEGER_FORM}"
    )
    assert got in message
    assert len(message) < 250


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("²", "got string_param '²'"),
        ("٣", "got string_param '٣'"),
        (" 1", "got string_param ' 1'"),
        ("-3", "got string_param '-3'"),
        ("1e3", "got string_param '1e3'"),
        (FIVE_THOUSAND_DIGITS, "... (5000 characters)"),
        ("92233720368547758070", "got string_param '92233720368547758070'"),  # 20 digits
        (False, "got bool_param false"),
        (0.5, "got double_param 0.5"),
    ],
)
def test_timeout_must_be_an_integer(value: object, got: str) -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    set_parameter(request.parameters["timeout"], value)
    with pytest.raises(InvalidInput) as caught:
        converters.request_timeout_s(request)
    message = str(caught.value)
    assert message.startswith(
        f"parameter timeout must be an integer in 0..9223372036854775807 {INTEGER_FORM}"
    )
    assert got in message
    assert len(message) < 250


@pytest.mark.parametrize(
    ("field", "value"),
    [("uint64_param", 2**64 - 1), ("string_param", "9223372036854775808"), ("int64_param", -1)],
)
def test_timeout_must_be_within_int64_microseconds(field: str, value: object) -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    setattr(request.parameters["timeout"], field, value)
    with pytest.raises(InvalidInput) as caught:
        converters.request_timeout_s(request)
    assert str(caught.value) == (
        f"parameter timeout must be in 0..9223372036854775807, got {int(value)}"  # type: ignore[call-overload]
    )


def test_integer_parameters_are_read_from_every_integer_form() -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    request.outputs.add(name="logits").parameters["classification"].string_param = "3"
    request.outputs.add(name="logits").parameters["classification"].uint64_param = 10
    outputs = converters.requested_outputs(request, SPEC, max_top_k=10)
    assert [o.classification for o in outputs] == [3, 10]
    request.parameters["timeout"].string_param = "0250000"
    assert converters.request_timeout_s(request) == pytest.approx(0.25)


def test_timeout_parameter_is_microseconds() -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    assert converters.request_timeout_s(request) is None
    request.parameters["timeout"].int64_param = 250_000
    assert converters.request_timeout_s(request) == pytest.approx(0.25)
    request.parameters["timeout"].int64_param = 0  # Triton's "no timeout"
    assert converters.request_timeout_s(request) is None


TYPED_FIELDS = sorted(set(converters.CONTENTS_FIELDS.values()))


ONE_ELEMENT = {"bool_contents": True, "bytes_contents": b"x", "fp32_contents": 0.5}


def add_typed_elements(tensor: pb2.InferInputTensor, field: str, count: int = 1) -> None:
    getattr(tensor.contents, field).extend([ONE_ELEMENT.get(field, 1)] * count)


@pytest.mark.parametrize("field", TYPED_FIELDS)
def test_raw_contents_with_any_typed_contents_are_refused(field: str) -> None:
    request = raw_request(np.zeros((2, 1, 4, 5), dtype=np.uint8))
    add_typed_elements(request.inputs[0], field)
    with pytest.raises(InvalidInput) as caught:
        converters.checked_input(request, SPEC)
    assert str(caught.value) == (
        f"input images has both raw_input_contents and contents.{field}; "
        "use either raw_input_contents or contents, not both"
    )


@pytest.mark.parametrize("field", [f for f in TYPED_FIELDS if f != "uint_contents"])
def test_typed_contents_in_another_field_than_uint8s_are_refused(field: str) -> None:
    request = pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 4, 5])
    add_typed_elements(tensor, field, count=20)
    with pytest.raises(InvalidInput) as caught:
        converters.checked_input(request, SPEC)
    assert str(caught.value) == (
        "input images is UINT8, whose typed contents go in contents.uint_contents; "
        f"got contents.{field}"
    )


LONG = "x" * 8192


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda r: setattr(r.inputs[0], "name", LONG),
            f"unknown input {LONG[:64]!r}... (8192 characters); model tiny expects",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", LONG),
            f"input images has datatype {LONG[:64]!r}... (8192 characters); model tiny expects",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FP\n32"),
            "input images has datatype 'FP\\n32'; model tiny expects",
        ),
        (
            lambda r: r.inputs[0].shape.extend([1] * 10_000),
            "input images has shape [2, 1, 4, 5, 1, 1, 1, 1, ...] (10004 dimensions); model tiny",
        ),
    ],
)
def test_client_text_is_quoted_shortened_in_input_errors(mutate, message: str) -> None:
    request = raw_request(np.zeros((2, 1, 4, 5), dtype=np.uint8))
    mutate(request)
    with pytest.raises(InvalidInput) as caught:
        converters.checked_input(request, SPEC)
    assert str(caught.value).startswith(message)
    assert len(str(caught.value)) < 250


def test_a_long_output_name_is_shortened() -> None:
    request = raw_request(np.zeros((1, 1, 4, 5), dtype=np.uint8))
    request.outputs.add(name=LONG)
    with pytest.raises(InvalidInput) as caught:
        converters.requested_outputs(request, SPEC, max_top_k=10)
    message = str(caught.value)
    assert (
        message
        == f"unknown output {LONG[:64]!r}... (8192 characters); model tiny has one output: logits"
    )


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
