"""Which calls the server takes, and when a drain is done. No gRPC in here.

Every inference-service call enters through `Admission.enter()` and leaves through `leave()`.
Until `begin_drain()` every call is taken; after it, none: `enter()` raises ModelNotReady
(UNAVAILABLE, "shutting down") so a client retries elsewhere, and `drained()` waits until the
calls taken before the drain have all been answered. The server closes gRPC only then, so no
call that was taken is cut off (grpc's own `stop(grace)` cancels what is still running when it
ends, and refuses late arrivals with CANCELLED rather than a message).
"""

from __future__ import annotations

import asyncio
import contextlib

from service.errors import ModelNotReady

DRAINING_MESSAGE = (
    "the server is shutting down and takes no new calls; retry (another replica answers)"
)


class Admission:
    """Counts the calls in flight; refuses new ones once draining."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Takes a call, or raises ModelNotReady while draining."""
        if self.draining:
            raise ModelNotReady(DRAINING_MESSAGE)
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A call taken by enter() was answered (or failed)."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        """From now on every new call is refused."""
        self.draining = True

    async def drained(self, timeout_s: float) -> bool:
        """Waits until every call taken has been answered; False if `timeout_s` passed first."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()
