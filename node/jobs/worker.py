"""The job: a routed series -> ``run_pipeline`` -> results folder -> hooks (outbox, spool retention).

A run claims the job (queued -> running, compare-and-set), so a repeated queue message or a second
worker never runs it twice. It writes into ``<data_dir>/results/<job>/<run>/`` and only the run that
marks the job done (again compare-and-set) keeps its folder. ``run_pipeline`` returns a failed result
rather than raising; its error code decides:

* bad input (a coded :class:`~node.errors.NodeError`: VolumeError, SegmentationError, ...): failed at once;
* ``io_error``/``internal_error`` (or an exception out of the pipeline): transient, retried after
  ``retry_delay_s * 2**(attempt-1)`` seconds until ``max_attempts`` runs, then failed with the reason;
* the job superseded while running: the result is dropped when the run ends (the pipeline swallows
  exceptions from progress callbacks, so a run cannot be stopped half-way).

An output that fails (e.g. the SEG) while the segmentation succeeded leaves the job ``done`` with
``failed_outputs`` naming it (code, message) and "done, 1 output failed" in its history; the labels,
classes and stats are in its results. It is not retried (the same input gives the same refusal), except an
``io_error`` (a disk hiccup) while attempts are left.

Outputs to deliver (the DICOM-SEG) do not wait for the job's end: the pipeline writes them first and
announces each (a progress event of status ``output``); the run, if it still owns the job, hands it to
the ``on_output`` hooks (the outbox) at once, and the meshes, NIfTI files and report are written while
it is sent. The job is done when every output is written; the ``hooks`` run then, as before (the
outbox's is idempotent: an instance already queued is not queued twice). A SEG so sent stays sent if
a later stage fails; a retry of the job writes the same SOP Instance UID (:func:`seg_uids`), which the
outbox never sends twice.

Logs name job and series ids only, never patient data.
"""

from __future__ import annotations

import contextvars
import logging
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from node import logs
from node.config import Settings
from node.errors import NodeError
from node.jobs.store import Job, JobStore, worker_id
from node import metrics

log = logging.getLogger(__name__)

#: ``run_pipeline(input, outdir, request, progress)`` (see :mod:`node.pipeline`).
PipelineFn = Callable[..., Any]
#: Called once after a job is done: ``hook(job, results_dir)``.
Hook = Callable[[Job, Path], None]
#: Called while a job runs, as soon as the pipeline has written an output: ``hook(job, name, path)``.
OutputHook = Callable[[Job, str, Path], None]
#: ``with inputs(job) as folder:`` the job's series as a local folder, for the run's length.
Inputs = Callable[[Job], AbstractContextManager[Path]]
#: Bad input and refusals: failed at once with their own code, never retried.
BAD_INPUT: tuple[type[Exception], ...] = (NodeError,)


class StageClock:
    """Seconds spent per stage, from the stage names a pipeline reports as it goes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.current: str | None = None
        self.since = clock()
        self.seconds: dict[str, float] = {}

    def enter(self, stage: str) -> tuple[str, float] | None:
        """Switch to ``stage``; returns the stage just closed and its duration, if any."""
        if stage == self.current:
            return None
        closed = self.close()
        self.current, self.since = stage, self.clock()
        return closed

    def close(self) -> tuple[str, float] | None:
        if self.current is None:
            return None
        elapsed = self.clock() - self.since
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + elapsed
        closed, self.current = (self.current, elapsed), None
        return closed

    @classmethod
    def of(cls, seconds: dict[str, float]) -> StageClock:
        """A closed clock holding ``seconds`` (a remote run's timings)."""
        clock = cls()
        clock.seconds = dict(seconds)
        return clock

    def snapshot(self) -> dict[str, float]:
        out = dict(self.seconds)
        if self.current is not None:
            out[self.current] = out.get(self.current, 0.0) + self.clock() - self.since
        return out


#: Pipeline error codes worth another attempt; every other code means the input is bad.
TRANSIENT_CODES = frozenset({"io_error", "internal_error"})
#: A failed output's codes worth another run of the job (while attempts are left); any other failed
#: output (a coded refusal, a bug) leaves the job done with the output listed as failed.
OUTPUT_RETRY_CODES = frozenset({"io_error"})
#: Where each pipeline stage sits in the overall progress: (start, span). Post stages share one slot.
_PROGRESS = {"prepare": (0.0, 0.02), "load": (0.02, 0.13), "segment": (0.15, 0.65), "write": (0.9, 0.1)}
_POST = (0.8, 0.1)


def default_pipeline(input_path: Path, outdir: Path, request: Any, progress: Callable[..., None]) -> Any:
    from node.pipeline import run_pipeline  # imported only where jobs run

    return run_pipeline(input_path, outdir, request, progress)


def seg_uids(job: Job) -> dict[str, str]:
    """The SEG's Series and SOP Instance UIDs, derived from the job id: every run of a job writes the
    same instance, so a SEG handed to the outbox by a run that later failed (or was cut off) is not
    delivered a second time, as another instance, by the retry. Their entropy strings are kept from
    the first release that wrote them, so a job in flight across an upgrade keeps its SEG's UIDs (the
    other outputs use :func:`node.dicom.derived.derived_uid`)."""
    from pydicom.uid import generate_uid

    return {
        "series_uid": generate_uid(entropy_srcs=["segnode job SEG series", job.id]),
        "sop_uid": generate_uid(entropy_srcs=["segnode job SEG instance", job.id]),
    }


#: Outputs whose UIDs derive from the job id (their ``uid_seed`` option), as the SEG's do (:func:`seg_uids`).
SEEDED_OUTPUTS = ("rtstruct", "sr", "review", "dicom_mesh")


def build_request(job: Job, settings: Settings) -> Any:
    """The pipeline request of a job: the rule's pipeline over the ``[segmentation]`` settings."""
    from node.pipeline import request_from_settings

    spec = job.pipeline
    stage_options = {k: dict(v) for k, v in (spec.get("stage_options") or {}).items()}
    if "seg" in (spec.get("outputs") or ()):
        seg = stage_options.setdefault("seg", {})
        for key, uid in seg_uids(job).items():
            seg.setdefault(key, uid)  # a rule's own UIDs win
    for name in SEEDED_OUTPUTS:
        if name in (spec.get("outputs") or ()):
            stage_options.setdefault(name, {}).setdefault("uid_seed", job.id)
    return request_from_settings(
        settings,
        engine=spec.get("engine"),
        task=spec.get("task"),
        fast=spec.get("fast"),
        roi_subset=spec.get("roi_subset"),
        options=spec.get("options"),
        post=spec.get("post") or (),
        stage_options=stage_options,
        series_uid=job.series_uid,
        outputs=spec.get("outputs") or (),
    )


def overall_progress(stage: str, done: int | None = None, total: int | None = None) -> float:
    start, span = _PROGRESS.get(stage, _POST)
    within = min(1.0, done / total) if done is not None and total else 0.0
    return round(start + span * within, 4)


class JobRunner:
    """Runs one job id at a time per calling thread; thread-safe."""

    def __init__(self, store: JobStore, settings: Settings, *, pipeline: PipelineFn = default_pipeline,
                 request: Callable[[Job, Settings], Any] = build_request,
                 enqueue: Callable[[str, float], None] | None = None, hooks: tuple[Hook, ...] = (),
                 on_output: tuple[OutputHook, ...] = (), heartbeat_s: float | None = None,
                 inputs: Inputs | None = None) -> None:
        self.store, self.settings, self.pipeline, self.request = store, settings, pipeline, request
        #: Where a job's series comes from: None = its spool folder (``job.folder``) on this machine;
        #: a remote worker fetches it from the node (:class:`node.jobs.remote.NodeClient`).
        self.inputs = inputs
        self.enqueue = enqueue
        self.hooks = hooks
        self.on_output = on_output
        self.heartbeat_s = heartbeat_s or max(0.5, settings.queue.stale_after_s / 5)
        self.results_root = Path(settings.node.data_dir) / "results"
        self.worker = worker_id()
        #: Runs in progress in this process: job id -> (run id, the run's "lost" event).
        self._active: dict[str, tuple[str, threading.Event]] = {}
        self._active_lock = threading.Lock()
        self._devices: dict[int, str] = {}  # worker thread -> its [segmentation] devices entry
        self._devices_lock = threading.Lock()

    def __call__(self, job_id: str) -> None:
        self.run(job_id)

    def run(self, job_id: str) -> str | None:
        """Run the job if it can be claimed; returns its state afterwards (None if not claimed)."""
        job = self.store.claim(job_id, self.worker)
        if job is None:
            current = self.store.get(job_id)
            log.info("job %s: not run (%s)", job_id, current.state if current else "unknown job")
            return None
        # Every line of this run names job and series (node.logs); its patient's values are scrubbed.
        with logs.job_context(job.id, job.series_uid), logs.patient_data(job.folder or None):
            return self._run(job)

    def _run(self, job: Job) -> str | None:
        assert job.run_id is not None
        log.info("job %s series %s: attempt %d/%d, rule %s, engine %s", job.id, job.series_uid,
                 job.attempts, job.max_attempts, job.rule, job.engine)
        metrics.JOBS_STARTED.inc()
        outdir = self.results_root / job.id / job.run_id
        clock = StageClock()
        lost = threading.Event()
        with self._active_lock:
            self._active[job.id] = (job.run_id, lost)
        stop_beat = threading.Event()
        beat = threading.Thread(target=contextvars.copy_context().run,  # its lines name the job too
                                args=(self._beat, job, lost, stop_beat), daemon=True, name=f"heartbeat-{job.id}")
        beat.start()
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            progress = self._progress(job, clock, lost)
            clock.enter("prepare")
            request = self._on_device(self.request(job, self.settings))
            if self.inputs is None:
                result = self.pipeline(Path(job.folder), outdir, request, progress)
            else:  # a remote worker: the series is fetched first (stage "fetch"), removed after the run
                self._closed(clock.enter("fetch"))
                with self.inputs(job) as source, logs.patient_data(source):
                    result = self.pipeline(source, outdir, request, progress)
            self._closed(clock.close())
        except Exception as exc:  # the pipeline reports failures in its result; this is a bug or I/O
            self._closed(clock.close())
            code = "io_error" if isinstance(exc, OSError) else "internal_error"
            if isinstance(exc, BAD_INPUT):
                code = getattr(exc, "code", "bad_input")
            log.warning("job %s series %s: %s: %s", job.id, job.series_uid, code, exc, exc_info=True)
            return self._failed(job, code, f"{type(exc).__name__}: {exc}" if code in TRANSIENT_CODES
                                else str(exc), clock)
        finally:
            stop_beat.set()
            with self._active_lock:
                self._active.pop(job.id, None)
        if lost.is_set():
            self._discard(outdir)
            log.info("job %s series %s: run ended, but the job was taken from it meanwhile (superseded or "
                     "requeued)", job.id, job.series_uid)
            return None
        error = getattr(result, "error", None)
        if getattr(result, "state", "done") != "done" and error is not None:
            log.warning("job %s series %s: [%s] in stage %s: %s", job.id, job.series_uid, error.code,
                        getattr(error, "stage", "?"), error.message)
            return self._failed(job, error.code, error.message, clock)
        failed = {name: {"code": e.code, "message": e.message}
                  for name, e in (getattr(result, "failed_outputs", None) or {}).items()}
        transient = [(name, e) for name, e in failed.items() if e["code"] in OUTPUT_RETRY_CODES]
        if transient and job.attempts < job.max_attempts:  # a disk hiccup: the whole run again, later
            name, e = transient[0]
            log.warning("job %s series %s: output %s failed: [%s] %s", job.id, job.series_uid, name, e["code"],
                        e["message"])
            return self._failed(job, e["code"], f"output {name}: {e['message']}", clock)
        for name, e in failed.items():
            log.warning("job %s series %s: output %s failed: [%s] %s", job.id, job.series_uid, name, e["code"],
                        e["message"])
        return self._done(job, outdir, clock, failed)

    def release_running(self, reason: str) -> list[str]:
        """Put every job this runner is running back in the queue, the attempt not counted (the node
        stops and will not wait for them). Their runs go on until the process ends, but own nothing:
        whatever they write is dropped. Returns the ids of the jobs requeued."""
        with self._active_lock:
            active = list(self._active.items())
        released = []
        for job_id, (run_id, lost) in active:
            lost.set()  # the run's callbacks stop touching the job store now
            if self.store.release(job_id, run_id, reason) is not None:
                released.append(job_id)
                log.warning("job %s: requeued: %s", job_id, reason)
                if self.enqueue is not None:
                    self.enqueue(job_id, 0.0)
        return released

    def _on_device(self, request: Any) -> Any:
        """``[segmentation] devices``: each worker thread keeps one device (assigned in turn), so one
        resident worker per GPU takes the next job."""
        devices = list(getattr(self.settings.segmentation, "devices", []) or [])
        if not devices or not hasattr(request, "segment"):
            return request
        from dataclasses import replace

        with self._devices_lock:
            device = self._devices.setdefault(threading.get_ident(), devices[len(self._devices) % len(devices)])
        return replace(request, segment=replace(request.segment, device=device))

    @staticmethod
    def _discard(outdir: Path) -> None:
        """Only a done run keeps its folder."""
        shutil.rmtree(outdir, ignore_errors=True)
        try:
            outdir.parent.rmdir()
        except OSError:
            pass

    # --- pieces ------------------------------------------------------------------------------
    def _progress(self, job: Job, clock: StageClock, lost: threading.Event) -> Callable[..., None]:
        """The pipeline's progress callback: stage timings, job stage/progress (at most two record
        writes a second within a stage). It never raises: the pipeline would only log it."""
        assert job.run_id is not None
        last = [0.0]

        def progress(event: Any) -> None:
            if lost.is_set():
                return
            if event.status == "output":
                self._output(job, event, clock, lost)
                return
            if event.status == "started":
                self._closed(clock.enter(event.stage))
            elif event.status in ("done", "skipped", "failed") and clock.current == event.stage:
                self._closed(clock.close())
            now = time.monotonic()
            if event.status == "progress" and now - last[0] < 0.5:
                return
            last[0] = now
            fraction = overall_progress(event.stage, event.done, event.total)
            try:
                if not self.store.progress(job.id, job.run_id, event.stage, fraction, clock.snapshot()):
                    lost.set()
            except Exception:
                log.exception("job %s: progress update failed", job.id)

        return progress

    def _output(self, job: Job, event: Any, clock: StageClock, lost: threading.Event) -> None:
        """An output is written: handed to the ``on_output`` hooks while the run still owns the job."""
        assert job.run_id is not None
        if not self.on_output or event.path is None:
            return
        try:  # the record says where the run is; False: superseded or requeued meanwhile
            owned = self.store.progress(job.id, job.run_id, event.stage, overall_progress(event.stage),
                                        clock.snapshot())
        except Exception:
            log.exception("job %s: progress update failed", job.id)
            owned = True
        if not owned:
            lost.set()
            return
        self.deliver(job, event.message or event.stage, Path(event.path))

    def deliver(self, job: Job, name: str, path: Path) -> None:
        """An output of a run that holds ``job`` is written (here, or uploaded by a remote worker):
        the ``on_output`` hooks (the outbox) take it now."""
        for hook in self.on_output:
            try:
                hook(job, name, path)
            except Exception as exc:  # the hooks at the job's end try again
                hook_name = getattr(hook, "__name__", repr(hook))
                log.exception("job %s: output hook %s failed", job.id, hook_name)
                self._note(job.id, "hook_failed", f"{hook_name}: {type(exc).__name__}: {exc}")

    # --- runs on remote workers (node.web.workers): the same endings as a run here ---------------
    def complete(self, job: Job, outdir: Path, timings: dict[str, float],
                 failed_outputs: dict[str, dict[str, str]] | None = None) -> str | None:
        """A remote run of ``job`` uploaded its results into ``outdir``: done, then the hooks."""
        return self._done(job, outdir, StageClock.of(timings), failed_outputs)

    def failed_elsewhere(self, job: Job, code: str, message: str, timings: dict[str, float]) -> str | None:
        """A remote run of ``job`` failed: retried or failed by the same rules as a run here."""
        return self._failed(job, code, message, StageClock.of(timings))

    def _beat(self, job: Job, lost: threading.Event, stop: threading.Event) -> None:
        assert job.run_id is not None
        while not stop.wait(self.heartbeat_s):
            try:
                if not self.store.heartbeat(job.id, job.run_id):
                    lost.set()
                    return
            except Exception:
                log.exception("job %s: heartbeat failed", job.id)

    @staticmethod
    def _closed(closed: tuple[str, float] | None) -> None:
        if closed is not None:
            metrics.STAGE_SECONDS.labels(stage=closed[0]).observe(closed[1])

    def _state(self, job_id: str) -> str | None:
        current = self.store.get(job_id)
        return current.state if current else None

    def _failed(self, job: Job, code: str, message: str, clock: StageClock) -> str | None:
        assert job.run_id is not None
        self._discard(self.results_root / job.id / job.run_id)
        retry_in = self.settings.queue.retry_delay_s * 2 ** (job.attempts - 1) if code in TRANSIENT_CODES else None
        after = self.store.fail(job.id, job.run_id, code, message, retry_in, clock.snapshot())
        if after is None:
            return self._state(job.id)
        if after.state == "queued" and self.enqueue is not None:
            self.enqueue(job.id, retry_in or 0.0)
        metrics.JOBS_FINISHED.labels(state=after.state).inc()
        return after.state

    def _done(self, job: Job, outdir: Path, clock: StageClock,
              failed: dict[str, dict[str, str]] | None = None) -> str | None:
        assert job.run_id is not None
        if not self.store.finish(job.id, job.run_id, str(outdir), clock.snapshot(), failed):
            log.info("job %s series %s: finished, but the job was superseded meanwhile", job.id, job.series_uid)
            self._discard(outdir)
            return self._state(job.id)
        for other in outdir.parent.iterdir():  # folders of earlier, interrupted runs
            if other != outdir:
                shutil.rmtree(other, ignore_errors=True)
        metrics.JOBS_FINISHED.labels(state="done").inc()
        log.info("job %s series %s: done in %.1f s", job.id, job.series_uid, sum(clock.seconds.values()))
        done = self.store.get(job.id) or job
        for hook in self.hooks:
            try:
                hook(done, outdir)
            except Exception as exc:
                name = getattr(hook, "__name__", repr(hook))
                log.exception("job %s: hook %s failed", job.id, name)
                self._note(job.id, "hook_failed", f"{name}: {type(exc).__name__}: {exc}")
        return "done"

    def _note(self, job_id: str, event: str, detail: str) -> None:
        def change(j: Job) -> bool:
            j.note(event, detail)
            return True

        self.store.mutate(job_id, change)
