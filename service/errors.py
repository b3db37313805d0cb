"""The service's domain errors.

Plain exceptions, free of gRPC: the batcher, the runtime and the converters raise them, and
`service.wire.status` maps them to gRPC status codes in one place. Every message is meant for the
client: it names the problem and, where there is one, what was expected. Text the client sent
(names, datatypes, parameter values) goes into a message only through `client_text()`, so a
message stays short whatever was sent: gRPC carries it in a header, and one past the header
limit turns the answer into RESOURCE_EXHAUSTED "metadata size exceeds hard limit".
"""

from __future__ import annotations

CLIENT_TEXT_LIMIT = 64


def client_text(value: str, limit: int = CLIENT_TEXT_LIMIT, *, quote: bool = True) -> str:
    """Client-supplied text for a message: quoted (repr: control characters escaped) and cut
    to `limit` characters, with its real length when cut, e.g. `'aaaa'... (8192 characters)`.
    `quote=False` for text that is not a value the client named (a decoder's reason)."""
    head = value[:limit]
    text = repr(head) if quote else head
    if len(value) <= limit:
        return text
    return f"{text}... ({len(value)} characters)"


class ServiceError(Exception):
    """Base class of every error the service answers with its own message."""


class InvalidInput(ServiceError):
    """The request is malformed: bad shape, datatype, image, parameter (INVALID_ARGUMENT)."""


class ModelNotFound(ServiceError):
    """The model or version is unknown, or failed to load (NOT_FOUND)."""


class UnknownService(ServiceError):
    """A health check named a gRPC service this server does not have (NOT_FOUND)."""


class ModelNotReady(ServiceError):
    """The model exists but is still loading, or the server is draining (UNAVAILABLE)."""


class Overloaded(ServiceError):
    """The model's batch queue is full (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it was computed (DEADLINE_EXCEEDED)."""


class NotImplementedRpc(ServiceError):
    """The RPC is part of the protocol but not implemented by this server (UNIMPLEMENTED)."""


class Unauthenticated(ServiceError):
    """The call carries no bearer token, or one the server does not accept (UNAUTHENTICATED).
    The message never repeats what was sent."""


class InternalError(ServiceError):
    """A failure inside the server, already logged with its traceback (INTERNAL). Clients get a
    generic message: the text here is for the log only."""


class ModelLoadError(Exception):
    """A model version could not be loaded; the message says why. Never sent as is to clients:
    the model manager records it and answers ModelNotFound with the reason."""


class ConfigurationError(Exception):
    """A setting has an invalid value; the message names the allowed values."""
