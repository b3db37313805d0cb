"""Sends inference traffic to a convserve server, or to a balancer in front of some, and prints
the gRPC status codes it got as JSON. The live deployment tests run it in a subprocess:

    python -m tests.deploy.traffic --address 127.0.0.1:8001 --model tiny --infer 40 --bad 3

A subprocess because the service's generated KServe V2 modules and tritonclient's both define
the `inference` protobuf package, and one process cannot hold both. Every call has a deadline
and the number of calls is fixed, so a run is bounded.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from PIL import Image

from service._proto import (
    classification_pb2,
    classification_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
)

Call = Callable[[], object]


def infer_request(model: str, rows: int, side: int = 28) -> grpc_service_pb2.ModelInferRequest:
    pixels = np.random.default_rng(rows).integers(0, 256, (rows, 1, side, side), dtype=np.uint8)
    request = grpc_service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def png(side: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, dtype=np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def calls(channel: grpc.Channel, args: argparse.Namespace) -> list[tuple[str, Call]]:
    """One wave: good ModelInfer and Classify calls, and `bad` calls of each failing kind."""
    infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    classify = classification_pb2_grpc.ImageClassificationStub(channel).Classify
    t = args.timeout_s
    good = infer_request(args.model, args.rows)
    wrong_shape = infer_request(args.model, 1, side=27)
    unknown_model = infer_request("no_such_model", 1)
    image = classification_pb2.ClassifyRequest(model_name=args.model, images=[png()], top_k=3)
    garbage = classification_pb2.ClassifyRequest(model_name=args.model, images=[b"not an image"])
    wave: list[tuple[str, Call]] = []
    wave += [("infer", lambda: infer(good, timeout=t))] * args.infer
    wave += [("classify", lambda: classify(image, timeout=t))] * args.classify
    wave += [("infer_wrong_shape", lambda: infer(wrong_shape, timeout=t))] * args.bad
    wave += [("infer_unknown_model", lambda: infer(unknown_model, timeout=t))] * args.bad
    wave += [("classify_garbage", lambda: classify(garbage, timeout=t))] * args.bad
    return wave


def outcome(call: Call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return str(error.code().name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.deploy.traffic", description=__doc__)
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--model", default="tiny", help="model name")
    parser.add_argument("--infer", type=int, default=20, help="good ModelInfer calls per wave")
    parser.add_argument("--classify", type=int, default=5, help="good Classify calls per wave")
    parser.add_argument("--bad", type=int, default=2, help="calls of each failing kind per wave")
    parser.add_argument("--rows", type=int, default=2, help="images per ModelInfer call")
    parser.add_argument("--waves", type=int, default=1, help="how many waves")
    parser.add_argument("--gap-s", type=float, default=1.0, help="pause between waves")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight at once")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
    args = parser.parse_args(argv)

    codes: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    with grpc.insecure_channel(args.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=args.timeout_s)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for wave in range(args.waves):
                if wave:
                    time.sleep(args.gap_s)
                kinds, planned = zip(*calls(channel, args), strict=True)
                for kind, code in zip(kinds, pool.map(outcome, planned), strict=True):
                    codes[code] += 1
                    by_kind.setdefault(kind, Counter())[code] += 1
    json.dump({"codes": codes, "by_kind": by_kind}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
