"""Model versions while the server runs: new versions go live under load with no failed
request, broken ones never replace a working one, and load/unload through the API.

The load is real: closed-loop gRPC clients in threads, each sending ModelInfer and checking
the logits against the version that answered. Nothing waits on time: the tests wait on
observable state (answers from a version, RepositoryIndex), and the only ordering claim (a
request sent after version 2 answered never gets version 1) follows from the routing rule,
whatever the machine's speed. Each load is bounded in count.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.engine.manager import LoadedModel, ModelManager
from service.errors import ModelLoadError
from service.repository.disk import ModelRepository, VersionDir
from service.repository.policy import Batching, VersionPolicy, parse_model_config
from tests.model_factory import TinySpec, reference_logits, write_version
from tests.service.conftest import RunningServer, StartServer, random_images
from tests.service.gates import BatchGate, wait_until
from tests.service.model_builders import write_broken_version
from tests.service.test_inference_api import infer_request, logits_of

SPECS = {1: TinySpec(seed=1), 2: TinySpec(seed=2), 3: TinySpec(seed=3)}
MAX_CALLS_PER_CLIENT = 3000  # a bound on the load, whatever happens


def publish(repository: Path, name: str, version: int, write: Callable[[Path], object]) -> None:
    """The publishing rule: write the version elsewhere in the model directory, then rename
    it into place (what `training` does)."""
    staging = repository / name / f".tmp-{version}"
    write(staging)
    os.rename(staging / name / str(version), repository / name / str(version))


def staged_version(name: str, version: int) -> Callable[[Path], object]:
    return lambda staging: write_version(staging, name, version, SPECS[version])


def staged_broken(name: str, version: int) -> Callable[[Path], object]:
    return lambda staging: write_broken_version(staging, name, version)


@dataclass
class Answer:
    model: str
    version: str  # "" when refused
    code: str
    details: str
    sent_at: float
    answered_at: float


@dataclass
class Load:
    """Closed-loop clients against one server; every answer recorded and checked."""

    running: RunningServer
    models: tuple[str, ...] = ("tiny",)
    clients_per_model: int = 16
    answers: list[Answer] = field(default_factory=list)
    wrong_logits: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for model in self.models:
            for client in range(self.clients_per_model):
                thread = threading.Thread(target=self._client, args=(model, client), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def _client(self, model: str, client: int) -> None:
        stub = pb2_grpc.GRPCInferenceServiceStub(self.running.channel())
        rng = np.random.default_rng(client)
        specs = SPECS if model == "tiny" else {1: TinySpec(seed=7)}
        for _ in range(MAX_CALLS_PER_CLIENT):
            if self._stop.is_set():
                return
            images = rng.integers(0, 256, size=(1, 1, 28, 28), dtype=np.uint8)
            sent_at = time.monotonic()
            try:
                response = stub.ModelInfer(infer_request(images, model), timeout=60)
            except grpc.RpcError as error:
                answer = Answer(
                    model, "", error.code().name, error.details() or "", sent_at, time.monotonic()
                )
            else:
                answer = Answer(model, response.model_version, "OK", "", sent_at, time.monotonic())
                expected = reference_logits(specs[int(response.model_version)], images)
                if not np.allclose(logits_of(response), expected, atol=1e-5):
                    with self._lock:
                        self.wrong_logits.append(f"{model} v{response.model_version}")
            with self._lock:
                self.answers.append(answer)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def count(self, **match: str) -> int:
        return sum(
            all(getattr(a, key) == value for key, value in match.items()) for a in self.snapshot()
        )

    def wait_for(self, what: str, more: int = 1, **match: str) -> None:
        """Waits until `more` further answers matching `match` have come."""
        target = self.count(**match) + more
        wait_until(lambda: self.count(**match) >= target, what, timeout_s=120)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # also when the test failed: no client outlives its server

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return self.snapshot()


def index(running: RunningServer) -> dict[tuple[str, str], tuple[str, str]]:
    reply = running.inference_stub().RepositoryIndex(pb2.RepositoryIndexRequest(), timeout=30)
    return {(m.name, m.version): (m.state, m.reason) for m in reply.models}


def test_new_versions_go_live_under_load_and_a_broken_one_changes_nothing(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_version(tmp_path, "tiny", 1, SPECS[1])
    poll_s = 0.05  # how often to look; nothing below depends on when a poll happens
    running = start_server(tmp_path, model_control_mode="poll", repository_poll_s=poll_s)
    with Load(running) as load:
        load.wait_for("answers from version 1", 50, version="1")

        published_at = time.monotonic()
        publish(tmp_path, "tiny", 2, staged_version("tiny", 2))
        load.wait_for("answers from version 2", 1, version="2")
        first_v2 = min(a.answered_at for a in load.snapshot() if a.version == "2")
        load.wait_for("more answers from version 2", 200, version="2")
        wait_until(lambda: index(running)[("tiny", "1")][0] == "UNAVAILABLE", "version 1 unloaded")

        publish(tmp_path, "tiny", 3, staged_broken("tiny", 3))
        wait_until(
            lambda: index(running).get(("tiny", "3"), ("", ""))[0] == "UNAVAILABLE",
            "version 3 reported as failed",
        )
        load.wait_for("answers after the broken version", 200, version="2")
    answers = load.snapshot()

    codes = Counter(a.code for a in answers)
    assert codes == {"OK": len(answers)}, f"failed requests: {codes}"
    assert not load.wrong_logits, load.wrong_logits[:5]
    late_v1 = [a for a in answers if a.sent_at > first_v2 and a.version != "2"]
    assert not late_v1, f"{len(late_v1)} requests sent after version 2 answered got another"
    state, reason = index(running)[("tiny", "3")]
    assert state == "UNAVAILABLE" and "ONNX Runtime cannot load" in reason
    assert index(running)[("tiny", "2")] == ("READY", "")
    events = "convserve_model_lifecycle_events_total"
    assert running.metric(events, model="tiny", event="load", outcome="failed") == 1
    assert running.metric(events, model="tiny", event="load", outcome="ok") == 2
    assert running.metric(events, model="tiny", event="unload", outcome="ok") == 1
    assert running.metric("convserve_model_versions_ready", model="tiny") == 1
    by_version = Counter(a.version for a in answers)
    with capsys.disabled():
        print(
            f"\nswap under load (16 clients, poll every {poll_s} s): {len(answers)} requests, "
            f"0 failed; answers by version {dict(sorted(by_version.items()))}; version 2 "
            f"answered {first_v2 - published_at:.2f} s after it was published"
        )


def test_unload_and_load_through_the_api_under_load(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_version(tmp_path, "tiny", 1, SPECS[1])
    write_version(tmp_path, "other", 1, TinySpec(seed=7))
    running = start_server(tmp_path, model_control_mode="explicit", load_models=("*",))
    stub = running.inference_stub()
    with Load(running, models=("tiny", "other"), clients_per_model=8) as load:
        load.wait_for("answers from tiny", 50, model="tiny", code="OK")
        unload = pb2.RepositoryModelUnloadRequest(model_name="tiny")
        stub.RepositoryModelUnload(unload, timeout=60)
        assert index(running)[("tiny", "1")] == (
            "UNAVAILABLE",
            "unloaded (RepositoryModelUnload)",
        )
        load.wait_for("refusals for the unloaded model", 50, model="tiny", code="NOT_FOUND")
        load.wait_for("answers from the other model meanwhile", 50, model="other", code="OK")
        stub.RepositoryModelLoad(pb2.RepositoryModelLoadRequest(model_name="tiny"), timeout=60)
        load.wait_for("answers from tiny again", 50, model="tiny", code="OK")
    answers = load.snapshot()

    assert not load.wrong_logits
    other = Counter(a.code for a in answers if a.model == "other")
    assert other == {"OK": sum(other.values())}, other
    tiny = Counter(a.code for a in answers if a.model == "tiny")
    assert set(tiny) <= {"OK", "NOT_FOUND", "UNAVAILABLE"}, tiny  # never INTERNAL
    refused = {a.details for a in answers if a.model == "tiny" and a.code != "OK"}
    assert refused and all("tiny" in details for details in refused), refused


def test_a_request_taken_before_an_unload_is_answered_by_its_version(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_version(tmp_path, "tiny", 1, SPECS[1])
    gate = BatchGate()
    running = start_server(
        tmp_path, model_control_mode="explicit", load_models=("tiny",), wrap_run=gate.wrap
    )
    try:
        check_unload_waits_for_what_it_took(running, gate)
    finally:
        gate.open()  # a failed check must not leave the server's batch waiting forever


def check_unload_waits_for_what_it_took(running: RunningServer, gate: BatchGate) -> None:
    stub = running.inference_stub()
    images = random_images(1, seed=3)
    held = stub.ModelInfer.future(infer_request(images), timeout=60)
    gate.wait_arrived(1)  # its batch is computing (held at the gate)
    unloading = stub.RepositoryModelUnload.future(
        pb2.RepositoryModelUnloadRequest(model_name="tiny"), timeout=60
    )
    wait_until(lambda: index(running)[("tiny", "1")][0] == "UNLOADING", "version 1 unloading")
    late = stub.ModelInfer.future(infer_request(images), timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        late.result()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == (
        "model tiny is unloaded (RepositoryModelUnload); load it with RepositoryModelLoad"
    )
    assert not unloading.done()  # waits for the request it took
    gate.open()
    response = held.result()
    np.testing.assert_allclose(logits_of(response), reference_logits(SPECS[1], images), atol=1e-5)
    unloading.result()
    assert index(running)[("tiny", "1")] == ("UNAVAILABLE", "unloaded (RepositoryModelUnload)")


def test_repository_api_errors_name_the_problem(start_server: StartServer, tmp_path: Path) -> None:
    write_version(tmp_path, "tiny", 1, SPECS[1])
    write_broken_version(tmp_path, "broken", 1)
    polling = start_server(tmp_path, model_control_mode="poll", strict_readiness=False)
    with pytest.raises(grpc.RpcError) as caught:
        polling.inference_stub().RepositoryModelLoad(
            pb2.RepositoryModelLoadRequest(model_name="tiny"), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == (
        "explicit model load is not allowed in model control mode poll: the server polls the "
        "repository; start the server with --model-control-mode explicit"
    )
    explicit = start_server(tmp_path, model_control_mode="explicit")
    stub = explicit.inference_stub()
    assert explicit.inference_stub().ServerReady(pb2.ServerReadyRequest()).ready  # none loaded
    assert index(explicit)[("tiny", "1")] == (
        "UNAVAILABLE",
        "not loaded (RepositoryModelLoad loads it)",
    )

    def refused(call: Callable[[], object]) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        return caught.value

    error = refused(
        lambda: stub.RepositoryModelLoad(pb2.RepositoryModelLoadRequest(model_name="nope"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no model 'nope' in the model repository; it has: broken, tiny"
    error = refused(lambda: stub.RepositoryModelLoad(pb2.RepositoryModelLoadRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = refused(
        lambda: stub.RepositoryModelLoad(pb2.RepositoryModelLoadRequest(model_name="broken"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("failed to load model broken: version 1: ONNX Runtime")
    error = refused(
        lambda: stub.RepositoryModelUnload(pb2.RepositoryModelUnloadRequest(model_name="tiny"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'tiny' is not loaded; loaded: none"
    request = pb2.RepositoryModelLoadRequest(model_name="tiny")
    request.parameters["config"].string_param = "{}"
    error = refused(lambda: stub.RepositoryModelLoad(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported load parameter 'config'" in error.details()
    stub.RepositoryModelLoad(pb2.RepositoryModelLoadRequest(model_name="tiny"), timeout=30)
    assert stub.ModelReady(pb2.ModelReadyRequest(name="tiny")).ready


def test_config_json_sets_policy_and_batching_per_model(
    start_server: StartServer, tmp_path: Path
) -> None:
    for version in (1, 2, 3):
        write_version(tmp_path, "tiny", version, SPECS[version])
    (tmp_path / "tiny" / "config.json").write_text(
        json.dumps({"version_policy": "specific 1,3", "max_batch_size": 4})
    )
    write_version(tmp_path, "bad", 1, TinySpec())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"max_batch_size": 0}))
    running = start_server(tmp_path, strict_readiness=False)
    stub = running.inference_stub()
    metadata = stub.ModelMetadata(pb2.ModelMetadataRequest(name="tiny"))
    assert list(metadata.versions) == ["1", "3"]
    images = random_images(1, seed=5)
    for version in ("1", "3"):
        response = stub.ModelInfer(infer_request(images, model_version=version))
        expected = reference_logits(SPECS[int(version)], images)
        np.testing.assert_allclose(logits_of(response), expected, atol=1e-5)
    assert stub.ModelInfer(infer_request(images)).model_version == "3"  # the newest ready
    config = stub.ModelConfig(pb2.ModelConfigRequest(name="tiny")).config
    assert (config.max_batch_size, list(config.version_policy.specific.versions)) == (4, [1, 3])
    assert index(running)[("tiny", "2")] == (
        "UNAVAILABLE",
        "not in the version policy (specific 1,3)",
    )
    assert index(running)[("bad", "")][0] == "UNAVAILABLE"
    assert "max_batch_size must be an integer >= 1, got 0" in index(running)[("bad", "")][1]


def test_version_policies_choose_among_the_versions_that_can_serve() -> None:
    assert VersionPolicy.parse("latest 2").select([1, 2, 5]) == {2, 5}
    assert VersionPolicy.parse("latest").select([3, 1]) == {3}
    assert VersionPolicy.parse("all").select([1, 2]) == {1, 2}
    assert VersionPolicy.parse("specific 3, 1").select([1, 2]) == {1}
    assert str(VersionPolicy.parse("  specific 3,1 ")) == "specific 1,3"
    for bad in ("latest 0", "newest 1", "specific", "all 2", "latest -1", "specific 1,x"):
        with pytest.raises(ValueError, match="expected one of: latest N, all, specific"):
            VersionPolicy.parse(bad)
    for raw, message in (
        ({"max_batch_size": "8"}, 'max_batch_size must be an integer >= 1, got "8"'),
        ({"queue_capacity": True}, "queue_capacity must be an integer >= 1, got true"),
        ({"version_policy": "newest"}, "version_policy: bad version policy 'newest'"),
        ({"batch": 1}, "unknown key 'batch'; allowed keys: version_policy, max_batch_size"),
        ([], "must hold a JSON object"),
    ):
        with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
            parse_model_config(raw, "m/config.json")


class FakeVersion:
    """What the manager needs of a loaded version, without a session (routing tests)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.leases = 0
        self.closed = False
        self.metrics = self

    def set_ready(self, ready: bool) -> None:
        pass

    async def retire(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def test_a_version_still_being_written_is_not_served_until_complete(tmp_path: Path) -> None:
    write_version(tmp_path, "tiny", 1, SPECS[1])
    (tmp_path / "tiny" / "2").mkdir()  # a copy under way: no model.onnx yet
    loaded: list[FakeVersion] = []
    copying = {"2": True}

    async def loader(name: str, version_dir: VersionDir, batching: Batching) -> LoadedModel:
        version = FakeVersion(version_dir.number)
        loaded.append(version)
        if version_dir.number == 2 and copying["2"]:  # the copy goes on while it loads
            (version_dir.path / "labels.txt").write_text("still\ncopying\n")
        return typing.cast(LoadedModel, version)

    manager = ModelManager(ModelRepository(tmp_path), loader, mode="poll")
    await manager.start()
    rows = {(r.version): (r.state, r.reason) for r in await manager.index()}
    assert rows["2"] == (
        "UNAVAILABLE",
        "no model.onnx (incomplete: publish by renaming a finished directory)",
    )
    write_version(tmp_path / "staging", "tiny", 2, SPECS[2])
    (tmp_path / "staging" / "tiny" / "2" / "model.onnx").rename(tmp_path / "tiny/2/model.onnx")
    await manager.sync()  # model.onnx is there, but the files change during the load
    rows = {(r.version): (r.state, r.reason) for r in await manager.index()}
    assert rows["2"] == (
        "UNAVAILABLE",
        "its files changed while it loaded (still being copied?); retried",
    )
    assert loaded[-1].closed and typing.cast(FakeVersion, manager.resolve("tiny")).number == 1
    copying["2"] = False  # the copy is over
    await manager.sync()
    assert typing.cast(FakeVersion, manager.resolve("tiny")).number == 2
    assert [v.number for v in loaded] == [1, 2, 2] and loaded[0].closed  # 1 left the policy
