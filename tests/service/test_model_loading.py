"""The model repository: versions, pins, and failures that stay with their model."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto import grpc_service_pb2 as pb2
from service.engine import runtime as runtime_module
from service.engine.manager import LoadedModel, ModelManager
from service.engine.runtime import OnnxModel, RuntimeOptions, warm_up_batch_sizes
from service.errors import ConfigurationError, ModelLoadError, ModelNotFound
from service.repository.disk import ModelRepository, VersionDir
from service.repository.policy import Batching
from tests.model_factory import TinySpec, reference_logits, write_version
from tests.service.conftest import RecordedSession, StartServer, random_images
from tests.service.model_builders import write_broken_version, write_model_without_metadata
from tests.service.test_inference_api import infer_request, logits_of


class _FakeMetrics:
    def set_ready(self, ready: bool) -> None:
        pass


async def fake_loader(name: str, version_dir: VersionDir, batching: Batching) -> LoadedModel:
    """Loads nothing: the manager's routing is all these tests look at."""
    loaded = LoadedModel.__new__(LoadedModel)
    loaded.metrics = _FakeMetrics()  # type: ignore[assignment]
    loaded.leases = 0
    return loaded


def test_scan_lists_every_version_and_ignores_what_is_not_one(tmp_path: Path) -> None:
    write_version(tmp_path, "tiny", 1, TinySpec())
    write_version(tmp_path, "tiny", 10, TinySpec())
    (tmp_path / "tiny" / ".tmp-abc123").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("not a version")
    (tmp_path / "tiny" / "0").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "-dash").mkdir()  # not a model name (the training side refuses it too)
    write_version(tmp_path / "-dash", "x", 1, TinySpec())
    entries = ModelRepository(tmp_path).scan()
    assert [(e.name, e.versions, e.version) for e in entries] == [("tiny", (1, 10), 10)]
    assert all(v.fingerprint for v in entries[0].version_dirs)
    with pytest.raises(ConfigurationError, match="not a directory"):
        ModelRepository(tmp_path / "nowhere").scan()


def test_version_directories_without_a_model_are_listed_as_such(tmp_path: Path) -> None:
    write_version(tmp_path, "tiny", 1, TinySpec())
    (tmp_path / "tiny" / "2").mkdir()  # a copy under way, say: there, but not servable
    (tmp_path / "tiny" / "²").mkdir()  # "²".isdigit() is true; no version all the same
    (tmp_path / "tiny" / "3").write_text("a file, not a version directory")
    entry = ModelRepository(tmp_path).scan()[0]
    assert (entry.versions, entry.incomplete, entry.version) == ((1,), (2,), 1)
    assert entry.describe_versions() == "1, 2 (2 without model.onnx)"


async def test_names_and_versions_in_messages_are_shortened(tmp_path: Path) -> None:
    write_version(tmp_path, "tiny", 1, TinySpec())
    manager = ModelManager(ModelRepository(tmp_path), fake_loader)
    await manager.start()
    long = "m" * 8192
    with pytest.raises(ModelNotFound) as caught:
        manager.resolve(long)
    assert str(caught.value) == f"unknown model {long[:64]!r}... (8192 characters); available: tiny"
    with pytest.raises(ModelNotFound) as caught:
        manager.resolve("tiny", long)
    assert str(caught.value).startswith(
        f"model tiny version {long[:64]!r}... (8192 characters) is not served; ready versions: 1"
    )


def test_latest_version_is_served_unless_pinned(
    start_server: StartServer, two_version_repository: Path
) -> None:
    images = random_images(2, seed=1)
    latest = start_server(two_version_repository)
    response = latest.inference_stub().ModelInfer(infer_request(images))
    assert response.model_version == "2"
    np.testing.assert_allclose(
        logits_of(response), reference_logits(TinySpec(seed=2), images), atol=1e-5
    )
    with pytest.raises(grpc.RpcError) as caught:
        latest.inference_stub().ModelInfer(infer_request(images, model_version="1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == (
        "model tiny version '1' is not served; ready versions: 2 (version policy: latest 1; "
        "versions on disk: 1, 2)"
    )

    pinned = start_server(two_version_repository, model_versions={"tiny": 1})
    response = pinned.inference_stub().ModelInfer(infer_request(images, model_version="1"))
    np.testing.assert_allclose(
        logits_of(response), reference_logits(TinySpec(seed=1), images), atol=1e-5
    )


def test_a_broken_model_is_reported_and_does_not_take_the_others_down(
    start_server: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_version(tmp_path, "good", 1, TinySpec())
    write_broken_version(tmp_path, "broken", 3)
    write_model_without_metadata(tmp_path, "bare", TinySpec())
    with caplog.at_level(logging.ERROR):
        running = start_server(tmp_path)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "model broken version 3 failed to load: ONNX Runtime cannot load" in m for m in errors
    )
    assert any("model bare version 1 failed to load" in m and "no convserve" in m for m in errors)

    stub = running.inference_stub()
    assert stub.ModelReady(pb2.ModelReadyRequest(name="good")).ready
    assert not stub.ModelReady(pb2.ModelReadyRequest(name="broken")).ready
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer_request(random_images(1, 2), model="broken"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details()
    assert (
        details == "model broken has no ready version: version 3 failed to load; see the server log"
    )
    assert str(tmp_path) not in details  # no filesystem path or ONNX Runtime text to clients
    assert stub.ModelInfer(infer_request(random_images(1, 2), model="good")).model_name == "good"
    assert running.metric("convserve_model_ready", model="broken", version="3") == 0
    # strict readiness (the default): not ready while a model is broken ...
    assert not stub.ServerReady(pb2.ServerReadyRequest()).ready
    assert running.metric("convserve_server_ready") == 0
    # ... and ready with the healthy ones when relaxed.
    relaxed = start_server(tmp_path, strict_readiness=False)
    assert relaxed.inference_stub().ServerReady(pb2.ServerReadyRequest()).ready


def test_every_batch_size_up_to_max_batch_size_is_warmed_up(
    start_server: StartServer, tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert warm_up_batch_sizes(1) == [1]
    warmed: list[int] = []
    real_run = OnnxModel.run_blocking

    def recording_run(self: OnnxModel, images: np.ndarray) -> np.ndarray:
        warmed.append(len(images))
        return real_run(self, images)

    monkeypatch.setattr(OnnxModel, "run_blocking", recording_run)
    start_server(tiny_repository, max_batch_size=6)
    assert warmed == [1, 2, 3, 4, 5, 6]  # the batcher forms any size; none is new to a request


def scripted_timings(monkeypatch: pytest.MonkeyPatch, durations: list[float]) -> None:
    """The runtime's timings of a batch of one, as given (each run still happens)."""
    script = iter(durations)

    def timed(function: Callable[..., object], *args: object) -> float:
        function(*args)
        return next(script)

    monkeypatch.setattr(runtime_module, "_timed", timed)


def allow_spinning(model: OnnxModel) -> str:
    """What the model's ONNX Runtime session was made with."""
    options = model._session.get_session_options()
    return options.get_session_config_entry("session.intra_op.allow_spinning")


def test_spinning_is_as_set_or_on_for_a_model_whose_batch_of_one_is_long(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`on` and `off` make the session so and time nothing; `auto` times a batch of one and
    remakes the session spinning when it takes at least SPIN_MIN_RUN_S (the timings are
    scripted: the machine's speed decides nothing here); a model off the CPU never spins."""
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    scripted_timings(monkeypatch, [])  # any timing here fails the test
    for setting in ("on", "off"):
        model = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu", spinning=setting))
        assert (model.spinning, allow_spinning(model)) == (setting == "on", "10"[setting == "off"])
        model.close()
    assert not runtime_module.spins_when_auto("CUDAExecutionProvider", lambda: 1.0 / 0)

    limit = runtime_module.SPIN_MIN_RUN_S
    for timings, expected in (
        ([2 * limit, limit, 3 * limit], True),
        ([2 * limit, 0.9 * limit], False),
    ):
        scripted_timings(monkeypatch, timings + [limit] * 3)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="service.engine.runtime"):
            model = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu"))
        try:
            assert (model.spinning, allow_spinning(model)) == (expected, "01"[expected])
            assert ("threads spin between pieces of work" in caplog.text) == expected
            images = random_images(3, seed=11)
            np.testing.assert_allclose(
                model.run_blocking(images), reference_logits(TinySpec(), images), atol=1e-5
            )
        finally:
            model.close()


def test_a_model_that_fails_its_timed_run_is_a_load_error_and_leaves_no_thread(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` runs a batch of one at load: when that fails (a graph that loads but cannot run),
    the load fails with ModelLoadError and the model's worker threads are stopped."""
    path = tiny_repository / "tiny" / "1" / "model.onnx"

    def failing(function: Callable[..., object], *args: object) -> float:
        raise RuntimeError("Got: 1 Expected: 4")

    monkeypatch.setattr(runtime_module, "_timed", failing)
    before = set(threading.enumerate())
    with pytest.raises(ModelLoadError, match=r"cannot run .*Got: 1 Expected: 4"):
        OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu"))
    assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []


def test_runs_on_the_loop_get_a_single_threaded_session_when_it_is_short_and_no_slower(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_now` (the batcher's runs on the event loop) uses a session with one intra-op
    thread when a batch of one takes at most the limit on the model's session and on one
    thread, there at most LOOP_SESSION_MAX_SLOWDOWN (1.25) times as long; its answers are the
    model's. (The timings are scripted: the machine's speed decides nothing here.)"""
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    model = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu", intra_op_threads=2))
    single = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu", intra_op_threads=1))
    try:
        assert not model.prepare_loop_session(0.0, [1, 2])  # runs on the loop are off
        assert not single.prepare_loop_session(1.0, [1, 2])  # nothing to gain: one thread
        scripted_timings(monkeypatch, [0.003] * 3)
        assert not model.prepare_loop_session(0.002, [1, 2])  # too slow to run on the loop
        scripted_timings(monkeypatch, [0.001] * 3 + [0.0013] * 3)
        assert not model.prepare_loop_session(0.002, [1, 2])  # 1.3 times as long
        scripted_timings(monkeypatch, [0.0018] * 3 + [0.0021] * 3)
        assert not model.prepare_loop_session(0.002, [1, 2])  # over the limit on one thread
        assert not model.has_loop_session
        scripted_timings(monkeypatch, [0.001] * 3 + [0.0012] * 3)
        assert model.prepare_loop_session(0.002, [1, 2, 3])  # 1.2 times: half the CPU still
        assert model.has_loop_session
        for count in (1, 3, 5):  # 5: a size the warm-up did not run
            images = random_images(count, seed=40 + count)
            np.testing.assert_allclose(
                model.run_now(images), model.run_blocking(images), rtol=1e-5, atol=1e-6
            )
    finally:
        model.close()
        single.close()


def test_a_loop_session_that_cannot_be_made_leaves_the_model_serving(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    model = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu", intra_op_threads=2))

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runtime_module.ort, "InferenceSession", failing)
    try:
        assert not model.prepare_loop_session(10**9, [1])
        assert not model.has_loop_session
        assert "no single-threaded session" in caplog.text and "out of memory" in caplog.text
        images = random_images(2, seed=7)
        np.testing.assert_allclose(model.run_now(images), model.run_blocking(images))
    finally:
        model.close()


def test_symlinks_out_of_the_repository_are_refused_and_the_others_serve(
    start_server: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository, outside = tmp_path / "repository", tmp_path / "outside"
    write_version(repository, "good", 1, TinySpec())
    write_version(outside, "elsewhere", 1, TinySpec())
    elsewhere = (outside / "elsewhere").resolve()
    (repository / "linked_model").symlink_to(elsewhere)  # a model directory
    (repository / "linked_version").mkdir()
    (repository / "linked_version" / "1").symlink_to(elsewhere / "1")  # a version directory
    write_version(repository, "linked_file", 2, TinySpec())
    model_file = repository / "linked_file" / "2" / "model.onnx"
    model_file.unlink()
    model_file.symlink_to(Path("../../../outside/elsewhere/1/model.onnx"))  # relative, escaping
    (repository / "alias").symlink_to("good")  # inside the repository: served
    with caplog.at_level(logging.ERROR):
        running = start_server(repository, strict_readiness=False)
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    root = repository.resolve()
    for _model, what, path, target in (
        ("linked_model", "model directory", "linked_model", elsewhere),
        ("linked_version", "version directory", "linked_version/1", elsewhere / "1"),
        ("linked_file", "model file", "linked_file/2/model.onnx", elsewhere / "1/model.onnx"),
    ):
        assert f"{what} {repository / path} resolves to {target}, outside the model " in errors
        assert f"repository {root}; refused" in errors
    stub = running.inference_stub()
    for name in ("linked_model", "linked_version", "linked_file"):
        assert not stub.ModelReady(pb2.ModelReadyRequest(name=name)).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request(random_images(1, 2), model=name))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert str(outside) not in caught.value.details()  # paths stay in the log
    for name in ("good", "alias"):
        assert stub.ModelInfer(infer_request(random_images(1, 2), model=name)).model_name == name


def test_a_symlinked_repository_root_is_followed(tmp_path: Path) -> None:
    write_version(tmp_path / "real", "tiny", 1, TinySpec())
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (entry,) = ModelRepository(tmp_path / "link").scan()
    assert (entry.name, entry.version, entry.problem) == ("tiny", 1, "")


def intra_op_threads(session: object) -> int:
    """The intra-op threads an ONNX Runtime session was made with."""
    return int(session.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]


def test_batch_slots_share_the_cores_out_and_answer_as_the_model_does(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several batch slots (worker threads) and intra-op threads 0 (one a core), the
    workers' runs get the cores shared out among the slots; the model's own session keeps
    every core. One slot, or threads set by hand, change nothing. The answers are the
    model's either way. (The core count is given: the machine's decides nothing here.)"""
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 4)
    cases = [
        (RuntimeOptions(providers="cpu", executor_threads=2), 2),
        (RuntimeOptions(providers="cpu", executor_threads=8), 1),  # at least one each
        (RuntimeOptions(providers="cpu", executor_threads=1), None),
        (RuntimeOptions(providers="cpu", executor_threads=2, intra_op_threads=3), None),
    ]
    for options, threads in cases:
        model = OnnxModel.load("tiny", 1, path, options)
        try:
            assert model.prepare_slots() == options.executor_threads == model.slots
            if threads is None:
                assert model._slot_session is None  # the model's own session
            else:
                assert model._slot_session is not None
                assert intra_op_threads(model._slot_session) == threads
                assert intra_op_threads(model._session) == 0  # ONNX Runtime's: one a core
            assert_workers_answer(model, seed=12)
        finally:
            model.close()


def assert_workers_answer(model: OnnxModel, seed: int) -> None:
    images = random_images(3, seed=seed)

    async def on_a_worker() -> np.ndarray:
        return await model.run(images)

    np.testing.assert_allclose(
        asyncio.run(on_a_worker()), reference_logits(TinySpec(), images), atol=1e-5
    )


def test_auto_keeps_two_slots_where_they_share_the_cores_out(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`max_concurrent_batches` 0 starts AUTO_SLOTS workers; on the CPU with two cores and
    intra-op threads 0 both stay, with a core each; on one core, or with the threads set by
    hand, one slot with the model's session remains. (The core count is given.)"""
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    caplog.set_level(logging.INFO, logger="service.engine.runtime")
    cases = [(2, 0, 2), (1, 0, 1), (2, 2, 1)]  # cores, intra-op threads, slots kept
    for cores, threads, slots in cases:
        monkeypatch.setattr(runtime_module.os, "cpu_count", lambda cores=cores: cores)
        options = RuntimeOptions(
            providers="cpu", executor_threads=runtime_module.AUTO_SLOTS, intra_op_threads=threads
        )
        model = OnnxModel.load("tiny", 1, path, options)
        try:
            assert model.prepare_slots(auto=True) == slots == model.slots
            assert model.shares_cores is (slots == 2)
            assert f"{slots} batch slot" in caplog.text
            assert_workers_answer(model, seed=14)
        finally:
            model.close()


def test_a_batch_alone_runs_on_every_core_and_batches_side_by_side_on_a_share(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the slots sharing the cores out, `run` computes on the slots' session and
    `run_alone` on the model's own (every core); both answer as the model does."""
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 2)
    model = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu", executor_threads=2))
    try:
        assert model.prepare_slots() == 2 and model.shares_cores
        every_core = model._session
        assert intra_op_threads(every_core) == 0
        model._session = alone = RecordedSession(every_core)  # type: ignore[assignment]
        model._slot_session = share = RecordedSession(model._slot_session)  # type: ignore[assignment]
        images = random_images(3, seed=15)

        async def both() -> tuple[np.ndarray, np.ndarray]:
            return await model.run_alone(images), await model.run(images[:2])

        on_every_core, on_a_share = asyncio.run(both())
        assert (alone.sizes, share.sizes) == ([3], [2])
        expected = reference_logits(TinySpec(), images)
        np.testing.assert_allclose(on_every_core, expected, atol=1e-5)
        np.testing.assert_allclose(on_a_share, expected[:2], atol=1e-5)
    finally:
        model.close()


def test_a_served_model_computes_a_lone_batch_on_every_core(
    start_server: StartServer,
    tiny_repository: Path,
    tiny_spec: TinySpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A served model on two cores with intra-op threads 0 gets two slots (auto); a request
    computed alone runs on the model's session, every core, not on a slot's share (never on
    the loop here: `inline_run_max_us` 0). (The core count is given.)"""
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 2)
    running = start_server(tiny_repository, intra_op_threads=0, inline_run_max_us=0)
    assert running.server.models is not None
    model = running.server.models.resolve("tiny", "")
    assert model.batching.max_concurrent_batches == 2 and model.runtime.shares_cores
    runtime = model.runtime
    runtime._session = alone = RecordedSession(runtime._session)  # type: ignore[assignment]
    runtime._slot_session = share = RecordedSession(runtime._slot_session)  # type: ignore[assignment]
    images = random_images(3, seed=16)
    response = running.inference_stub().ModelInfer(infer_request(images), timeout=60)
    np.testing.assert_allclose(
        logits_of(response), reference_logits(tiny_spec, images), rtol=1e-5, atol=1e-6
    )
    assert (alone.sizes, share.sizes) == ([3], [])


def test_runs_on_the_loop_reuse_a_one_threaded_slot_session(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the slots' session already has one intra-op thread, runs on the loop that are
    better on one thread use it: no third copy of the model."""
    path = tiny_repository / "tiny" / "1" / "model.onnx"
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 2)
    model = OnnxModel.load("tiny", 1, path, RuntimeOptions(providers="cpu", executor_threads=2))
    try:
        assert model.prepare_slots() == 2 and model._slot_session is not None
        made: list[object] = []
        real = runtime_module.ort.InferenceSession

        def counted(*args: object, **kwargs: object) -> object:
            made.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(runtime_module.ort, "InferenceSession", counted)
        scripted_timings(monkeypatch, [0.001] * 3 + [0.0012] * 3)
        assert model.prepare_loop_session(0.002, [1, 2])
        assert made == [] and model._loop_session is model._slot_session
        images = random_images(2, seed=13)
        np.testing.assert_allclose(model.run_now(images), model.run_blocking(images), atol=1e-5)
    finally:
        model.close()
