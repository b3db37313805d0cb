"""Connections opened, calls cancelled and connections dropped by the hundred: the in-flight
gauge returns to 0, no descriptor leaks, and the server answers correctly afterwards."""

from __future__ import annotations

import signal
import socket

import grpc
import numpy as np
import pytest

from service._proto import grpc_service_pb2_grpc as pb2_grpc
from tests.faults.clients import images, infer_request
from tests.faults.conftest import FaultServer
from tests.model_factory import TinySpec, reference_logits
from tests.service.gates import wait_until

pytestmark = pytest.mark.faults
CONNECTIONS = 200


def in_flight(server: FaultServer) -> float:
    return server.sample("convserve_requests_in_flight", model="tiny", version="1")


@pytest.mark.gated
@pytest.mark.server_flags("--queue-capacity", "1024")
def test_cancelled_calls_and_dropped_connections_leave_nothing_behind(
    fault_server: FaultServer,
) -> None:
    server = fault_server
    baseline_fds, baseline_rss = server.open_fds(), server.rss_mb()
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection a channel
    channels = [
        grpc.insecure_channel(server.address, options=own_connection) for _ in range(CONNECTIONS)
    ]
    futures = [
        pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(
            infer_request(images(1, seed=i)), timeout=120
        )
        for i, channel in enumerate(channels)
    ]
    wait_until(lambda: in_flight(server) == CONNECTIONS, f"{CONNECTIONS} calls held at the gate")
    peak_fds = server.open_fds()
    assert peak_fds >= baseline_fds + CONNECTIONS  # really that many connections
    for future in futures[: CONNECTIONS // 2]:
        future.cancel()  # the client gives up
    for channel in channels[CONNECTIONS // 2 :]:
        channel.close()  # the connection goes away under its call
    raw = []
    for i in range(CONNECTIONS):  # and sockets that never speak HTTP/2 properly
        sock = socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1])))
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if i % 2 else b"GET / HTTP/1.1\r\n\r\n")
        raw.append(sock)
    for sock in raw:
        sock.close()
    wait_until(lambda: in_flight(server) == 0, "the in-flight gauge back to 0")
    server.process.send_signal(signal.SIGUSR1)  # open the gate: nothing was left waiting
    for channel in channels[: CONNECTIONS // 2]:
        channel.close()  # their calls were cancelled; now their connections go too
    wait_until(lambda: server.open_fds() <= baseline_fds + 4, "descriptors back to the baseline")
    print(
        f"\n{CONNECTIONS} calls cancelled or cut off, {CONNECTIONS} raw sockets: fds "
        f"{baseline_fds} -> {peak_fds} (peak) -> {server.open_fds()}; RSS "
        f"{baseline_rss:.0f} -> {server.rss_mb():.0f} MB; in flight {in_flight(server):.0f}"
    )
    cancelled = server.sample(
        "convserve_requests_total", code="CANCELLED", model="tiny", rpc="ModelInfer", version="1"
    )
    assert cancelled == CONNECTIONS
    with grpc.insecure_channel(server.address) as channel:
        array = images(2, seed=7)
        reply = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(array), timeout=60
        )
    logits = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(logits, reference_logits(TinySpec(), array), atol=1e-5)
