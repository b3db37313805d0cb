"""The one place where domain errors become gRPC status codes, and where each call is counted.

Every servicer method runs its body inside `async with Call(...)`: on the way in the call is
admitted (refused with UNAVAILABLE while the server drains) and, for inference RPCs, refused
at once if its deadline has already passed (the cheapest point to drop it: nothing decoded);
on the way out the call is counted in the metrics (inference RPCs), an exception is mapped to
its status code with `status_of()`, and the RPC is aborted with that code and the error's
message. Unknown exceptions become INTERNAL with a generic message; their traceback goes to
the log only. Messages are capped in length: gRPC carries them in a trailer whose size is
limited, and an oversized one would turn any answer into RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # what grpc.aio raises for a failed send

from service.engine.admission import Admission
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotImplementedRpc,
    Overloaded,
    ServiceError,
    Unauthenticated,
    UnknownService,
)
from service.observability.metrics import Metrics, ModelMetrics

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"
MAX_MESSAGE_CHARS = 1000  # gRPC's default metadata limit is 8 KiB for all trailers together
EXPIRED_ON_ARRIVAL = (
    "the call's deadline had passed when the server took it up; nothing was computed"
)
EXPIRED_BEFORE_ANSWER = "the call's deadline passed before its answer could be sent"

STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    UnknownService: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotImplementedRpc: grpc.StatusCode.UNIMPLEMENTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    InternalError: grpc.StatusCode.INTERNAL,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    for kind in type(error).__mro__:
        code = STATUS_CODES.get(kind)  # type: ignore[call-overload]
        if code is not None:
            if code == grpc.StatusCode.INTERNAL:
                return code, INTERNAL_MESSAGE
            return code, capped(str(error))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def capped(message: str) -> str:
    """The message, cut to MAX_MESSAGE_CHARS with a note when longer."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[: MAX_MESSAGE_CHARS - 40]}... (message cut at {MAX_MESSAGE_CHARS} chars)"


class Call:
    """One RPC in flight: `async with Call(rpc, context, metrics) as call: ...`.

    `bind()` names the model once it is known, so the request is counted under it (and in
    `convserve_requests_in_flight`); unbound inference calls count under model="" version="".
    `metrics=None` (metadata and health RPCs) maps errors without counting. With `admission`
    the call is taken through it (refused while draining) and released when answered.
    """

    def __init__(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[Any, Any],
        metrics: Metrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.rpc = rpc
        self.context = context
        self._metrics = metrics
        self._admission = admission
        self._admitted = False
        self._model: ModelMetrics | None = None
        self._started = time.perf_counter()
        self._grpc_deadline: float | None = None  # on the server's clock, once read
        self._deadline_read = False

    def bind(self, model: ModelMetrics) -> None:
        """Attributes this call to a model version."""
        if self._metrics is not None and self._model is None:
            self._model = model
            model.in_flight.inc()

    def deadline(self, timeout_s: float | None = None) -> float | None:
        """The call's deadline on the server's clock (`time.perf_counter`, the batcher's): the
        gRPC deadline, or `timeout_s` (Triton's request parameter) after the server took the
        call up, whichever comes first; None when neither is set."""
        if not self._deadline_read:
            self._read_deadline()
        if timeout_s is None:
            return self._grpc_deadline
        timeout_at = self._started + timeout_s  # counted from when the server took the call up
        if self._grpc_deadline is None:
            return timeout_at
        return min(self._grpc_deadline, timeout_at)

    def _read_deadline(self) -> float | None:
        """The gRPC deadline on the server's clock (None: none set); the time remaining."""
        remaining = self.context.time_remaining()
        self._deadline_read = True
        if remaining is not None:
            self._grpc_deadline = time.perf_counter() + remaining
        return remaining

    async def __aenter__(self) -> Call:
        try:
            if self._admission is not None:
                self._admission.enter()
                self._admitted = True
        except ServiceError as error:
            await self._answer_error(error)
        if self._metrics is not None:  # inference: drop an expired call before any work
            remaining = self._read_deadline()
            if remaining is not None and remaining <= 0:
                # Its client has stopped waiting and gRPC ends the call with
                # DEADLINE_EXCEEDED itself: count it, send nothing (a status sent on the dead
                # call fails and gRPC logs that at ERROR), end the handler as gRPC ends a
                # cancelled one.
                logger.debug("%s: %s", self.rpc, EXPIRED_ON_ARRIVAL)
                self._finish(grpc.StatusCode.DEADLINE_EXCEEDED)
                raise asyncio.CancelledError(EXPIRED_ON_ARRIVAL)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if error is None:
            if self._expired():  # computed, but its client has stopped waiting: send nothing
                self._finish(grpc.StatusCode.DEADLINE_EXCEEDED)
                raise asyncio.CancelledError(EXPIRED_BEFORE_ANSWER)
            self._finish(grpc.StatusCode.OK)
            return False
        if isinstance(error, asyncio.CancelledError):
            # The client went away or its deadline passed; gRPC answers for us.
            remaining = self.context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self._finish(code)
            return False
        if isinstance(error, grpc.aio.AbortError):  # a servicer aborted on purpose
            self._finish(self.context.code() or grpc.StatusCode.UNKNOWN)
            return False
        await self._answer_error(error)
        return False  # unreachable: abort() raises

    async def _answer_error(self, error: BaseException) -> None:
        """Logs, counts and aborts the RPC with the error's status (raises AbortError); a call
        whose deadline has passed gets no status (see `_expired`)."""
        code, message = status_of(error)
        if code == grpc.StatusCode.INTERNAL and not isinstance(error, InternalError):
            logger.error("%s failed", self.rpc, exc_info=error)
        else:
            logger.debug("%s answered %s: %s", self.rpc, code.name, message)
        if self._expired():
            self._finish(grpc.StatusCode.DEADLINE_EXCEEDED)
            raise asyncio.CancelledError(EXPIRED_BEFORE_ANSWER)
        self._finish(code)
        try:
            await self.context.abort(code, message)
        except ExecuteBatchError:  # gRPC ended the call between the check and the send
            logger.debug("%s: the call ended before its status could be sent", self.rpc)
            raise asyncio.CancelledError(EXPIRED_BEFORE_ANSWER) from None

    def _expired(self) -> bool:
        """Whether the call's gRPC deadline has passed. gRPC then ends the call with
        DEADLINE_EXCEEDED itself, and its client has stopped waiting: a status or response
        sent on it fails, and grpc.aio logs that failure at ERROR with a traceback. The handler
        ends as gRPC ends a cancelled one instead."""
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= 0

    def _finish(self, code: grpc.StatusCode | object) -> None:
        if self._admitted:
            self._admitted = False
            assert self._admission is not None
            self._admission.leave()
        if self._metrics is None:
            return
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        latency_s = time.perf_counter() - self._started
        if self._model is None:
            self._metrics.observe_request("", "", self.rpc, name, latency_s)
            return
        self._model.in_flight.dec()
        self._model.observe_request(self.rpc, name, latency_s)
