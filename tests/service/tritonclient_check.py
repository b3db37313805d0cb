"""Talks to a running convserve server with Triton's own client, unchanged.

    python -m tests.service.tritonclient_check --address 127.0.0.1:8001 --descriptor FILE
    python -m tests.service.tritonclient_check ... --root-certificates ca.pem \
        [--private-key client.key --certificate-chain client.pem] [--token TOKEN] [--explicit]

Runs in its own process: tritonclient ships generated `inference.*` messages of its own, and
the default protobuf descriptor pool refuses a second definition of the same symbols, so this
process must never import `service._proto`. `--descriptor` is our grpc_service.proto as a
serialized FileDescriptorProto (read as plain data, never added to the pool), compared field by
field with tritonclient's for wire compatibility. With the TLS options the client connects as
`InferenceServerClient(url, ssl=True, root_certificates=..., ...)`, and with `--token` every call
sends `headers={"authorization": "Bearer <token>"}`, which tritonclient passes as gRPC metadata.
Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.model_factory import TinySpec, reference_logits

# Messages convserve declares with only the fields it fills (Triton's ModelConfig has dozens of
# scheduling and backend options): each field it has must match Triton's exactly; the
# others are absent, which the wire allows (an unknown field is skipped by the reader).
PARTIAL_MESSAGES = frozenset(
    {"ModelConfig", "ModelInput", "ModelOutput", "ModelInstanceGroup", "ModelDynamicBatching",
     "ModelStatistics"}
)  # fmt: skip


def check_wire_compatibility(descriptor_file: Path) -> None:
    ours = descriptor_pb2.FileDescriptorProto.FromString(descriptor_file.read_bytes())
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    their_config = descriptor_pb2.FileDescriptorProto()
    model_config_pb2.DESCRIPTOR.CopyToProto(their_config)
    assert ours.package == theirs.package == their_config.package == "inference"

    def fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict:
        found = {
            f"{prefix}{message.name}.{f.name}": (f.number, f.type, f.label, f.type_name)
            for f in message.field
        }
        for nested in message.nested_type:
            found.update(fields(nested, f"{prefix}{message.name}."))
        return found

    def enums(file: descriptor_pb2.FileDescriptorProto) -> dict:
        found: dict[str, set[tuple[str, int]]] = {}
        for enum in file.enum_type:
            found[enum.name] = {(v.name, v.number) for v in enum.value}
        for message in file.message_type:
            for enum in message.enum_type:
                found[f"{message.name}.{enum.name}"] = {(v.name, v.number) for v in enum.value}
        return found

    their_messages = {m.name: fields(m) for f in (theirs, their_config) for m in f.message_type}
    partial = []
    for message in ours.message_type:
        assert message.name in their_messages, f"{message.name} is not in Triton's protos"
        mine, theirs_fields = fields(message), their_messages[message.name]
        if message.name in PARTIAL_MESSAGES:
            differs = {k: v for k, v in mine.items() if theirs_fields.get(k) != v}
            assert not differs, f"{message.name} differs from Triton's: {differs}"
            partial.append(f"{message.name} ({len(mine)} of {len(theirs_fields)} fields)")
        else:
            assert mine == theirs_fields, f"{message.name} differs"
    their_enums = {**enums(theirs), **enums(their_config)}
    for name, values in enums(ours).items():
        assert values == their_enums[name], f"enum {name} differs from Triton's"
    their_methods = {m.name: m for m in theirs.service[0].method}
    assert ours.service[0].name == theirs.service[0].name == "GRPCInferenceService"
    for method in ours.service[0].method:
        other = their_methods[method.name]
        assert (method.input_type, method.output_type) == (other.input_type, other.output_type)
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )
    print(
        f"wire: {len(ours.message_type)} messages, {len(ours.service[0].method)} methods match; "
        f"partial: {', '.join(partial)}"
    )


def connect(address: str, args: argparse.Namespace) -> Any:
    if args.root_certificates is None:
        return triton.InferenceServerClient(address)
    return triton.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=args.root_certificates,
        private_key=args.private_key,
        certificate_chain=args.certificate_chain,
    )


def channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    if args.root_certificates is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        *(
            Path(path).read_bytes() if path else None
            for path in (args.root_certificates, args.private_key, args.certificate_chain)
        )
    )
    return grpc.secure_channel(address, credentials)


def check_security(address: str, args: argparse.Namespace) -> None:
    """Without the token a call is refused; with TLS, a plaintext client is."""
    if args.token:
        try:
            connect(address, args).is_server_ready()
        except InferenceServerException as error:
            assert "UNAUTHENTICATED" in str(error.status()), error.status()
            assert "missing or invalid bearer token" in error.message()
        else:
            raise AssertionError("a call without the token was answered")
        print("token required: ok")
    if args.root_certificates:
        try:
            triton.InferenceServerClient(address).is_server_live(headers=headers(args))
        except InferenceServerException as error:
            assert "UNAVAILABLE" in str(error.status()), error.status()
        else:
            raise AssertionError("a plaintext client was answered")
        print("plaintext refused: ok")


def headers(args: argparse.Namespace) -> dict[str, str] | None:
    return {"authorization": f"Bearer {args.token}"} if args.token else None


def check_client(address: str, args: argparse.Namespace) -> None:
    spec = TinySpec()
    client = connect(address, args)
    sent = headers(args)
    assert client.is_server_live(headers=sent) and client.is_server_ready(headers=sent)
    assert client.is_model_ready("tiny", headers=sent)
    metadata = client.get_model_metadata("tiny", headers=sent)
    assert metadata.inputs[0].name == "images" and metadata.inputs[0].datatype == "UINT8"
    assert list(metadata.outputs[0].shape) == [-1, 10]

    images = np.random.default_rng(5).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    expected = reference_logits(spec, images)
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("tiny", [tensor], request_id="t-1", headers=sent)
    assert result.get_response().id == "t-1"
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    print("raw infer: ok")

    result = client.infer(
        "tiny",
        [tensor],
        outputs=[triton.InferRequestedOutput("logits", class_count=3)],
        headers=sent,
    )
    top = result.as_numpy("logits")
    assert top.shape == (4, 3), top.shape
    for row in range(4):
        best = np.argsort(-expected[row], kind="stable")[:3]
        parsed = [entry.decode().split(":", 2) for entry in top[row]]
        assert [int(index) for _, index, _ in parsed] == list(best)
        assert [label for _, _, label in parsed] == [spec.labels[i] for i in best]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], expected[row, best], atol=1e-5)
    print("classification extension: ok")

    # tritonclient always sends raw contents; typed `contents` go through its own messages.
    request = service_pb2.ModelInferRequest(model_name="tiny")
    typed = request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
    typed.contents.uint_contents.extend(images[:1].ravel().tolist())
    metadata_entries = list(sent.items()) if sent else None
    with channel(address, args) as opened:
        response = service_pb2_grpc.GRPCInferenceServiceStub(opened).ModelInfer(
            request, metadata=metadata_entries
        )
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(logits, expected[:1], atol=1e-5)
    print("typed contents: ok")

    wrong = triton.InferInput("images", [1, 1, 28, 28], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    try:
        client.infer("tiny", [wrong], headers=sent)
    except InferenceServerException as error:
        assert "INVALID_ARGUMENT" in str(error.status()), error.status()
        assert "expects one input: images UINT8" in error.message()
    else:
        raise AssertionError("FP32 input was accepted")
    print("errors: ok")


def check_repository(address: str, args: argparse.Namespace) -> None:
    """The repository, configuration and statistics calls of tritonclient, unchanged."""
    client = connect(address, args)
    sent = headers(args)
    index = client.get_model_repository_index(headers=sent, as_json=True)
    assert {"name": "tiny", "version": "1", "state": "READY"} in index["models"], index
    config = client.get_model_config("tiny", headers=sent, as_json=True)["config"]
    assert (config["platform"], config["max_batch_size"]) == ("onnxruntime_onnx", 32), config
    assert config["input"][0]["data_type"] == "TYPE_UINT8"
    assert config["input"][0]["dims"] == ["1", "28", "28"]  # int64 as JSON strings
    assert config["output"][0]["dims"] == ["10"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    if args.explicit:
        client.unload_model("tiny", headers=sent)
        assert not client.is_model_ready("tiny", headers=sent)
        client.load_model("tiny", headers=sent)
        assert client.is_model_ready("tiny", headers=sent)
        print("load/unload: ok")
    else:
        try:
            client.load_model("tiny", headers=sent)
        except InferenceServerException as error:
            assert "UNAVAILABLE" in str(error.status()), error.status()
            assert "not allowed in model control mode poll" in error.message()
        else:
            raise AssertionError("load_model was accepted in model control mode poll")
        print("load refused outside explicit mode: ok")
    print("repository and config: ok")


def check_statistics(address: str, args: argparse.Namespace, before: dict) -> None:
    """ModelStatistics counts what check_client sent: 3 requests answered, 9 images, 1 failed
    (the FP32 one)."""
    client = connect(address, args)
    stats = client.get_inference_statistics("tiny", headers=headers(args), as_json=True)
    (entry,) = stats["model_stats"]
    assert entry["version"] == "1"

    def count(stats: dict, *path: str) -> int:
        for key in path:
            stats = stats.get(key, {})
        return int(stats or 0)

    def delta(*path: str) -> int:
        return count(entry, *path) - count(before, *path)

    assert delta("inference_count") == 9, entry
    assert delta("inference_stats", "success", "count") == 3, entry
    assert delta("inference_stats", "fail", "count") == 1, entry
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", stage, "count") == 3, (stage, entry)
    batched = sum(
        int(b["batch_size"]) * count(b, "compute_infer", "count") for b in entry["batch_stats"]
    )
    assert batched == count(entry, "inference_count"), entry
    print("statistics: ok")


def statistics_now(address: str, args: argparse.Namespace) -> dict:
    client = connect(address, args)
    stats = client.get_inference_statistics("tiny", headers=headers(args), as_json=True)
    return dict(stats["model_stats"][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--descriptor", type=Path, required=True)
    parser.add_argument("--root-certificates", help="PEM CA file: connect with TLS")
    parser.add_argument("--private-key", help="PEM client key (mutual TLS)")
    parser.add_argument("--certificate-chain", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--token", help="bearer token sent with every call")
    parser.add_argument(
        "--explicit", action="store_true", help="the server is in model control mode explicit"
    )
    args = parser.parse_args()
    assert "service._proto.grpc_service_pb2" not in sys.modules
    check_wire_compatibility(args.descriptor)
    check_security(args.address, args)
    check_repository(args.address, args)
    before = statistics_now(args.address, args)
    check_client(args.address, args)
    check_statistics(args.address, args, before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
