"""SIGTERM under load: every call taken before the drain is answered, every later one is
refused with UNAVAILABLE, and the process exits as soon as the drain ends."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from service._proto import grpc_service_pb2_grpc as pb2_grpc
from tests.faults.clients import CHANNEL_OPTIONS, Outcomes, images, infer_request, timed
from tests.faults.conftest import FaultServer

pytestmark = pytest.mark.faults
CLIENTS = 64
# What a client may see once the server stopped listening: the call never reached it.
NOT_CONNECTED = ("connect", "Connection refused", "Socket closed", "GOAWAY", "unavailable")


@pytest.mark.server_flags("--grace-period-s", "60")
def test_sigterm_under_load_loses_no_accepted_call(fault_server: FaultServer) -> None:
    server = fault_server
    outcomes = Outcomes()
    message = infer_request(images(1, seed=6))

    async def scenario() -> float:
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            infer = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            stopped = asyncio.Event()

            async def client() -> None:  # closed loop until the server is gone
                while True:
                    code = await timed(infer(message, timeout=120), outcomes)
                    if code != "OK" and stopped.is_set():
                        return

            clients = [asyncio.ensure_future(client()) for _ in range(CLIENTS)]
            while len(outcomes.items) < 2000:  # load is running
                await asyncio.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.perf_counter()
            stopped.set()
            await asyncio.gather(*clients)
            exit_code = await asyncio.to_thread(server.process.wait, 120)
            assert exit_code == 0
            return time.perf_counter() - signalled

    drain_s = asyncio.run(scenario())
    codes = outcomes.codes()
    refused = [o for o in outcomes.items if o.code == "UNAVAILABLE"]
    draining = [o for o in refused if "shutting down" in o.details]
    print(
        f"\nSIGTERM at {CLIENTS} clients (grace 60 s): {outcomes.summary()}; "
        f"UNAVAILABLE 'shutting down' {len(draining)}, not connected "
        f"{len(refused) - len(draining)}; exited {drain_s * 1000:.0f} ms after SIGTERM"
    )
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes  # nothing CANCELLED, nothing lost
    assert drain_s < 60  # it exited when the drain ended, not when the grace would have
    assert all(
        "shutting down" in o.details or any(s in o.details for s in NOT_CONNECTED) for o in refused
    ), {o.details for o in refused}
    output = server.output()
    assert "still unanswered" not in output and "stopped" in output
