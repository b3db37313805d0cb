"""Bad requests: 12,000 generated malformed calls, each refused with INVALID_ARGUMENT, NOT_FOUND
or RESOURCE_EXHAUSTED and a message; no traceback or ERROR in the server log; RSS and open
descriptors bounded; correct answers afterwards.

The calls come from a seeded generator (the same seed makes the same calls, and a failure
names the case that caused it), in three categories mixed at random: mutations of a valid
ModelInfer request, Classify requests with broken images or arguments, and bytes that are not
a protobuf sent to both RPCs. Every call goes out as bytes (`unary_unary` without
serializers), so the protobuf messages and the garbage travel the same way.
"""

from __future__ import annotations

import asyncio
import io
import random
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from PIL import Image

from service._proto import classification_pb2 as cls_pb2
from service._proto import classification_pb2_grpc as cls_grpc
from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.engine.images import DEFAULT_IMAGE_FORMATS
from tests.faults.clients import (
    CHANNEL_OPTIONS,
    Outcomes,
    classify_request,
    images,
    infer_request,
    png,
)
from tests.faults.conftest import FaultServer
from tests.model_factory import TinySpec, reference_logits
from tests.service.gates import wait_until
from tests.service.test_images import png_header_only

pytestmark = pytest.mark.faults

SEED = 20240607
COUNTS = {"ModelInfer": 5000, "Classify": 4000, "not protobuf": 3000}
WARM_UP = 1000  # calls before RSS and descriptors are first read
CONCURRENCY = 32
ALLOWED = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
MAX_DETAILS = 1000  # service.wire.status caps messages at 1,000 characters
RSS_GROWTH_MB = 64  # allowed growth over 11,000 calls after the warm-up: ~6 KB per call
FD_SLACK = 4
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY_PATH = "/convserve.v1.ImageClassification/Classify"

LONG = "x" * 8192  # past gRPC's 8 KiB metadata limit if echoed whole into a message
UNICODE = (
    "tïny", "模型", "🙂", "\uff54\uff49\uff4e\uff59", "tiny\u200b", "\x00", "a\nb", "é" * 300,
)  # fmt: skip
KNOWN_DATATYPES = (
    "BOOL", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
    "FP64", "BYTES", "BF16", "uint8", "UINT8 ",
)  # fmt: skip
CONTENTS_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp32_contents", "fp64_contents", "bytes_contents",
)  # fmt: skip
NOT_INTEGERS = ("²", "٣", "-3", "1e3", "", " 1", "1 ", "0x10", "1.5", "\uff11", "7" * 5000)
DISALLOWED_FORMATS = ("EPS", "PCX", "TGA", "PPM", "SGI", "ICO", "DIB")


@dataclass(frozen=True)
class Case:
    """One bad call: its category and kind (for the figures), what was done, the bytes sent."""

    category: str
    kind: str
    note: str
    path: str
    payload: bytes


def encoded(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def undecodable(data: bytes) -> bool:
    """True when Pillow, limited to the server's default formats, cannot decode `data`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=DEFAULT_IMAGE_FORMATS) as image:
                image.load()
    except Exception:
        return True
    return False


class BadRequests:
    """The seeded generator: `case(category)` makes one bad call of that category."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)

    def case(self, category: str) -> Case:
        make: Callable[[], Case] = {
            "ModelInfer": self.model_infer,
            "Classify": self.classify,
            "not protobuf": self.not_protobuf,
        }[category]
        return make()

    # -- shared pieces -----------------------------------------------------------------------

    def text(self, *, avoid: str) -> str:
        """A wrong name: random, long (8 KB), unicode, or a near miss of `avoid`."""
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:
            return LONG
        if choice == 1:
            return rng.choice(UNICODE)
        if choice == 2:
            return rng.choice(
                (avoid.swapcase(), avoid + " ", " " + avoid, avoid[:-1], avoid + "/1")
            )
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-./"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) + "~"

    def pixels(self, count: int) -> np.ndarray:
        return self.np_rng.integers(0, 256, size=(count, 1, 28, 28), dtype=np.uint8)

    def valid_infer(self) -> tuple[pb2.ModelInferRequest, int]:
        count = self.rng.randint(1, 4)
        return infer_request(self.pixels(count)), count

    # -- ModelInfer --------------------------------------------------------------------------

    def model_infer(self) -> Case:
        request, count = self.valid_infer()
        mutations = [
            self._input_name, self._datatype, self._shape, self._raw_size, self._raw_entries,
            self._raw_and_typed, self._typed_wrong_field, self._typed_too_large,
            self._typed_count, self._input_count, self._output_name, self._classification,
            self._timeout, self._model_name, self._model_version,
        ]  # fmt: skip
        mutate = self.rng.choice(mutations)
        note = mutate(request, count)
        kind = mutate.__name__.strip("_")
        return Case("ModelInfer", kind, note, INFER_PATH, request.SerializeToString())

    def _input_name(self, request: pb2.ModelInferRequest, count: int) -> str:
        request.inputs[0].name = self.text(avoid="images")
        return f"inputs[0].name={request.inputs[0].name[:60]!r}"

    def _datatype(self, request: pb2.ModelInferRequest, count: int) -> str:
        rng = self.rng
        request.inputs[0].datatype = rng.choice(
            (rng.choice(KNOWN_DATATYPES), "", LONG, self.text(avoid="UINT8"))
        )
        return f"datatype={request.inputs[0].datatype[:60]!r}"

    def _shape(self, request: pb2.ModelInferRequest, count: int) -> str:
        rng = self.rng
        while True:
            choice = rng.randrange(5)
            if choice == 0:  # wrong rank
                rank = rng.choice((0, 1, 2, 3, 5, 6, 100))
                shape = [rng.choice((count, 1, 28, 784)) for _ in range(rank)]
            elif choice == 1:  # zero or negative batch
                shape = [rng.choice((0, -1, -(2**63))), 1, 28, 28]
            elif choice == 2:  # huge dimensions
                shape = [rng.choice((2**31, 2**62, 2**63 - 1)), 1, 28, rng.choice((28, 2**40))]
            elif choice == 3:  # wrong C, H or W
                shape = [count, rng.choice((1, 3)), rng.choice((28, 32)), rng.choice((28, 1))]
            else:  # negative C, H or W
                shape = [count, 1, 28, 28]
                shape[rng.randint(1, 3)] = rng.choice((-1, -28, 0))
            if len(shape) != 4 or shape[0] < 1 or shape[1:] != [1, 28, 28]:
                break
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)
        return f"shape={shape[:8]} ({len(shape)} dims)"

    def _raw_size(self, request: pb2.ModelInferRequest, count: int) -> str:
        size = count * 784
        wrong = self.rng.choice((0, 1, size - 1, size + 1, size // 2, size * 2, 783))
        if wrong == size:
            wrong += 1
        request.raw_input_contents[0] = self.rng.randbytes(wrong)
        return f"raw {wrong} bytes for {count} images"

    def _raw_entries(self, request: pb2.ModelInferRequest, count: int) -> str:
        extra = self.rng.randint(1, 4)
        for _ in range(extra):
            request.raw_input_contents.append(request.raw_input_contents[0])
        return f"{1 + extra} raw entries"

    def _fill(self, contents: pb2.InferTensorContents, field: str, count: int) -> None:
        values: list[object]
        if field == "bool_contents":
            values = [bool(self.rng.getrandbits(1)) for _ in range(count)]
        elif field == "bytes_contents":
            values = [self.rng.randbytes(2) for _ in range(count)]
        elif field.startswith("fp"):
            values = [self.rng.random() for _ in range(count)]
        else:
            values = [self.rng.randint(0, 127) for _ in range(count)]
        getattr(contents, field).extend(values)

    def _raw_and_typed(self, request: pb2.ModelInferRequest, count: int) -> str:
        field = self.rng.choice(CONTENTS_FIELDS)
        self._fill(request.inputs[0].contents, field, self.rng.choice((1, count * 784)))
        return f"raw and contents.{field}"

    def _typed_wrong_field(self, request: pb2.ModelInferRequest, count: int) -> str:
        del request.raw_input_contents[:]
        field = self.rng.choice([f for f in CONTENTS_FIELDS if f != "uint_contents"])
        self._fill(request.inputs[0].contents, field, count * 784)
        return f"contents.{field} for UINT8"

    def _typed_too_large(self, request: pb2.ModelInferRequest, count: int) -> str:
        del request.raw_input_contents[:]
        values = [self.rng.randint(0, 255) for _ in range(count * 784)]
        values[self.rng.randrange(len(values))] = self.rng.choice((256, 1000, 2**32 - 1))
        request.inputs[0].contents.uint_contents.extend(values)
        return f"uint_contents with {max(values)}"

    def _typed_count(self, request: pb2.ModelInferRequest, count: int) -> str:
        del request.raw_input_contents[:]
        wrong = self.rng.choice((0, 1, count * 784 - 1, count * 784 + 1))
        request.inputs[0].contents.uint_contents.extend([7] * wrong)
        return f"uint_contents with {wrong} elements for {count} images"

    def _input_count(self, request: pb2.ModelInferRequest, count: int) -> str:
        if self.rng.getrandbits(1):
            del request.inputs[:]
            return "no inputs"
        request.inputs.add().CopyFrom(request.inputs[0])
        if self.rng.getrandbits(1):
            request.inputs[1].name = "other"
        request.raw_input_contents.append(request.raw_input_contents[0])
        return f"two inputs ({request.inputs[1].name})"

    def _output_name(self, request: pb2.ModelInferRequest, count: int) -> str:
        name = self.rng.choice(("", LONG, self.text(avoid="logits")))
        if self.rng.getrandbits(1):
            request.outputs.add(name="logits")
        request.outputs.add(name=name)
        return f"output {name[:60]!r}"

    def _bad_integer(self, parameter: pb2.InferParameter, low: int, high: int) -> str:
        rng = self.rng
        choice = rng.randrange(6)
        if choice == 0:
            parameter.string_param = rng.choice(NOT_INTEGERS)
        elif choice == 1:
            parameter.string_param = str(rng.choice((low - 1, high + 1, 10**19 - 1)))
            if low - 1 < 0:
                parameter.string_param = rng.choice(("9" * 19, "9" * 20))
        elif choice == 2:
            parameter.bool_param = bool(rng.getrandbits(1))
        elif choice == 3:
            parameter.double_param = rng.choice((0.5, 3.0, -1.0, float("nan"), float("inf")))
        elif choice == 4:
            parameter.int64_param = rng.choice((-1, -(2**63), min(high + 1, 2**63 - 1)))
            if parameter.int64_param >= low and parameter.int64_param <= high:
                parameter.int64_param = -1
        else:
            parameter.uint64_param = 2**64 - 1
        kind = parameter.WhichOneof("parameter_choice")
        return f"{kind}={str(getattr(parameter, kind))[:40]!r}"

    def _classification(self, request: pb2.ModelInferRequest, count: int) -> str:
        parameter = request.outputs.add(name="logits").parameters["classification"]
        if self.rng.randrange(10) == 0:
            return "classification parameter without a value"
        return "classification " + self._bad_integer(parameter, 1, 100)

    def _timeout(self, request: pb2.ModelInferRequest, count: int) -> str:
        parameter = request.parameters["timeout"]
        if self.rng.randrange(10) == 0:
            return "timeout parameter without a value"
        return "timeout " + self._bad_integer(parameter, 0, 2**63 - 1)

    def _model_name(self, request: pb2.ModelInferRequest, count: int) -> str:
        request.model_name = self.text(avoid="tiny")
        return f"model_name={request.model_name[:60]!r}"

    def _model_version(self, request: pb2.ModelInferRequest, count: int) -> str:
        version = self.rng.choice(("2", "0", "01", "-1", "abc", "1 ", LONG, "\u0661", "2" * 30))
        request.model_version = version
        return f"model_version={version[:60]!r}"

    # -- Classify ----------------------------------------------------------------------------

    def good_image(self) -> bytes:
        return png(self.pixels(1)[0])

    def broken_image(self) -> tuple[str, bytes]:
        """An image in an allowed format, truncated or with bytes overwritten, that Pillow
        cannot decode (checked here, so that the server's answer must be a refusal)."""
        rng = self.rng
        while True:
            image_format = rng.choice(DEFAULT_IMAGE_FORMATS)
            mode = rng.choice(("L", "RGB"))
            shape = (rng.randint(8, 64), rng.randint(8, 64)) + ((3,) if mode == "RGB" else ())
            data = bytearray(encoded(self.np_rng.integers(0, 256, shape, np.uint8), image_format))
            if rng.getrandbits(1):
                how = "truncated"
                data = data[: rng.randint(1, len(data) - 1)]
            else:
                how = "overwritten"
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            if undecodable(bytes(data)):
                return f"{how} {image_format}", bytes(data)

    def bad_image(self) -> tuple[str, str, bytes]:
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:
            data = rng.randbytes(rng.randint(1, 2000))
            if not undecodable(data):
                data = b""
            return "random", f"{len(data)} random bytes", data
        if choice == 1:
            note, data = self.broken_image()
            return "broken", note, data
        if choice == 2:
            return "empty", "an empty image", b""
        if choice == 3:
            width, height = rng.choice(
                ((100_000, 100_000), (5000, 5000), (2**31 - 1, 1), (9000, 9000), (20_000, 5000))
            )
            return "huge", f"PNG header {width}x{height}", png_header_only(width, height)
        image_format = rng.choice(DISALLOWED_FORMATS)
        return "format", image_format, encoded(self.pixels(1)[0, 0], image_format)

    def classify(self) -> Case:
        rng = self.rng
        request = cls_pb2.ClassifyRequest(model_name="tiny", top_k=rng.choice((0, 1, 3, 10)))
        choice = rng.randrange(10)
        if choice < 5:  # a bad image among good ones
            kind, note, data = self.bad_image()
            request.images.extend(self.good_image() for _ in range(rng.randint(0, 2)))
            position = rng.randint(0, len(request.images))
            request.images.insert(position, data)
            note = f"image {position} of {len(request.images)}: {note}"
        elif choice == 5:
            request.images.append(self.good_image())
            request.top_k = rng.choice((101, 1000, 2**32 - 1))
            kind, note = "top_k", f"top_k={request.top_k}"
        elif choice == 6:
            request.images.append(self.good_image())
            request.model_name = self.text(avoid="tiny")
            kind, note = "model", f"model_name={request.model_name[:60]!r}"
        elif choice == 7:
            request.images.append(self.good_image())
            request.model_version = rng.choice(("2", "abc", LONG, "0", "1 "))
            kind, note = "version", f"model_version={request.model_version[:60]!r}"
        elif choice == 8:
            kind, note = "no images", "no images"
        else:  # more images than the queue holds: refused before any is decoded
            request.images.extend([b""] * rng.randint(513, 600))
            kind, note = "too many", f"{len(request.images)} empty images"
        return Case("Classify", kind, note, CLASSIFY_PATH, request.SerializeToString())

    # -- bytes that are not a protobuf -------------------------------------------------------

    def not_protobuf(self) -> Case:
        rng = self.rng
        path = rng.choice((INFER_PATH, CLASSIFY_PATH))
        rpc = path.rsplit("/", 1)[1]
        if path == INFER_PATH and rng.randrange(4) == 0:
            # A valid request cut short: raw_input_contents (the last field) is never complete.
            whole = self.valid_infer()[0].SerializeToString()
            cut = rng.randint(1, len(whole) - 1)
            return Case("not protobuf", f"{rpc} cut", f"{cut} of {len(whole)} bytes", path,
                        whole[:cut])  # fmt: skip
        size = rng.randint(1, 2000)
        return Case("not protobuf", f"{rpc} random", f"{size} random bytes", path,
                    rng.randbytes(size))  # fmt: skip


def generate(seed: int) -> list[Case]:
    generator = BadRequests(seed)
    categories = [name for name, count in COUNTS.items() for _ in range(count)]
    generator.rng.shuffle(categories)
    return [generator.case(category) for category in categories]


@dataclass(frozen=True)
class Answer:
    case: Case
    code: str
    details: str


async def send_all(
    channel: grpc.aio.Channel, cases: list[Case], outcomes: Outcomes
) -> list[Answer]:
    """Sends every case, CONCURRENCY calls at a time; returns the answers in case order."""
    calls = {path: channel.unary_unary(path) for path in (INFER_PATH, CLASSIFY_PATH)}
    answers: list[Answer | None] = [None] * len(cases)
    pending = iter(range(len(cases)))

    async def client() -> None:
        for index in pending:
            case = cases[index]
            started = time.perf_counter()
            try:
                await calls[case.path](case.payload, timeout=60)
                code, details = "OK", ""
            except grpc.aio.AioRpcError as error:
                code, details = error.code().name, error.details() or ""
            outcomes.add(code, details, time.perf_counter() - started)
            answers[index] = Answer(case, code, details)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return [answer for answer in answers if answer is not None]


def wrong(answer: Answer) -> bool:
    return answer.code not in ALLOWED or not answer.details or len(answer.details) > MAX_DETAILS


def describe(answer: Answer) -> str:
    case = answer.case
    return (
        f"{case.category}/{case.kind} ({case.note}) -> {answer.code} "
        f"{answer.details[:300]!r} ({len(answer.details)} chars)"
    )


def counted(server: FaultServer, code: str) -> float:
    """ModelInfer and Classify calls the server counted with `code`, whether or not the
    request got as far as naming a served model."""
    return sum(
        server.sample("convserve_requests_total", code=code, model=model, rpc=rpc, version=version)
        for rpc in ("ModelInfer", "Classify")
        for model, version in (("", ""), ("tiny", "1"))
    )


def assert_good_answers(server: FaultServer) -> None:
    """A good ModelInfer and a good Classify after the flood: the right numbers."""
    spec = TinySpec()
    array = images(3, seed=11)
    expected = reference_logits(spec, array)

    async def ask() -> tuple[pb2.ModelInferResponse, cls_pb2.ClassifyResponse]:
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            infer = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            classify = cls_grpc.ImageClassificationStub(channel).Classify
            return (
                await infer(infer_request(array), timeout=60),
                await classify(classify_request(array), timeout=60),
            )

    inferred, classified = asyncio.run(ask())
    logits = np.frombuffer(inferred.raw_output_contents[0], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    shifted = np.exp(expected.astype(np.float64) - expected.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    for row, result in zip(probabilities, classified.results, strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        assert [c.index for c in result.classes] == best.tolist()
        assert [c.label for c in result.classes] == [spec.labels[i] for i in best]
        np.testing.assert_allclose([c.score for c in result.classes], row[best], atol=1e-5)


def test_generated_bad_requests_are_refused_with_a_message(fault_server: FaultServer) -> None:
    server = fault_server
    cases = generate(SEED)
    assert len(cases) >= 10_000
    warm_up, rest = cases[:WARM_UP], cases[WARM_UP:]
    outcomes = Outcomes()
    figures: dict[str, float] = {}

    async def scenario() -> list[Answer]:
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            answers = await send_all(channel, warm_up, outcomes)
            figures["rss_before"], figures["fds_before"] = server.rss_mb(), server.open_fds()
            started = time.perf_counter()
            answers += await send_all(channel, rest, outcomes)
            figures["seconds"] = time.perf_counter() - started
            figures["rss_after"] = server.rss_mb()
            # Read while the channel (one connection) is still open, as before.
            await asyncio.to_thread(
                wait_until,
                lambda: abs(server.open_fds() - figures["fds_before"]) <= FD_SLACK,
                f"open descriptors back within {FD_SLACK} of {figures['fds_before']:.0f}",
            )
            figures["fds_after"] = server.open_fds()
            return answers

    answers = asyncio.run(scenario())
    by_category: dict[str, Counter[str]] = {}
    by_kind: Counter[str] = Counter()
    for answer in answers:
        by_category.setdefault(answer.case.category, Counter())[answer.code] += 1
        by_kind[f"{answer.case.category}/{answer.case.kind}"] += 1
    print(f"\n{len(answers)} generated bad requests (seed {SEED}), {CONCURRENCY} concurrent:")
    for category, codes in by_category.items():
        counts = ", ".join(f"{code} {n}" for code, n in codes.most_common())
        print(f"  {category}: {sum(codes.values())} ({counts})")
    print("  kinds: " + ", ".join(f"{kind} {n}" for kind, n in sorted(by_kind.items())))
    print(f"  codes: {outcomes.summary()}")
    print(
        f"  {len(rest) / figures['seconds']:.0f} requests/s after the warm-up of {WARM_UP}; "
        f"RSS {figures['rss_before']:.1f} -> {figures['rss_after']:.1f} MB "
        f"(bound +{RSS_GROWTH_MB} MB); open fds {figures['fds_before']:.0f} -> "
        f"{figures['fds_after']:.0f} (bound +-{FD_SLACK})"
    )

    assert len(answers) == len(cases) >= 10_000
    bad = [describe(answer) for answer in answers if wrong(answer)]
    assert not bad, f"{len(bad)} calls answered wrongly, e.g.:\n" + "\n".join(bad[:20])
    log = server.output()
    loud = [line for line in log.splitlines() if " ERROR " in line or re.match(r"E\d{4} ", line)]
    assert "Traceback" not in log and not loud, log[-5000:]
    # Nothing per request: what follows startup is a few of Pillow's own warnings at most.
    assert "startup finished" in log, log
    after_startup = log.partition("startup finished")[2].splitlines()[1:]
    print(f"  server log after startup: {len(after_startup)} lines, no ERROR, no traceback")
    assert len(after_startup) < len(cases) // 100, log[-5000:]
    codes = outcomes.codes()
    assert {code: counted(server, code) for code in codes} == codes
    assert figures["rss_after"] - figures["rss_before"] <= RSS_GROWTH_MB
    assert_good_answers(server)
