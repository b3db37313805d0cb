"""gRPC health checking (grpc.health.v1: Check and Watch) that follows the server's readiness.

Written here rather than taken from grpcio-health-checking's reference servicer so that `Watch`
streams end when the server drains: an open Watch would otherwise hold the shutdown for the
whole grace period. Every service starts NOT_SERVING, except `liveness`.

`liveness` (LIVENESS_SERVICE) is for liveness probes: SERVING from the start while the process
runs, NOT_SERVING once it drains, and unmoved by readiness. A model that failed to load makes
"" NOT_SERVING (strict readiness) but must not make Kubernetes restart the pod in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.errors import UnknownService, client_text
from service.wire.status import Call

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS_SERVICE = "liveness"


class HealthService(health_pb2_grpc.HealthServicer):
    """Health of the whole server ("") and of each named gRPC service, all set together;
    `liveness` apart: SERVING until close()."""

    def __init__(self, services: Sequence[str]) -> None:
        self._status = dict.fromkeys(("", *services), NOT_SERVING)
        self._status[LIVENESS_SERVICE] = SERVING
        self._changed = asyncio.Condition()
        self._version = 0
        self._closed = False
        self._watchers = 0

    async def set_serving(self, serving: bool) -> None:
        """Publishes the status of every service; ignored once closed."""
        if not self._closed:
            await self._publish(SERVING if serving else NOT_SERVING)

    def status(self, service: str) -> Any:
        """The published status of `service`; None when no such service is known."""
        return self._status.get(service)

    async def close(self, timeout_s: float = 1.0) -> None:
        """NOT_SERVING for good; open Watch streams get it and end (waits up to timeout_s for
        them to send it before the server stops writing)."""
        await self._publish(NOT_SERVING, close=True)
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: not self._watchers), timeout_s
                )

    async def _publish(self, status: Any, close: bool = False) -> None:
        async with self._changed:
            self._status = {
                name: old if name == LIVENESS_SERVICE and not close else status
                for name, old in self._status.items()
            }
            self._closed = self._closed or close
            self._version += 1
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        async with Call("Check", context):
            status = self.status(request.service)
            if status is None:
                known = ", ".join(repr(name) for name in self._status)
                raise UnknownService(
                    f"unknown service {client_text(request.service)}; known: {known}"
                )
            return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        self._watchers += 1
        try:
            while True:
                async with self._changed:  # status and closed read together: no lost update
                    seen, closed = self._version, self._closed
                    status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                if closed:
                    return
                async with self._changed:
                    while self._version == seen:
                        await self._changed.wait()
        finally:
            async with self._changed:
                self._watchers -= 1
                self._changed.notify_all()
