"""The benchmark's baseline: a naive server that calls ONNX Runtime inline in its gRPC handler.

    python -m service.tools.reference_server --model-repository bench_repository --model resnet18 \
        --port-file ports.json

Not a server to deploy: the simplest KServe V2 server one could write, which
`python -m service.tools.bench --table` measures the real server against (docs/benchmark.md). Each
`ModelInfer` reads the raw uint8 input, calls `InferenceSession.run` in the handler itself
(no batching, no executor: the event loop waits for the run, so one request computes at a
time) and answers with the raw FP32 output, as the real server does. It checks nothing, keeps
no metrics and serves what the load generator calls (ServerReady, ModelReady, ModelMetadata,
ModelInfer); the other methods answer UNIMPLEMENTED.

The session is made by `OnnxModel.load` with the same `RuntimeOptions` flags as the server's,
so the two differ only in the path around `InferenceSession.run` (and the event loop: asyncio's
unless `--event-loop uvloop`, the server's default). It listens on 127.0.0.1 (port
0 by default: a free one) and writes {"grpc_port": N} to `--port-file` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service._proto import grpc_service_pb2 as pb2
from service.engine.runtime import OnnxModel, RuntimeOptions
from service.repository.disk import ModelRepository
from service.server import event_loop_factory
from service.settings import EVENT_LOOPS, SPINNING
from service.wire import converters

SERVICE = "inference.GRPCInferenceService"
# The methods served, with their request and response messages; gRPC answers the others
# UNIMPLEMENTED.
METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb2.ServerLiveRequest, pb2.ServerLiveResponse),
    "ServerReady": (pb2.ServerReadyRequest, pb2.ServerReadyResponse),
    "ModelReady": (pb2.ModelReadyRequest, pb2.ModelReadyResponse),
    "ModelMetadata": (pb2.ModelMetadataRequest, pb2.ModelMetadataResponse),
    "ModelInfer": (pb2.ModelInferRequest, pb2.ModelInferResponse),
}


class InlineInferenceServicer:
    """ModelInfer with `InferenceSession.run` called in the handler."""

    def __init__(self, model: OnnxModel) -> None:
        self._model = model
        spec = model.spec
        self._name = spec.name
        self._version = str(spec.version)
        self._output_name = spec.preprocessing.output_name

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb2.ModelReadyResponse(ready=request.name in ("", self._name))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return converters.model_metadata(self._model.spec)

    async def ModelInfer(self, request: pb2.ModelInferRequest, context: Any) -> Any:
        shape = tuple(request.inputs[0].shape)
        images = np.frombuffer(request.raw_input_contents[0], dtype=np.uint8).reshape(shape)
        values = self._model.run_blocking(images)  # inline: the loop waits for ONNX Runtime
        response = pb2.ModelInferResponse(
            model_name=self._name, model_version=self._version, id=request.id
        )
        response.outputs.add(name=self._output_name, datatype="FP32", shape=values.shape)
        response.raw_output_contents.append(values.tobytes())
        return response


def load_model(repository: Path, name: str, options: RuntimeOptions) -> OnnxModel:
    """The served version of `name` (the repository's first model when `name` is empty)."""
    entries = ModelRepository(repository).scan()
    entry = next((e for e in entries if e.name == name or not name), None)
    if entry is None or entry.version is None:
        known = ", ".join(e.name for e in entries) or "none"
        raise SystemExit(f"no servable model {name!r} in {repository}; models: {known}")
    return OnnxModel.load(entry.name, entry.version, entry.model_path, options)


async def serve(model: OnnxModel, port: int, port_file: Path | None) -> None:
    """Serves on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    server = grpc.aio.server(options=options)
    servicer = InlineInferenceServicer(model)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if port_file is not None:
        temporary = port_file.with_name(port_file.name + ".tmp")
        temporary.write_text(json.dumps({"grpc_port": bound}))
        temporary.replace(port_file)  # readers never see half a file
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.tools.reference_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model-repository", type=Path, required=True)
    add("--model", default="", help="model name (default: the repository's first model)")
    add("--port", type=int, default=0, help="gRPC port on 127.0.0.1 (default: a free one)")
    add("--port-file", type=Path, help='write {"grpc_port": N} here once serving')
    add("--providers", default="cpu", choices=("auto", "cuda", "cpu"))
    add("--intra-op-threads", type=int, default=RuntimeOptions.intra_op_threads)
    add(
        "--intra-op-spinning",
        default=RuntimeOptions.spinning,
        choices=SPINNING,
        help="let idle ONNX Runtime threads spin (default: as the server's default)",
    )
    add(
        "--event-loop",
        default="asyncio",
        choices=EVENT_LOOPS,
        help="the naive server runs on asyncio's own loop; uvloop to see what it alone buys",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m service.tools.reference_server`."""
    args = build_parser().parse_args(argv)
    options = RuntimeOptions(
        providers=args.providers,
        intra_op_threads=args.intra_op_threads,
        spinning=args.intra_op_spinning,
    )
    loop_factory = event_loop_factory(args.event_loop)  # a missing uvloop stops it first
    model = load_model(args.model_repository, args.model, options)
    model.warm_up([1, 8])
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(model, args.port, args.port_file))
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
