"""Protobuf <-> numpy for the KServe V2 and Classify messages. Pure: no gRPC, no I/O.

Checks every request against the model's signature and says what was expected; builds
responses with raw output contents, and the classification extension's
`"<score>:<index>:<label>"` BYTES tensors (Triton's format, score = the raw output value).
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service._proto import classification_pb2 as cls_pb2
from service._proto import grpc_service_pb2 as pb2
from service.engine.explain import Explanation
from service.engine.results import ScoredClass, top_k
from service.errors import InvalidInput, client_text
from service.repository.disk import ModelSpec

PLATFORM = "onnxruntime_onnx"

NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(kind)
    for name, kind in {
        "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
        "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
        "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
    }.items()
}  # fmt: skip
DATATYPES = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
CLASSIFICATION = "classification"


@dataclass(frozen=True)
class RequestedOutput:
    """An output to return; `classification` = k asks for the top-k BYTES form."""

    name: str
    classification: int | None = None


def input_shape(spec: ModelSpec) -> list[int]:
    return [-1, *spec.input_shape]


def output_shape(spec: ModelSpec) -> list[int]:
    return [-1, len(spec.labels)]


def _describe(spec: ModelSpec) -> str:
    shape = ", ".join(map(str, input_shape(spec)))
    return f"model {spec.name} expects one input: {spec.preprocessing.input_name} UINT8 [{shape}]"


# Typed contents above this many elements are converted off the event loop (a pass over a
# Python-level repeated field: about 10 ms per million elements, too long to block the loop).
INLINE_CONVERSION_LIMIT = 1_000_000


@dataclass(slots=True)
class CheckedInput:
    """A request's input, checked against the model (names, datatype, shape, element count)
    but not yet converted: `convert()` makes the uint8 [N, C, H, W] array."""

    shape: tuple[int, ...]
    convert: Callable[[], np.ndarray]
    typed: bool

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def costly(self) -> bool:
        """True when convert() is a long pass over typed contents: run it in a thread."""
        return self.typed and self.elements > INLINE_CONVERSION_LIMIT


def decode_input(request: pb2.ModelInferRequest, spec: ModelSpec) -> np.ndarray:
    """The request's one input as uint8 [N, C, H, W], checked against the model."""
    return checked_input(request, spec).convert()


def checked_input(request: pb2.ModelInferRequest, spec: ModelSpec) -> CheckedInput:
    """Checks the request's one input against the model, converting nothing: a payload whose
    element count does not match its (already checked) shape is refused before any pass."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"the request has {len(request.inputs)} inputs; {_describe(spec)}")
    tensor = request.inputs[0]
    if tensor.name != spec.preprocessing.input_name:
        raise InvalidInput(f"unknown input {client_text(tensor.name)}; {_describe(spec)}")
    # From here on tensor.name is the model's own input name: safe to put in messages.
    if tensor.datatype != "UINT8":
        datatype = _datatype_text(tensor.datatype)
        raise InvalidInput(f"input {tensor.name} has datatype {datatype}; {_describe(spec)}")
    shape = list(tensor.shape)
    if len(shape) != 4 or tuple(shape[1:]) != spec.input_shape or shape[0] < 1:
        raise InvalidInput(
            f"input {tensor.name} has shape {_shape_text(shape)}; {_describe(spec)} (N >= 1)"
        )
    count = math.prod(shape)
    typed_fields = (
        [field.name for field, _ in tensor.contents.ListFields()]
        if tensor.HasField("contents")
        else []
    )
    if request.raw_input_contents:
        if typed_fields:
            raise InvalidInput(
                f"input {tensor.name} has both raw_input_contents and contents."
                f"{typed_fields[0]}; use either raw_input_contents or contents, not both"
            )
        return _checked_raw(request, tensor.name, shape, count)
    expected = CONTENTS_FIELDS["UINT8"]
    wrong = [name for name in typed_fields if name != expected]
    if wrong:
        raise InvalidInput(
            f"input {tensor.name} is UINT8, whose typed contents go in contents.{expected}; "
            f"got contents.{wrong[0]}"
        )
    values = tensor.contents.uint_contents
    if len(values) != count:
        raise InvalidInput(
            f"input {tensor.name}: contents.{expected} has {len(values)} elements; "
            f"shape {shape} needs {count}"
        )
    return CheckedInput(
        tuple(shape), lambda: typed_to_uint8(tensor.name, values, shape), typed=True
    )


def _checked_raw(
    request: pb2.ModelInferRequest, name: str, shape: list[int], count: int
) -> CheckedInput:
    if len(request.raw_input_contents) != 1:
        raise InvalidInput(
            f"raw_input_contents has {len(request.raw_input_contents)} entries; "
            "expected one per input (1)"
        )
    raw = request.raw_input_contents[0]
    if len(raw) != count:
        raise InvalidInput(
            f"input {name}: raw contents are {len(raw)} bytes; shape {shape} of UINT8 "
            f"needs {count} bytes"
        )
    return CheckedInput(
        tuple(shape), lambda: np.frombuffer(raw, dtype=np.uint8).reshape(shape), typed=False
    )


def _datatype_text(datatype: str) -> str:
    """A client's datatype for a message: a known one as is, anything else quoted."""
    if datatype in NUMPY_DTYPES or datatype == "BYTES":
        return datatype
    return client_text(datatype) if datatype else "(none)"


def _shape_text(shape: Sequence[int]) -> str:
    """A client's shape for a message: in full up to 8 dimensions (any count can be sent)."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:8]))}, ...] ({len(shape)} dimensions)"


def typed_to_uint8(name: str, values: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Typed UINT8 contents (uint32 on the wire) as a uint8 array, each checked to be 0..255."""
    wide = np.asarray(values, dtype=np.uint32)
    if wide.max(initial=0) > 255:
        raise InvalidInput(f"input {name}: UINT8 elements must be 0..255, got {wide.max()}")
    return wide.astype(np.uint8).reshape(shape)


INT64_MAX = 2**63 - 1
# A string parameter holds an integer as plain ASCII digits ("250000"), as tritonclient sends
# it: str.isdigit() alone also takes "²" and "٣", which int() then refuses or reads.
DIGITS = re.compile(r"[0-9]{1,19}")
INTEGER_FORM = "int64_param, uint64_param, or string_param of ASCII digits"


def _int_parameter(parameter: pb2.InferParameter, what: str, low: int, high: int) -> int:
    """The integer value of a request parameter, refused unless it is one in low..high."""
    expected = f"parameter {what} must be an integer in {low}..{high} ({INTEGER_FORM})"
    kind = parameter.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        value = int(getattr(parameter, kind))
    elif kind == "string_param" and DIGITS.fullmatch(parameter.string_param):
        value = int(parameter.string_param)
    elif kind == "string_param":
        raise InvalidInput(f"{expected}; got string_param {client_text(parameter.string_param)}")
    elif kind == "bool_param":
        raise InvalidInput(f"{expected}; got bool_param {str(parameter.bool_param).lower()}")
    elif kind == "double_param":
        raise InvalidInput(f"{expected}; got double_param {parameter.double_param!r}")
    else:
        raise InvalidInput(f"{expected}; got no value")
    if not low <= value <= high:
        raise InvalidInput(f"parameter {what} must be in {low}..{high}, got {value}")
    return value


def requested_outputs(
    request: pb2.ModelInferRequest, spec: ModelSpec, max_top_k: int
) -> list[RequestedOutput]:
    """The outputs to return (all of them when none are named), validated."""
    output_name = spec.preprocessing.output_name
    if not request.outputs:
        return _every_output(output_name)
    outputs = []
    for output in request.outputs:
        if output.name != output_name:
            raise InvalidInput(
                f"unknown output {client_text(output.name)}; model {spec.name} has one output: "
                f"{output_name}"
            )
        k = None
        if CLASSIFICATION in output.parameters:
            k = _int_parameter(output.parameters[CLASSIFICATION], CLASSIFICATION, 1, max_top_k)
        outputs.append(RequestedOutput(output.name, k))
    return outputs


@functools.lru_cache(maxsize=64)
def _every_output(output_name: str) -> list[RequestedOutput]:
    """What a request that names no output gets (one list per model output, shared: callers
    only read it)."""
    return [RequestedOutput(output_name)]


def request_timeout_s(request: pb2.ModelInferRequest) -> float | None:
    """Triton's optional `timeout` request parameter (µs) in seconds; None when absent or 0."""
    if "timeout" not in request.parameters:
        return None
    timeout_us = _int_parameter(request.parameters["timeout"], "timeout", 0, INT64_MAX)
    return timeout_us / 1e6 if timeout_us > 0 else None


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES raw layout: each element prefixed by its length as 4-byte little-endian."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """The inverse of serialize_bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return elements


def classification_strings(values: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Top-k of each row as `score:index:label`, best first, row-major ([N, k] flattened)."""
    return [
        f"{scored.score:f}:{scored.index}:{scored.label}".encode()
        for row in top_k(values, k, labels)
        for scored in row
    ]


def encode_infer_response(
    request: pb2.ModelInferRequest,
    spec: ModelSpec,
    outputs: Sequence[RequestedOutput],
    values: np.ndarray,
) -> pb2.ModelInferResponse:
    """The response with every output in raw_output_contents, in the requested order."""
    response = pb2.ModelInferResponse(
        model_name=spec.name, model_version=str(spec.version), id=request.id
    )
    for output in outputs:
        tensor = response.outputs.add(name=output.name)
        if output.classification is None:
            tensor.datatype = DATATYPES[values.dtype]
            tensor.shape.extend(values.shape)
            response.raw_output_contents.append(np.ascontiguousarray(values).tobytes())
        else:
            k = min(output.classification, values.shape[1])
            strings = classification_strings(values, k, spec.labels)
            tensor.datatype = "BYTES"
            tensor.shape.extend([values.shape[0], k])
            response.raw_output_contents.append(serialize_bytes(strings))
    return response


def model_metadata(
    spec: ModelSpec, versions: Sequence[str] | None = None
) -> pb2.ModelMetadataResponse:
    """KServe model metadata: the ready versions (default: the spec's), platform, input and
    output tensors (of the version asked for, else the newest)."""
    tensor = pb2.ModelMetadataResponse.TensorMetadata
    return pb2.ModelMetadataResponse(
        name=spec.name,
        versions=list(versions) if versions is not None else [str(spec.version)],
        platform=PLATFORM,
        inputs=[
            tensor(name=spec.preprocessing.input_name, datatype="UINT8", shape=input_shape(spec))
        ],
        outputs=[
            tensor(name=spec.preprocessing.output_name, datatype="FP32", shape=output_shape(spec))
        ],
    )


def explain_response(spec: ModelSpec, explanation: Explanation) -> cls_pb2.ExplainResponse:
    """The Explain answer: the unoccluded classes, the class explained, the drop per patch
    position and per pixel."""
    occlusion = explanation.occlusion
    probabilities = occlusion.probabilities[np.newaxis]
    (best,) = top_k(probabilities, min(5, len(spec.labels)), spec.labels)
    target = occlusion.target
    response = cls_pb2.ExplainResponse(
        model_name=spec.name,
        model_version=str(spec.version),
        target=cls_pb2.ScoredClass(
            label=spec.labels[target], index=target, score=float(occlusion.probabilities[target])
        ),
        rows=len(occlusion.tops),
        columns=len(occlusion.lefts),
        tops=occlusion.tops.tolist(),
        lefts=occlusion.lefts.tolist(),
        patch=occlusion.patch,
        drops=occlusion.drops.ravel().tolist(),
        height=occlusion.height,
        width=occlusion.width,
        pixel_drops=explanation.pixel_drops.ravel().tolist(),
    )
    for scored in best:
        response.classes.add(label=scored.label, index=scored.index, score=scored.score)
    return response


def classify_response(
    spec: ModelSpec, results: Sequence[Sequence[ScoredClass]]
) -> cls_pb2.ClassifyResponse:
    """The Classify answer: one Classification per image, classes best first."""
    response = cls_pb2.ClassifyResponse(model_name=spec.name, model_version=str(spec.version))
    for classes in results:
        entry = response.results.add()
        for scored in classes:
            entry.classes.add(label=scored.label, index=scored.index, score=scored.score)
    return response
