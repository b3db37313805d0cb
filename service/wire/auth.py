"""Bearer-token authentication: one gRPC server interceptor checks every call.

    python -m service --token-file /run/secrets/convserve/tokens [--auth-health]

A call must carry the metadata `authorization: Bearer <token>` (what tritonclient sends for
`headers={"authorization": ...}`) with one of the tokens of the token file: one a line, blank
lines ignored, read once at start (docs/security.md says how to rotate them). Any other call is
refused with UNAUTHENTICATED before a servicer sees it, and counted in
`convserve_unauthenticated_requests_total`.

grpc.health.v1.Health is exempt unless `auth_health` is set: probes (Docker's HEALTHCHECK,
Kubernetes') carry no token. Reflection is not exempt: it is part of the API a client uses.

Tokens are never logged and never kept: the server holds their SHA-256 digests and compares
the digest of what a call sent with every one of them (`hmac.compare_digest`, without stopping
at the first match), so neither the time taken nor the lengths compared say which token, or how
much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor

from service.errors import ConfigurationError, Unauthenticated
from service.observability.metrics import Metrics
from service.wire.health import SERVICE_NAME as HEALTH_SERVICE
from service.wire.status import status_of

logger = logging.getLogger(__name__)

REFUSAL_MESSAGE = "missing or invalid bearer token in the authorization metadata"
SHORT_TOKEN_CHARS = 16  # below this a token is warned about: easy to guess


class TokenSet:
    """The accepted tokens, as digests; `accepts(token)` takes the same time whichever."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str) -> bool:
        digest = _digest(token)
        matched = False
        for known in self._digests:  # every one, whatever matched before
            matched |= hmac.compare_digest(digest, known)
        return matched


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def read_tokens(path: Path) -> TokenSet:
    """The tokens of a token file; ConfigurationError (naming the line, never the token) when
    the file cannot be read, holds none, or holds one a gRPC header cannot carry."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read token_file {path}: {error}") from None
    tokens = []
    for number, line in enumerate(lines, start=1):
        token = line.strip()
        if not token:
            continue
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ConfigurationError(
                f"token_file {path} line {number}: a token must be printable ASCII without "
                "spaces (it travels in a gRPC header)"
            )
        if len(token) < SHORT_TOKEN_CHARS:
            logger.warning(
                "token_file %s line %d: a token of fewer than %d characters is easy to guess",
                path, number, SHORT_TOKEN_CHARS,
            )  # fmt: skip
        tokens.append(token)
    if not tokens:
        raise ConfigurationError(f"token_file {path} holds no token (one a line)")
    return TokenSet(tokens)


def bearer_token(metadata: Sequence[Any] | None) -> str | None:
    """The token of the call's one `authorization: Bearer <token>` entry; None when there is
    none, several, or another scheme."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when it carries an accepted bearer token (or is to an exempt
    service); refuses it otherwise with UNAUTHENTICATED and REFUSAL_MESSAGE."""

    def __init__(
        self,
        tokens: TokenSet,
        metrics: Metrics,
        services: Iterable[descriptor.ServiceDescriptor],
        exempt_services: Iterable[str] = (HEALTH_SERVICE,),
    ) -> None:
        self._tokens = tokens
        self._metrics = metrics
        self._exempt = frozenset(exempt_services)
        # The `rpc` label takes the method names the server has, and "unknown" for any other:
        # a caller without a token must not be able to create series at will.
        self._methods = {
            f"/{service.full_name}/{method.name}": method.name
            for service in services
            for method in service.methods
        }
        self._refusal = grpc.stream_stream_rpc_method_handler(_refuse)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.lstrip("/").partition("/")[0] in self._exempt:
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        token = bearer_token(metadata)
        if token is not None and self._tokens.accepts(token):
            return await continuation(handler_call_details)
        rpc = self._methods.get(method, "unknown")
        reason = "invalid" if _has_authorization(metadata) else "missing"
        self._metrics.unauthenticated.labels(rpc, reason).inc()
        logger.debug("refused a call to %s: %s bearer token", rpc, reason)
        # One handler for every kind of call: it answers before reading any request, which
        # works whatever the client streams (the wire is the same for all four kinds).
        return self._refusal


def _has_authorization(metadata: Sequence[Any] | None) -> bool:
    return any(key == "authorization" for key, _ in metadata or ())


async def _refuse(
    request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    code, message = status_of(Unauthenticated(REFUSAL_MESSAGE))
    await context.abort(code, message)
