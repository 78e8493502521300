"""The job queue and records, through a real huey consumer, with a scripted pipeline.

:class:`QueueContract` runs here on SQLite and in tests/integration/test_queue_redis.py on a real
Redis: the same code must behave the same on both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from node.config import Settings
from node.dicom.series import VolumeError
from node.dicom.writer import SeriesInfo, write_series
from node.ingest import Sender, SeriesReady
from node.jobs import Router, job_key, open_store, reconcile
from node.jobs.queue import JobQueue, make_huey
from node.jobs.store import Job, JobStore
from node.jobs.worker import JobRunner, StageClock, build_request, overall_progress, seg_uids
from node.phantom import TINY, write_phantom
from node.pipeline import PipelineError, ProgressEvent
from node.rules import Match, PipelineSpec, Rule
from node.segment import SegmentationError
from tests.servers import wait_for
from tests.unit.test_series import ramp_volume

RULES = (Rule(name="ct", match=Match(modality=["CT"]), pipeline=PipelineSpec(engine="fake")),)


@dataclass
class FakeResult:
    state: str
    error: PipelineError | None = None


@dataclass
class FakePipeline:
    """Behaves like ``run_pipeline``: progress events for load, segment and write, ``seg.dcm`` written,
    a failed result (not an exception) for a :class:`PipelineError`. ``script`` gives per call: None
    (success), a PipelineError (failed result) or an exception (raised, as a bug would)."""

    script: list[BaseException | PipelineError | None] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    gate: threading.Event | None = None  # when given: wait for it in the "segment" stage
    entered: threading.Event = field(default_factory=threading.Event)

    def __call__(self, folder: Path, outdir: Path, request: object, progress: Callable[..., None]) -> FakeResult:
        self.calls.append(str(folder))
        failure = self.script.pop(0) if self.script else None
        for stage in ("load", "segment", "write"):
            progress(ProgressEvent(stage, "started"))
            progress(ProgressEvent(stage, "progress", done=1, total=2))
            if stage == "segment":
                self.entered.set()
                if self.gate is not None:
                    assert self.gate.wait(30)
                if isinstance(failure, BaseException):
                    raise failure
                if isinstance(failure, PipelineError):
                    progress(ProgressEvent(stage, "failed", message=failure.message))
                    return FakeResult("failed", failure)
            progress(ProgressEvent(stage, "done", seconds=0.0))
        (outdir / "seg.dcm").write_bytes(b"SEG")
        return FakeResult("done")


@dataclass
class Env:
    settings: Settings
    store: JobStore
    queue: JobQueue
    router: Router
    pipeline: FakePipeline
    hooked: list[str]
    runner: JobRunner | None = None

    def start(self, workers: int = 2) -> None:
        self.queue.start(workers)

    def state(self, job_id: str) -> str:
        job = self.store.get(job_id)
        return job.state if job else "?"

    def wait_state(self, job_id: str, *states: str) -> Job:
        wait_for(lambda: self.state(job_id) in states)
        return self.store.get(job_id)  # type: ignore[return-value]


def make_env(tmp_path: Path, backend: str = "sqlite", redis_url: str = "") -> Iterator[Env]:
    queue_cfg = {"backend": backend, "max_attempts": 3, "retry_delay_s": 0.1, "stale_after_s": 60}
    if redis_url:
        queue_cfg["redis_url"] = redis_url
    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"}, queue=queue_cfg)
    store = open_store(settings)
    pipeline, hooked = FakePipeline(), []
    huey = make_huey(settings)
    runner_box: list[JobRunner] = []
    queue = JobQueue(huey, lambda job_id: runner_box[0].run(job_id))
    runner_box.append(JobRunner(store, settings, pipeline=pipeline, request=lambda job, s: job.pipeline,
                                enqueue=queue.enqueue, hooks=(lambda job, out: hooked.append(job.id),)))
    env = Env(settings, store, queue, Router(settings, store, queue.enqueue, rules=RULES), pipeline, hooked,
              runner_box[0])
    try:
        yield env
    finally:
        if env.pipeline.gate is not None:
            env.pipeline.gate.set()
        queue.stop(timeout=0.1)  # a worker blocked in Redis BRPOP (1 s) finishes on its own
        store.close()


def series(tmp_path: Path, slices: int = 4, seed: str = "jobs", generation: int = 1,
           folder: str = "series") -> SeriesReady:
    info = SeriesInfo(uid_seed=seed)
    paths = write_series(ramp_volume(shape=(slices, 8, 8)), tmp_path / folder, info)
    import pydicom

    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return SeriesReady(ds.StudyInstanceUID, ds.SeriesInstanceUID, tmp_path / folder, slices, "complete",
                       Sender("dimse", "CT1", "127.0.0.1"), generation)


def events(job: Job) -> list[str]:
    return [e["event"] for e in job.history]


class QueueContract:
    """Needs an ``env`` fixture."""

    def test_series_becomes_a_done_job_with_its_record(self, env: Env, tmp_path: Path) -> None:
        ready = series(tmp_path)
        job = env.router.on_series_ready(ready)
        assert job is not None and job.state == "queued"
        env.start()
        done = env.wait_state(job.id, "done", "failed")
        assert (done.state, done.stage, done.progress, done.attempts, done.error) == ("done", "done", 1.0, 1, None)
        assert (done.rule, done.engine, done.instance_count, done.generation) == ("ct", "fake", 4, 1)
        assert sorted(done.timings) == ["load", "prepare", "segment", "write"]
        assert all(v >= 0 for v in done.timings.values())
        assert events(done) == ["queued", "running", "done"]
        assert (Path(done.results) / "seg.dcm").read_bytes() == b"SEG"
        assert Path(done.results).parent == Path(env.settings.node.data_dir) / "results" / done.id
        assert env.pipeline.calls == [str(ready.folder)]
        wait_for(lambda: env.hooked)  # hooks run just after the job is marked done
        assert env.hooked == [done.id]
        assert env.store.counts() == {"queued": 0, "running": 0, "done": 1, "failed": 0, "superseded": 0}
        (seen,) = env.store.series()
        assert (seen["series_uid"], seen["job_id"], seen["rule"]) == (ready.series_uid, done.id, "ct")

    def test_same_instances_and_pipeline_never_run_twice(self, env: Env, tmp_path: Path) -> None:
        ready = series(tmp_path)
        first = env.router.on_series_ready(ready)
        again = env.router.on_series_ready(ready)
        assert again.id == first.id
        env.start()
        env.wait_state(first.id, "done")
        assert env.router.on_series_ready(ready).id == first.id
        # A changed pipeline is another job.
        env.router.rules = (Rule(name="ct2", pipeline=PipelineSpec(engine="fake", task="other")),)
        other = env.router.on_series_ready(ready)
        assert other.id != first.id
        env.wait_state(other.id, "done")
        assert len(env.pipeline.calls) == 2
        assert [j.state for j in env.store.list()] == ["done", "done"]

    def test_higher_generation_supersedes(self, env: Env, tmp_path: Path) -> None:
        first = env.router.on_series_ready(series(tmp_path, slices=4))
        second = env.router.on_series_ready(series(tmp_path, slices=5, generation=2))
        assert second.id != first.id
        old = env.store.get(first.id)
        assert (old.state, old.superseded_by) == ("superseded", second.id)
        # A late message for generation 1 is stored superseded at once.
        late = env.router.submit(series(tmp_path, slices=3, generation=1, folder="late"))[1]
        assert (late.state, late.superseded_by) == ("superseded", second.id)
        env.start()
        done = env.wait_state(second.id, "done")
        assert done.instance_count == 5
        assert env.pipeline.calls == [str(tmp_path / "series")]
        assert env.state(first.id) == "superseded"

    def test_superseded_while_running_stops_without_result(self, env: Env, tmp_path: Path) -> None:
        env.pipeline.gate = threading.Event()
        first = env.router.on_series_ready(series(tmp_path, slices=4))
        env.start(workers=1)
        assert env.pipeline.entered.wait(30)
        second = env.router.on_series_ready(series(tmp_path, slices=5, generation=2))
        env.pipeline.gate.set()
        env.wait_state(second.id, "done")
        old = env.store.get(first.id)
        assert (old.state, old.results) == ("superseded", None)
        assert events(old) == ["queued", "running", "superseded"]
        assert not (Path(env.settings.node.data_dir) / "results" / first.id).exists()
        wait_for(lambda: env.hooked)
        assert env.hooked == [second.id]

    def test_a_run_released_at_stop_is_requeued_without_counting_and_runs_once_more(
            self, env: Env, tmp_path: Path) -> None:
        env.pipeline.gate = threading.Event()
        job = env.router.on_series_ready(series(tmp_path))
        env.start(workers=1)
        assert env.pipeline.entered.wait(30)
        assert env.runner is not None
        assert env.runner.release_running("node stopping (SIGTERM)") == [job.id]
        queued = env.store.get(job.id)
        assert (queued.state, queued.attempts, queued.run_id) == ("queued", 0, None)
        assert queued.history[-1]["detail"] == "node stopping (SIGTERM)"
        assert env.runner.release_running("again") == []  # nothing runs any more
        env.pipeline.gate.set()  # the cut-off run ends and drops its output; the job runs again
        done = env.wait_state(job.id, "done")
        assert (done.attempts, events(done)) == (1, ["queued", "running", "requeued", "running", "done"])
        wait_for(lambda: env.hooked)
        assert env.hooked == [job.id]
        assert list((Path(env.settings.node.data_dir) / "results" / job.id).iterdir()) == [Path(done.results)]

    def test_a_stop_waits_for_a_job_that_ends_within_the_grace(self, env: Env, tmp_path: Path) -> None:
        from node.serve import _drain

        env.pipeline.gate = threading.Event()
        job = env.router.on_series_ready(series(tmp_path))
        env.start(workers=1)
        assert env.pipeline.entered.wait(30)
        assert env.runner is not None
        left: list[int] = []
        stopping = threading.Thread(target=lambda: left.append(_drain(env.queue, env.runner, grace=60)))
        stopping.start()
        stopping.join(0.3)
        assert stopping.is_alive()  # waiting for the job, not cutting it off
        env.pipeline.gate.set()
        stopping.join(30)
        assert left == [0]
        done = env.store.get(job.id)
        assert (done.state, done.attempts, events(done)) == ("done", 1, ["queued", "running", "done"])

    def test_transient_errors_are_retried_with_backoff(self, env: Env, tmp_path: Path) -> None:
        env.pipeline.script = [RuntimeError("GPU busy"), OSError("disk hiccup"), None]
        job = env.router.on_series_ready(series(tmp_path))
        env.start()
        done = env.wait_state(job.id, "done", "failed")
        assert (done.state, done.attempts, done.error) == ("done", 3, None)
        retries = [e["detail"] for e in done.history if e["event"] == "retry"]
        assert retries == [
            "internal_error: RuntimeError: GPU busy (attempt 1/3, again in 0.1 s)",
            "io_error: OSError: disk hiccup (attempt 2/3, again in 0.2 s)",
        ]
        assert len(env.pipeline.calls) == 3

    def test_bad_input_fails_at_once(self, env: Env, tmp_path: Path) -> None:
        env.pipeline.script = [PipelineError("missing_slices", "slices 3 to 4 are missing", "load")]
        job = env.router.on_series_ready(series(tmp_path))
        env.start()
        failed = env.wait_state(job.id, "failed", "done")
        assert (failed.state, failed.attempts) == ("failed", 1)
        assert failed.error == {"code": "missing_slices", "message": "slices 3 to 4 are missing"}
        assert events(failed) == ["queued", "running", "failed"]
        assert env.hooked == []

    def test_a_job_that_keeps_failing_ends_failed_with_its_reason(self, env: Env, tmp_path: Path) -> None:
        env.pipeline.script = [PipelineError("internal_error", f"internal error in stage segment: boom {n}",
                                             "segment") for n in range(1, 4)]
        job = env.router.on_series_ready(series(tmp_path))
        env.start()
        failed = env.wait_state(job.id, "failed", "done")
        assert (failed.state, failed.attempts) == ("failed", 3)
        assert failed.error == {"code": "internal_error", "message": "internal error in stage segment: boom 3"}
        assert events(failed) == ["queued", "running", "retry", "running", "retry", "running", "failed"]
        # A user's retry runs it again from scratch.
        again = env.store.requeue(job.id, "retried by test")
        assert (again.state, again.attempts, again.error) == ("queued", 0, None)
        env.queue.enqueue(job.id)
        assert env.wait_state(job.id, "done").attempts == 1

    def test_orphaned_run_runs_again_and_completes_exactly_once(self, env: Env, tmp_path: Path) -> None:
        job = env.router.on_series_ready(series(tmp_path))
        env.queue.huey.flush()  # the message went with the worker that "died"
        dead = env.store.claim(job.id, "some-host:1:dead")
        assert dead is not None and dead.state == "running"
        env.start()
        counts = reconcile(env.store, env.queue.enqueue, stale_after=60, all_running_are_orphans=True)
        assert counts == {"requeued": 1, "failed": 0, "queued": 1}
        done = env.wait_state(job.id, "done")
        assert done.attempts == 2
        assert events(done) == ["queued", "running", "requeued", "running", "done"]
        # The dead run can neither report nor finish any more.
        assert not env.store.progress(job.id, dead.run_id, "segment", 0.5)
        assert not env.store.finish(job.id, dead.run_id, "elsewhere", {})
        wait_for(lambda: env.hooked)
        assert env.hooked == [job.id]
        # A second message for a done job does nothing.
        env.queue.enqueue(job.id)
        time.sleep(0.3)
        assert len(env.pipeline.calls) == 1 and env.store.get(job.id).attempts == 2


class TestSqliteQueue(QueueContract):
    @pytest.fixture
    def env(self, tmp_path: Path) -> Iterator[Env]:
        yield from make_env(tmp_path)


# --- store and helpers without a consumer ---------------------------------------------------------

@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path)


def test_claim_is_exclusive_across_threads(env: Env, tmp_path: Path) -> None:
    job = env.router.on_series_ready(series(tmp_path))
    results: list[object] = []
    barrier = threading.Barrier(8)

    def claim(n: int) -> None:
        barrier.wait()
        results.append(env.store.claim(job.id, f"w{n}"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1


def test_a_worker_that_dies_every_time_ends_failed(env: Env, tmp_path: Path) -> None:
    job = env.router.on_series_ready(series(tmp_path))
    for attempt in range(3):
        assert env.store.claim(job.id, f"host:{attempt}:x") is not None
        reconcile(env.store, lambda *a: None, stale_after=60, all_running_are_orphans=True)
    failed = env.store.get(job.id)
    assert failed.state == "failed"
    assert failed.error == {"code": "worker_lost",
                            "message": "the worker died during the run in each of 3 attempts"}


def test_stale_heartbeat_and_dead_pid_mark_orphans(env: Env, tmp_path: Path) -> None:
    import socket

    job = env.router.on_series_ready(series(tmp_path))
    alive = env.store.claim(job.id, f"{socket.gethostname()}:1:other")  # pid 1 is alive
    assert env.store.orphans(60, lambda w: False) == []
    assert [j.id for j in env.store.orphans(-1, lambda w: False)] == [alive.id]  # silent too long
    from node.jobs.store import dead_on_this_host, worker_id

    assert not dead_on_this_host(worker_id())
    assert dead_on_this_host(f"{socket.gethostname()}:4194303:x")  # above pid_max: never alive
    assert not dead_on_this_host("elsewhere:4194303:x")


def test_series_without_a_rule_is_recorded_not_queued(env: Env, tmp_path: Path) -> None:
    env.router.rules = (Rule(name="mr", match=Match(modality=["MR"])),)
    ready = series(tmp_path)
    assert env.router.on_series_ready(ready) is None
    (seen,) = env.store.series()
    assert (seen["job_id"], seen["rule"], seen["decision"]) == (None, None, "no rule matched")
    assert env.queue.pending() == 0


def test_routing_errors_never_reach_ingest(env: Env, tmp_path: Path) -> None:
    ready = SeriesReady("1.2", "1.2.3", tmp_path / "absent", 1, "quiet", Sender("stow"))
    assert env.router.on_series_ready(ready) is None
    assert env.store.series()[0]["decision"] == "never routed: no readable DICOM instance"


def test_job_key_and_stage_clock() -> None:
    assert job_key("1.2", ["b", "a"], "v1") == job_key("1.2", ("a", "b"), "v1")
    assert job_key("1.2", ["a"], "v1") != job_key("1.2", ["a", "b"], "v1")
    assert job_key("1.2", ["a"], "v1") != job_key("1.2", ["a"], "v2")
    now = [0.0]
    clock = StageClock(lambda: now[0])
    assert clock.enter("load") is None
    now[0] = 2.0
    assert clock.enter("segment") == ("load", 2.0)
    now[0] = 5.0
    assert clock.snapshot() == {"load": 2.0, "segment": 3.0}
    assert clock.close() == ("segment", 3.0)


def test_bad_input_classes_include_segmentation_errors(env: Env, tmp_path: Path) -> None:
    env.pipeline.script = [SegmentationError("weights_missing", "no weights for task total")]
    job = env.router.on_series_ready(series(tmp_path))
    env.start()
    failed = env.wait_state(job.id, "failed", "done")
    assert failed.error == {"code": "weights_missing", "message": "no weights for task total"}


def test_a_raised_volume_error_is_bad_input_too(env: Env, tmp_path: Path) -> None:
    env.pipeline.script = [VolumeError("not_found", "the series folder is gone")]
    job = env.router.on_series_ready(series(tmp_path))
    env.start()
    assert env.wait_state(job.id, "failed", "done").error == {"code": "not_found",
                                                               "message": "the series folder is gone"}


def test_request_from_rule_and_settings(env: Env, tmp_path: Path) -> None:
    env.router.rules = (Rule(name="r", pipeline=PipelineSpec(
        task="total_mr", roi_subset=["liver"], post=["liver_vessels"], options={"vessel_hu": 120},
        stage_options={"liver_vessels": {"min_component_size": 50}})),)
    job = env.router.on_series_ready(series(tmp_path))
    request = build_request(job, env.settings)
    assert (request.segment.engine, request.segment.task, request.segment.fast) == ("threshold", "total_mr", False)
    assert request.segment.roi_subset == ("liver",) and request.segment.options == {"vessel_hu": 120}
    assert request.segment.weights_dir == env.settings.node.data_dir / "totalsegmentator"
    assert (request.series_uid, request.post) == (job.series_uid, ("liver_vessels",))
    assert request.stage_options == {"liver_vessels": {"min_component_size": 50}, "seg": seg_uids(job)}
    assert [overall_progress(s, 1, 2) for s in ("load", "segment", "liver_vessels", "write")] == [
        0.085, 0.475, 0.85, 0.95]


def test_a_failing_hook_is_noted_and_the_job_stays_done(tmp_path: Path) -> None:
    for env in make_env(tmp_path):
        def broken(job: Job, results: Path) -> None:
            raise RuntimeError("outbox unreachable")

        runner = JobRunner(env.store, env.settings, pipeline=env.pipeline, request=lambda job, s: job.pipeline,
                           hooks=(broken,))
        job = env.router.on_series_ready(series(tmp_path))
        assert runner.run(job.id) == "done"
        assert runner.run(job.id) is None  # a done job is never claimed again
        done = env.store.get(job.id)
        assert done.state == "done"
        assert done.history[-1]["event"] == "hook_failed"
        assert done.history[-1]["detail"] == "broken: RuntimeError: outbox unreachable"


def meshes_probe(ctx) -> None:
    """Stands in for the ``meshes`` output in the test below (replaced there by a closure)."""
    raise AssertionError("replaced by the test")


def test_the_seg_is_in_the_outbox_before_the_meshes_are_written(tmp_path: Path, monkeypatch) -> None:
    """The worker hands the SEG to the outbox as soon as the pipeline has written it, while the run goes
    on (meshes asked for first, NIfTI files, report); the job is done when every output is written. A
    retry after a later stage failed writes the same SOP instance, which the outbox queues once."""
    import sys

    from node import pipeline
    from node.artifacts.mesh import meshes_stage
    from node.export.outbox import Outbox

    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"},
                        queue={"retry_delay_s": 0, "max_attempts": 2},
                        destinations=[{"name": "archive", "kind": "folder", "path": tmp_path / "archive"}])
    store = open_store(settings)
    outbox = Outbox.from_settings(settings, on_change=store.set_destinations)  # not started: nothing sent
    rule = Rule(name="ct", pipeline=PipelineSpec(engine="threshold", outputs=["meshes", "seg"]),
                destinations=["archive"])
    folder = write_phantom(TINY, tmp_path / "phantom")["dicom"]
    first = pydicom.dcmread(min(folder.iterdir()), stop_before_pixels=True)
    ready = SeriesReady(first.StudyInstanceUID, first.SeriesInstanceUID, folder, 40, "complete",
                        Sender("dimse", "CT1", "127.0.0.1"), 1)
    job = Router(settings, store, lambda job_id, delay=0.0: None, rules=(rule,)).on_series_ready(ready)
    runner = JobRunner(store, settings, hooks=(outbox.enqueue_results,), on_output=(outbox.enqueue_output,))
    seen: list[dict] = []

    def probe(ctx) -> None:
        seen.append({
            "outbox": outbox.job_destinations(job.id)["archive"],
            "record": store.get(job.id).destinations["archive"]["state"],
            "files": sorted(p.name for p in ctx.outdir.iterdir() if not p.name.startswith(".")),
        })
        if len(seen) == 1:
            raise OSError("disk hiccup")  # the first run fails after its SEG was handed over
        meshes_stage(ctx)

    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "meshes", "tests.unit.test_jobs:meshes_probe")
    monkeypatch.setattr(sys.modules[__name__], "meshes_probe", probe)
    try:
        assert runner.run(job.id) == "queued"  # io_error: retried
        assert runner.run(job.id) == "done"
        done = store.get(job.id)
        assert [(s["outbox"]["state"], s["outbox"]["instances"], s["record"], s["files"]) for s in seen] == [
            ("pending", 1, "pending", ["classes.json", "labels.nii.gz", "seg.dcm", "stats.csv"]),
        ] * 2
        assert sorted(done.timings) == ["load", "meshes", "prepare", "seg", "segment", "write"]
        assert (Path(done.results) / "meshes" / "meshes.json").is_file()
        sop_uid = pydicom.dcmread(Path(done.results) / "seg.dcm", stop_before_pixels=True).SOPInstanceUID
        assert sop_uid == seg_uids(done)["sop_uid"]
        assert outbox.run_once() == 1  # one instance for the two runs
        assert store.get(job.id).destinations["archive"]["state"] == "delivered"
        assert [p.name for p in (tmp_path / "archive").rglob("*.dcm")] == [f"{sop_uid}.dcm"]
    finally:
        outbox.close()
        store.close()


def test_seg_uids_are_the_job_s_and_a_rule_s_own_win(tmp_path: Path) -> None:
    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"})
    store = open_store(settings)
    try:
        router = Router(settings, store, lambda job_id, delay=0.0: None, rules=(
            Rule(name="ct", pipeline=PipelineSpec(engine="threshold", outputs=["seg"],
                                                  stage_options={"seg": {"sop_uid": "1.2.3.4"}})),))
        job = router.on_series_ready(series(tmp_path))
        uids = seg_uids(job)
        assert uids == seg_uids(Job.from_json(job.to_json()))  # the same for every run of the job
        other = Job.from_json(job.to_json())
        other.id = "another-job"
        assert set(seg_uids(other).values()).isdisjoint(uids.values())
        # The same as the release before (0.1.0) derived for that job id: a job in flight across an
        # upgrade must not deliver its SEG a second time as another instance.
        other.id = "job-1"
        assert seg_uids(other) == {
            "series_uid": "1.2.826.0.1.3680043.8.498.13164247972642269700510698844585142479",
            "sop_uid": "1.2.826.0.1.3680043.8.498.26112511110866318176419225452025595836",
        }
        assert build_request(job, settings).stage_options["seg"] == {"sop_uid": "1.2.3.4",
                                                                     "series_uid": uids["series_uid"]}
    finally:
        store.close()


def test_an_idle_worker_looks_at_the_queue_as_soon_as_a_job_is_queued(tmp_path: Path) -> None:
    """SQLite: huey's workers poll, waiting longer each empty poll (up to 0.5 s); a job queued by this
    process ends the wait at once and the wait starts short again."""
    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"})
    queue = JobQueue(make_huey(settings), lambda job_id: None)
    worker = queue.consumer(1).worker_threads[0][0]
    worker.delay = worker.max_delay  # long idle
    queue.enqueue("job-1")
    worker.sleep()  # returns at once: the wait was ended by the enqueue
    assert worker.delay == worker.default_delay == 0.05
    worker.sleep()  # nothing queued meanwhile: a full (short) wait, then a longer one next time
    assert worker.delay == 0.05 * 1.5
    assert queue.pending() == 1


def test_every_delivered_output_gets_the_job_id_as_its_uid_seed(tmp_path: Path) -> None:
    """RTSTRUCT, SR, review sheet and meshes derive their UIDs from the job, as the SEG does: every run
    of a job writes the same instances (a rule's own seed wins); outputs not asked for get nothing."""
    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"})
    store = open_store(settings)
    try:
        router = Router(settings, store, lambda job_id, delay=0.0: None, rules=(
            Rule(name="ct", pipeline=PipelineSpec(engine="threshold", outputs=["seg", "rtstruct", "sr", "review"],
                                                  stage_options={"sr": {"uid_seed": "mine"}})),))
        job = router.on_series_ready(series(tmp_path))
        options = build_request(job, settings).stage_options
        assert options["rtstruct"] == options["review"] == {"uid_seed": job.id}
        assert options["sr"] == {"uid_seed": "mine"} and "dicom_mesh" not in options
    finally:
        store.close()


def failing_seg_output(ctx) -> None:
    """Stands in for an output the source cannot carry (a coded refusal) in the test below."""
    from node.segment import SegmentationError

    raise SegmentationError("seg_source_mismatch", "DICOM-SEG: the source cannot carry these labels")


def test_a_failed_output_leaves_the_job_done_with_the_output_named(tmp_path: Path, monkeypatch) -> None:
    """Issue 16 item 5: the segmentation stands (labels, classes, stats in the results), the job is done
    once (not retried), its record names the failed output, its history says "1 output failed"."""
    from node import pipeline

    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "broken", "tests.unit.test_jobs:failing_seg_output")
    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"},
                        queue={"retry_delay_s": 0, "max_attempts": 3})
    store = open_store(settings)
    try:
        rule = Rule(name="ct", pipeline=PipelineSpec(engine="threshold", outputs=["broken", "seg"]))
        folder = write_phantom(TINY, tmp_path / "phantom")["dicom"]
        first = pydicom.dcmread(min(folder.iterdir()), stop_before_pixels=True)
        ready = SeriesReady(first.StudyInstanceUID, first.SeriesInstanceUID, folder, 40, "complete",
                            Sender("dimse", "CT1", "127.0.0.1"), 1)
        job = Router(settings, store, lambda job_id, delay=0.0: None, rules=(rule,)).on_series_ready(ready)
        assert JobRunner(store, settings).run(job.id) == "done"
        done = store.get(job.id)
        assert (done.state, done.attempts, done.error) == ("done", 1, None)
        assert done.failed_outputs == {"broken": {
            "code": "seg_source_mismatch", "message": "DICOM-SEG: the source cannot carry these labels"}}
        assert done.history[-1]["detail"] == "attempt 1, 1 output failed: broken [seg_source_mismatch]"
        assert done.public()["failed_outputs"] == done.failed_outputs
        assert {"labels.nii.gz", "classes.json", "stats.csv", "seg.dcm", "report.json"} <= {
            p.name for p in Path(done.results).iterdir()}
    finally:
        store.close()
