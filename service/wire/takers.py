"""More than one outstanding request to gRPC core for the next call of the inference methods.

gRPC core hands a server a call only against a request for one (`request_call`). grpc.aio keeps
one such request outstanding per method and makes the next only after the event loop has taken
the last answer up: one round trip through its poller thread and the loop per call. A call that
arrives with no request outstanding waits in core's first-in-first-out list of pending calls,
and that list drains at the round trip's rate, whatever the loop has to spare. Under load, and
above all under a flood of calls whose deadline passes while they wait (their clients have gone;
core hands them over all the same), every other client's call waits behind them:
docs/reliability.md measured 1 % to 2 % of the normal answer rate beside such a flood.

`CallTakers` keeps `count` more requests outstanding for each method it is given (ModelInfer
and Classify): each is a task that takes a call, hands it to grpc.aio's own per-call handling
(the same interceptors, the same handler, the same cancellation) and asks for the next. Core
matches arriving calls to every outstanding request, so calls are taken up in bursts, one loop
turn for many, and the list drains as fast as the loop can run the handlers, which drop an
expired call before any work.

grpc.aio has no public API for this: the takers use four of its internals
(`AioServer._request_registered_call`, `_handle_rpc`, `_schedule_rpc_coro`, `_MethodResolver`),
checked at start by name and by the names of the parameters passed. Where a grpcio lacks them or
takes others (constraints.txt pins the version tested), the server warns once and serves with
grpc.aio's single request per method.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

logger = logging.getLogger(__name__)


# The parameters the takers pass, by position, as grpc.aio's own main loop does (grpcio 1.85).
SIGNATURES = {
    "_handle_rpc": (
        "method_name", "method_resolver", "interceptors", "rpc_state", "loop",
        "concurrency_exceeded",
    ),
    "_schedule_rpc_coro": ("rpc_coro", "rpc_state", "loop", "method_name"),
}  # fmt: skip


def _internals() -> tuple[Any, str | None]:
    """grpc.aio's Cython module and, when it lacks what the takers use, why."""
    try:
        from grpc._cython import cygrpc
    except ImportError as error:  # pragma: no cover: grpcio always ships it
        return None, f"grpc._cython.cygrpc cannot be imported ({error})"
    needed = ("_handle_rpc", "_schedule_rpc_coro", "_MethodResolver", "_RequestCallError")
    problems = [f"lacks {name}" for name in needed if not hasattr(cygrpc, name)]
    if not hasattr(getattr(cygrpc, "AioServer", None), "_request_registered_call"):
        problems.append("lacks AioServer._request_registered_call")
    for name, parameters in SIGNATURES.items():
        code = getattr(getattr(cygrpc, name, None), "__code__", None)
        if code is not None and code.co_varnames[: len(parameters)] != parameters:
            problems.append(f"has {name}({', '.join(code.co_varnames[: code.co_argcount])})")
    if problems:
        return None, f"this grpcio ({grpc.__version__}) {'; '.join(problems)}"
    return cygrpc, None


class CallTakers:
    """`count` outstanding requests for the next call of each method in `handlers`.

    The methods must be registered methods of `server` (`add_registered_method_handlers`,
    before it starts); `interceptors` are the ones the server was built with (grpc.aio's
    `maximum_concurrent_rpcs` limiter is not consulted: the server does not set it). `start()`
    after `server.start()`; `stop()` after `server.stop()`: core fails every outstanding request
    when the server shuts down, and each taker ends there (cancelling one while core still
    holds its request would free what core writes the next call into). A call a taker has
    taken is always handed on, even while the server stops: it is answered like any other.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        handlers: Mapping[str, grpc.RpcMethodHandler],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        count: int,
    ) -> None:
        self._server = server
        self._handlers = dict(handlers)
        self._interceptors = tuple(interceptors)
        self._count = count
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Task[None]] = set()
        self.taken = 0  # calls these takers took up (grpc.aio's own taker counts none)
        self.failed_requests = 0  # requests core failed while the server ran (then asked again)

    def start(self) -> None:
        if self._count == 0 or not self._handlers:
            return
        cygrpc, missing = _internals()
        if cygrpc is None:
            logger.warning(
                "call_takers %d: %s; serving with grpc.aio's one request per method "
                "(calls are taken up one loop turn at a time: docs/reliability.md)",
                self._count, missing,
            )  # fmt: skip
            return
        loop = asyncio.get_running_loop()
        resolver = cygrpc._MethodResolver([], self._handlers)
        core_server = self._server._server  # grpc.aio.Server wraps cygrpc.AioServer
        for method in self._handlers:
            for _ in range(self._count):
                task = loop.create_task(
                    self._take(cygrpc, core_server, resolver, method), name=f"take {method}"
                )
                task.add_done_callback(_report_failure)
                self._tasks.append(task)
        logger.info(
            "call takers: %d requests outstanding for the next call of each of %s "
            "(grpc.aio's own one and %d more)",
            self._count + 1, ", ".join(sorted(self._handlers)), self._count,
        )  # fmt: skip

    async def _take(self, cygrpc: Any, core_server: Any, resolver: Any, method: str) -> None:
        loop = asyncio.get_running_loop()
        method_bytes = method.encode()
        while core_server.is_running():
            try:
                rpc_state = await core_server._request_registered_call(method_bytes)
            except cygrpc._RequestCallError:
                # At shutdown core fails every outstanding request (the loop then ends); while
                # the server runs it fails one whose call ended before it was handed over.
                if core_server.is_running():
                    self.failed_requests += 1
                    logger.debug("gRPC core failed a request for %s; asking again", method)
                continue
            self.taken += 1
            handling = cygrpc._handle_rpc(
                method, resolver, self._interceptors, rpc_state, loop, False
            )
            call = loop.create_task(
                cygrpc._schedule_rpc_coro(handling, rpc_state, loop, method), name=method
            )
            self._calls.add(call)  # the loop keeps only a weak reference to a task
            call.add_done_callback(self._calls.discard)

    async def stop(self, timeout_s: float) -> None:
        """Ends the takers and waits up to `timeout_s` for the calls they handed on. Call it
        after the server stopped: core has failed their requests by then."""
        if self._server._server.is_running():
            raise RuntimeError("CallTakers.stop() before the gRPC server stopped")
        for task in self._tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if not self._calls:
            return
        _, running = await asyncio.wait(self._calls, timeout=timeout_s)
        if running:
            logger.warning(
                "%d calls taken by the call takers still running %.1f s after gRPC stopped",
                len(running), timeout_s,
            )  # fmt: skip


def _report_failure(task: asyncio.Task[None]) -> None:
    """A taker that fails is logged at once; grpc.aio's own taker and the others go on."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())
