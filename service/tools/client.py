"""Command-line client for a convserve server.

    python -m service.tools.client health --address 127.0.0.1:8001      # exit 0 iff SERVING
    python -m service.tools.client metadata [--model mnist_cnn]
    python -m service.tools.client classify digit.png cat.jpg [--top-k 3] [--model mnist_cnn]
    python -m service.tools.client infer --random 4 [--classification 3]  # a raw tensor
    python -m service.tools.client infer --input batch.npy [--output logits.npy]
    python -m service.tools.client explain digit.png cat.jpg [--target 7] [--patch 7 --stride 2] \
        [--out DIR] [--json]                     # DIR/<name>.explain.png: the map over the image

`--address` defaults to $CONVSERVE_ADDRESS, else 127.0.0.1:8001. Exit status: 0 on success,
1 when the server answers with an error or cannot be reached, 2 on bad usage.

Against a server with TLS, token authentication or both (docs/security.md):

    python -m service.tools.client metadata --tls-ca ca.pem                      # TLS
    python -m service.tools.client metadata --tls-ca ca.pem --tls-cert me.pem --tls-key me.key
    CONVSERVE_TOKEN=... python -m service.tools.client classify digit.png --tls-ca ca.pem

The token goes as `authorization: Bearer <token>` metadata; prefer $CONVSERVE_TOKEN or
`--token-file` to `--token`, which any user of the machine can read in the process list.

`health` is the Docker HEALTHCHECK (every 10 s), so this module imports only grpc and
grpc_health at the top; the other commands import numpy and the protocol modules themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:8001"


def health(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def metadata(channel: grpc.Channel, args: argparse.Namespace) -> int:
    from service._proto import grpc_service_pb2 as pb2
    from service._proto import grpc_service_pb2_grpc as pb2_grpc

    stub = pb2_grpc.GRPCInferenceServiceStub(channel)
    server = stub.ServerMetadata(pb2.ServerMetadataRequest(), timeout=args.timeout)
    ready = stub.ServerReady(pb2.ServerReadyRequest(), timeout=args.timeout).ready
    print(
        f"server: {server.name} {server.version} ready={ready} extensions={list(server.extensions)}"
    )
    model = stub.ModelMetadata(pb2.ModelMetadataRequest(name=args.model), timeout=args.timeout)
    print(f"model: {model.name} versions={list(model.versions)} platform={model.platform}")
    for kind, tensors in (("input", model.inputs), ("output", model.outputs)):
        for tensor in tensors:
            print(f"  {kind} {tensor.name} {tensor.datatype} {list(tensor.shape)}")
    return 0


def classify(channel: grpc.Channel, args: argparse.Namespace) -> int:
    from service._proto import classification_pb2 as cls_pb2
    from service._proto import classification_pb2_grpc as cls_grpc

    images = [Path(path).read_bytes() for path in args.images]
    request = cls_pb2.ClassifyRequest(
        images=images, model_name=args.model, model_version=args.version, top_k=args.top_k
    )
    response = cls_grpc.ImageClassificationStub(channel).Classify(request, timeout=args.timeout)
    if args.json:
        results = [
            {
                "image": path,
                "classes": [
                    {"label": c.label, "index": c.index, "score": c.score} for c in result.classes
                ],
            }
            for path, result in zip(args.images, response.results, strict=True)
        ]
        print(
            json.dumps(
                {
                    "model": response.model_name,
                    "version": response.model_version,
                    "results": results,
                },
                indent=2,
            )
        )
        return 0
    print(f"model {response.model_name} version {response.model_version}")
    for path, result in zip(args.images, response.results, strict=True):
        ranked = ", ".join(f"{c.label} ({c.score:.4f})" for c in result.classes)
        print(f"{path}: {ranked}")
    return 0


SHADES = " .:-=+*#%@"
"""Characters from no drop to the largest: the text heatmap of `explain`."""


def explain(channel: grpc.Channel, args: argparse.Namespace) -> int:
    """Which regions of each image the model's decision rests on (occlusion sensitivity)."""
    for image in args.images:
        explain_one(channel, args, Path(image))
    return 0


def explain_one(channel: grpc.Channel, args: argparse.Namespace, image: Path) -> None:
    import numpy as np

    from service._proto import classification_pb2, classification_pb2_grpc

    request = classification_pb2.ExplainRequest(
        image=image.read_bytes(),
        model_name=args.model,
        model_version=args.version,
        patch=args.patch,
        stride=args.stride,
        fill=args.fill,
    )
    if args.target is not None:
        request.target = args.target
    stub = classification_pb2_grpc.ImageClassificationStub(channel)
    reply = stub.Explain(request, timeout=args.timeout)
    pixels = np.asarray(reply.pixel_drops, dtype=np.float32).reshape(reply.height, reply.width)
    if args.out is not None:
        written = write_overlay(image, pixels, Path(args.out))
        print(f"{image}: overlay written to {written}")
    if args.json:
        print(json.dumps({
            "model": reply.model_name, "version": reply.model_version,
            "classes": [{"label": c.label, "index": c.index, "score": c.score}
                        for c in reply.classes],
            "target": {"label": reply.target.label, "index": reply.target.index,
                       "score": reply.target.score},
            "patch": reply.patch, "rows": reply.rows, "columns": reply.columns,
            "drops": list(reply.drops), "pixel_drops": pixels.tolist(),
        }))  # fmt: skip
        return
    best = ", ".join(f"{c.label} {c.score:.3f}" for c in reply.classes)
    print(f"{image}: {best}  ({reply.model_name} v{reply.model_version})")
    print(
        f"why {reply.target.label!r} ({reply.target.score:.3f}): the probability it loses when a "
        f"{reply.patch}x{reply.patch} patch hides each region ('@' = most, ' ' = none):"
    )
    peak = float(np.nanmax(np.abs(pixels))) or 1.0
    for row in np.clip(np.nan_to_num(pixels) / peak, 0, 1):
        print("  " + "".join(SHADES[round(v * (len(SHADES) - 1))] * 2 for v in row))
    largest = float(np.max(reply.drops))
    print(f"largest drop {largest:.3f} over {reply.rows}x{reply.columns} patch positions")


def write_overlay(image: Path, pixels: Any, out: Path) -> Path:
    """`out/<name>.explain.png`: the image in grey, the drops in red over it (stretched from
    the model input to the image's size; strongest red = largest drop, none below 0)."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    with Image.open(image) as opened:
        base = np.asarray(opened.convert("L").convert("RGB"), dtype=np.float32)
    heat = np.clip(np.nan_to_num(pixels), 0, None)
    heat = heat / (heat.max() or 1.0)
    size = (base.shape[1], base.shape[0])
    heat_image = Image.fromarray((heat * 255).astype(np.uint8), "L")
    alpha = np.asarray(heat_image.resize(size, Image.Resampling.BILINEAR), np.float32) / 255
    red = np.zeros_like(base)
    red[..., 0] = 255
    blended = base * (1 - 0.6 * alpha[..., None]) + red * 0.6 * alpha[..., None]
    path = out / f"{image.stem}.explain.png"
    Image.fromarray(blended.astype(np.uint8), "RGB").save(path)
    return path


def infer(channel: grpc.Channel, args: argparse.Namespace) -> int:
    import numpy as np

    from service._proto import grpc_service_pb2 as pb2
    from service._proto import grpc_service_pb2_grpc as pb2_grpc
    from service.wire.converters import NUMPY_DTYPES, deserialize_bytes

    stub = pb2_grpc.GRPCInferenceServiceStub(channel)
    model = stub.ModelMetadata(pb2.ModelMetadataRequest(name=args.model), timeout=args.timeout)
    tensor = model.inputs[0]
    if args.input is not None:
        array = np.load(args.input)
    else:
        shape = [args.random, *(int(d) for d in tensor.shape[1:])]
        dtype = NUMPY_DTYPES[tensor.datatype]
        array = np.random.default_rng(args.seed).integers(0, 256, size=shape).astype(dtype)
    request = pb2.ModelInferRequest(model_name=model.name, model_version=args.version)
    request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    output = request.outputs.add(name=model.outputs[0].name)
    if args.classification:
        output.parameters["classification"].int64_param = args.classification
    response = stub.ModelInfer(request, timeout=args.timeout)
    result = response.outputs[0]
    raw = response.raw_output_contents[0]
    print(
        f"model {response.model_name} version {response.model_version}: "
        f"{result.name} {result.datatype} {list(result.shape)}"
    )
    if result.datatype == "BYTES":
        entries = [e.decode() for e in deserialize_bytes(raw)]
        k = int(result.shape[-1])
        for row in range(len(entries) // k):
            print(f"  [{row}] " + "  ".join(entries[row * k : (row + 1) * k]))
        return 0
    values = np.frombuffer(raw, dtype=NUMPY_DTYPES[result.datatype]).reshape(list(result.shape))
    if args.output is not None:
        np.save(args.output, values)
        print(f"  saved to {args.output}")
    for row, scores in enumerate(values):
        print(f"  [{row}] argmax {int(np.argmax(scores))}  max {float(np.max(scores)):.4f}")
    return 0


class _BearerToken(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every call's metadata (every command's calls
    are unary)."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return continuation(details._replace(metadata=metadata), request)


def read_token(args: argparse.Namespace) -> str:
    """The bearer token: --token-file, else --token, else $CONVSERVE_TOKEN; "" for none."""
    if args.token_file is not None:
        return str(Path(args.token_file).read_text().strip())
    return str(args.token or "")


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to --address: TLS when any --tls* option is given, with the bearer token."""
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together (a client certificate)")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.tls_ca),
            private_key=_read(args.tls_key),
            certificate_chain=_read(args.tls_cert),
        )
        options = []
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        channel = grpc.secure_channel(args.address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.address)
    token = read_token(args)
    if token:
        return grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=os.environ.get("CONVSERVE_ADDRESS", DEFAULT_ADDRESS),
        help="server host:port (default: $CONVSERVE_ADDRESS or %(default)s)",
    )
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    tls = common.add_argument_group("TLS (any of these turns it on)")
    tls.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    tls.add_argument("--tls-ca", type=Path, help="PEM CA certificates to trust for the server")
    tls.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    tls.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    tls.add_argument(
        "--tls-server-name", help="name to check the server's certificate for (default: host)"
    )
    token = common.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        default=os.environ.get("CONVSERVE_TOKEN", ""),
        help="token sent as `authorization: Bearer <token>` (default: $CONVSERVE_TOKEN)",
    )
    token.add_argument("--token-file", type=Path, help="read the token from this file")
    parser = argparse.ArgumentParser(
        prog="python -m service.tools.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("health", parents=[common], help="exit 0 iff the server is SERVING")
    sub.add_argument("--service", default="", help="health service name (default: whole server)")
    sub.set_defaults(run=health)

    sub = commands.add_parser("metadata", parents=[common], help="server and model metadata")
    sub.add_argument("--model", default="", help="model name (default: the server's default)")
    sub.set_defaults(run=metadata)

    sub = commands.add_parser("classify", parents=[common], help="classify image files")
    sub.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    sub.add_argument("--model", default="", help="model name (default: the server's default)")
    sub.add_argument("--version", default="", help="model version (default: the served one)")
    sub.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.set_defaults(run=classify)

    sub = commands.add_parser("infer", parents=[common], help="send a raw tensor via ModelInfer")
    source = sub.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help=".npy file with the input batch")
    source.add_argument("--random", type=int, default=1, help="N random inputs (default: 1)")
    sub.add_argument("--seed", type=int, default=0, help="seed for --random")
    sub.add_argument("--model", default="", help="model name (default: the server's default)")
    sub.add_argument("--version", default="", help="model version (default: the served one)")
    sub.add_argument("--classification", type=int, default=0, help="ask for the top-k strings")
    sub.add_argument("--output", type=Path, help="save the output tensor to this .npy file")
    sub.set_defaults(run=infer)

    sub = commands.add_parser(
        "explain", parents=[common], help="which regions of an image the decision rests on"
    )
    sub.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    sub.add_argument("--model", default="", help="model name (default: the server's default)")
    sub.add_argument("--version", default="", help="model version (default: the newest ready)")
    sub.add_argument("--target", type=int, help="class index to explain (default: the predicted)")
    sub.add_argument("--patch", type=int, default=0, help="patch side in pixels (default: side/4)")
    sub.add_argument("--stride", type=int, default=0, help="patch step in pixels (default: 2)")
    sub.add_argument(
        "--fill", type=int, nargs="*", default=[], help="patch pixel value(s) (default: 0)"
    )
    sub.add_argument("--out", type=Path, help="write DIR/<name>.explain.png overlays here")
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.set_defaults(run=explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m service.tools.client`."""
    args = build_parser().parse_args(argv)
    try:
        channel = open_channel(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with channel:
        try:
            return int(args.run(channel, args))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
