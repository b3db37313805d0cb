"""Registers a servicer on the gRPC server with request parsing that cannot fail loudly.

The generated `add_*Servicer_to_server` functions hand gRPC `Message.FromString` as the
deserializer: bytes that are not the message make gRPC log an ERROR traceback and answer
UNKNOWN, per request, without the servicer ever knowing. Here a unary method's deserializer
never raises: undecodable bytes become an `Undecodable` value, which the handler answers with
INVALID_ARGUMENT and a message naming the expected message type, counted like any other
bad request. Streaming methods keep the plain deserializer (none of them is implemented).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError

from service.errors import InvalidInput
from service.observability.metrics import Metrics
from service.wire.status import Call

Handler = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Undecodable:
    """What a request's bytes became when they were not a `message_type`."""

    message_type: str
    size: int
    reason: str

    def error(self) -> InvalidInput:
        return InvalidInput(
            f"the request ({self.size} bytes) is not a valid {self.message_type} protobuf "
            f"message: {self.reason}"
        )


def tolerant_parser(message_class: Any) -> Callable[[bytes], Any]:
    """A deserializer that returns Undecodable instead of raising."""
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            return Undecodable(name, len(data), str(error)[:200] or type(error).__name__)

    return parse


def _answering_undecodable(rpc: str, behaviour: Handler, metrics: Metrics | None) -> Handler:
    async def handle(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            async with Call(rpc, context, metrics):
                raise request.error()
        return await behaviour(request, context)

    return handle


def add_servicer(
    server: grpc.aio.Server,
    servicer: Any,
    service: descriptor.ServiceDescriptor,
    metrics: Metrics | None = None,
    registered: Collection[str] = (),
) -> dict[str, grpc.RpcMethodHandler]:
    """Registers every method of `service` that `servicer` has; `metrics` counts the bad
    requests of the inference methods (ModelInfer, Classify) like any other answer.

    The methods named in `registered` are registered with gRPC core too (each then has its own
    list of pending calls and its own request for the next one); returns their handlers by
    full method name ("/package.Service/Method"), for `CallTakers`."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        serialize = response_class.SerializeToString
        if method.client_streaming or method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour,
                request_deserializer=request_class.FromString,
                response_serializer=serialize,
            )
            continue
        counted = metrics if method.name in ("ModelInfer", "Classify") else None
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _answering_undecodable(method.name, behaviour, counted),
            request_deserializer=tolerant_parser(request_class),
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    chosen = {name: handlers[name] for name in registered}
    server.add_registered_method_handlers(service.full_name, chosen)
    return {f"/{service.full_name}/{name}": handler for name, handler in chosen.items()}
