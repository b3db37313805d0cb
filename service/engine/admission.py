"""Which calls the server takes, and when a drain is done. No gRPC in here.

Every inference-service call enters through `Admission.enter()` and leaves through `leave()`.
Until `begin_drain()` every call is taken; after it, none: `enter()` raises ModelNotReady
(UNAVAILABLE, "shutting down") so a client retries elsewhere, and `drained()` waits until the
calls taken before the drain have all been answered, and `quiet()` until callers stop arriving.
The server closes gRPC only then, so no call that was taken is cut off (grpc's own
`stop(grace)` cancels what is still running when it ends, and the calls it holds that no
handler has taken up yet get CANCELLED rather than a message).
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
        self.refused = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_arrival = 0.0

    def enter(self) -> None:
        """Takes a call, or raises ModelNotReady while draining."""
        self._last_arrival = asyncio.get_running_loop().time()
        if self.draining:
            self.refused += 1
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

    async def quiet(self, quiet_s: float, until: float) -> None:
        """Waits until no call has arrived for `quiet_s` (or the loop time `until`).

        Once gRPC stops, calls that reached it but not yet a handler are cancelled, not
        refused with a message. Clients learn of the drain from the refusals (or from their
        load balancer) and stop sending; waiting for that quiet lets the last of them be
        refused properly."""
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < until:
            wait_s = self._last_arrival + quiet_s - now
            if wait_s <= 0:
                return
            await asyncio.sleep(min(wait_s, until - now))
