"""The job queue: huey, with SQLite storage embedded (``<data_dir>/queue.db``) or Redis for workers
on many machines. A queue message is only a job id; everything else lives in the job record, so a
lost or repeated message is harmless (claiming a job is a compare-and-set on its record).

huey removes a message when a worker takes it (SQLite and Redis alike): a worker killed mid-job
takes its message with it. Recovery therefore comes from the job store, not from huey:
:func:`node.jobs.reconcile` requeues running jobs whose worker is gone (its lease expired).

One queue per device kind (:mod:`node.jobs.workers`): ``segnode`` for jobs any worker may run,
``segnode-gpu`` for jobs that need a GPU. A GPU worker takes from both, GPU jobs first; a CPU worker
only from the first, so it never takes a GPU job and never has to put one back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer, Worker

from node.config import Settings
from node.jobs.workers import ANY, GPU

log = logging.getLogger(__name__)

TASK_NAME = "segnode.run_job"
QUEUE_NAMES = {ANY: "segnode", GPU: "segnode-gpu"}


def make_huey(settings: Settings, kind: str = ANY) -> Huey:
    """The huey instance of one queue kind; results are not stored (the job store has them). The GPU
    queue is read without blocking: a GPU worker looks at it before it waits on the other."""
    name = QUEUE_NAMES[kind]
    if settings.queue.backend == "redis":
        return RedisHuey(name=name, url=settings.queue.redis_url.get_secret_value(), results=False,
                         utc=True, blocking=kind == ANY, read_timeout=0.5)
    path = Path(settings.node.data_dir) / "queue.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name=name, filename=str(path), results=False, utc=True, fsync=True)


def make_hueys(settings: Settings) -> dict[str, Huey]:
    return {kind: make_huey(settings, kind) for kind in QUEUE_NAMES}


def _no_worker_here(job_id: str) -> None:
    raise RuntimeError(f"job {job_id}: this process only enqueues")


class _QuietConsumer(Consumer):
    """A huey consumer that leaves signal handling to its host (``segnode serve`` runs it beside
    uvicorn, which owns SIGINT/SIGTERM)."""

    def _set_signal_handlers(self) -> None:
        pass


def _wakeable(wake: threading.Event, first: tuple[Huey, ...] = ()) -> type[Worker]:
    class WakeableWorker(Worker):
        """A huey worker whose idle wait (SQLite: it polls the queue) ends as soon as this process
        enqueues a job, not at its next poll: up to ``max_delay`` (0.5 s) before a job started.
        With ``first`` queues (a GPU worker's GPU queue) it takes a job from those, without
        blocking, before it looks at (or waits on) its own."""

        def loop(self, now: object = None) -> None:
            for huey in first:
                try:
                    task = huey.dequeue()
                except Exception:
                    log.exception("error reading from queue %s", huey.name)
                    continue
                if task is not None:
                    self.delay = self.default_delay
                    try:
                        huey.execute(task, now)
                    except Exception:
                        log.exception("unhandled error in task %s", task.id)
                    return
            super().loop(now)

        def sleep(self) -> None:
            if wake.wait(min(self.delay, self.max_delay)):
                wake.clear()
                self.delay = self.default_delay
            else:
                self.delay = min(self.delay * self.backoff, self.max_delay)

    return WakeableWorker


def _schedule_loop(huey: Huey, stop: threading.Event, interval: float = 1.0) -> None:
    """What huey's scheduler does for a consumer's own queue, for a queue it only takes from first:
    delayed messages (retries) are moved into the queue when due."""
    while not stop.wait(interval):
        try:
            for task in huey.read_schedule():
                huey.enqueue(task)
        except Exception:
            log.exception("error reading the schedule of %s", huey.name)


class JobQueue:
    """Enqueue job ids; run them with ``handler(job_id)`` in a huey consumer.

    ``huey`` is one queue or one per kind (:func:`make_hueys`); ``kind_of(job_id)`` says which queue a
    job goes to (default: the ``any`` queue)."""

    def __init__(self, huey: Huey | dict[str, Huey], handler: Callable[[str], None] | None = None, *,
                 kind_of: Callable[[str], str] | None = None) -> None:
        self.hueys = dict(huey) if isinstance(huey, dict) else {ANY: huey}
        self.huey = self.hueys[ANY]
        self.kind_of = kind_of
        run = handler or _no_worker_here

        def run_job(job_id: str) -> None:
            run(job_id)

        # Defined here, so the task's registry name (module + name) is the same in every process,
        # whatever the handler: a producer-only process and a worker must agree on it.
        self._tasks = {kind: h.task(name=TASK_NAME)(run_job) for kind, h in self.hueys.items()}
        self._task = self._tasks[ANY]
        self._consumer: Consumer | None = None
        self._stop_schedules = threading.Event()
        self._wake = threading.Event()  # set when this process enqueues: idle workers look at once

    def enqueue(self, job_id: str, delay: float = 0.0) -> None:
        kind = self.kind_of(job_id) if self.kind_of is not None else ANY
        task = self._tasks.get(kind)
        if task is None:
            raise RuntimeError(f"job {job_id}: no {kind} queue here")
        if delay > 0:
            task.schedule((job_id,), delay=delay)
        else:
            task(job_id)
            self._wake.set()

    def pending(self, kind: str = ANY) -> int:
        return self.hueys[kind].pending_count()

    def consumer(self, workers: int, *, kinds: tuple[str, ...] = (ANY,)) -> Consumer:
        """Worker threads plus huey's scheduler (for delayed retries) over the queues ``kinds``, first
        to last (the last is the one the workers wait on); signals are the host's (``segnode serve``
        and ``segnode worker`` drain on SIGTERM, see :mod:`node.serve`)."""
        first = tuple(self.hueys[k] for k in kinds[:-1])
        for huey in first:
            threading.Thread(target=_schedule_loop, args=(huey, self._stop_schedules), daemon=True,
                             name=f"schedule-{huey.name}").start()
        cls = type("Consumer", (_QuietConsumer,), {"worker_class": _wakeable(self._wake, first)})
        return cls(self.hueys[kinds[-1]], workers=workers, worker_type="thread", periodic=False,
                   initial_delay=0.05, backoff=1.5, max_delay=0.5, check_worker_health=True)

    def start(self, workers: int, kinds: tuple[str, ...] = (ANY,)) -> None:
        """Start a consumer in this process's threads (without signal handlers)."""
        self._consumer = self.consumer(workers, kinds=kinds)
        self._consumer.start()
        log.info("queue: %d worker thread(s) on %s, queues %s", workers, type(self.huey).__name__,
                 ", ".join(kinds))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs; wait up to ``timeout`` s for running ones (they are requeued at the next
        start if they do not finish)."""
        self._stop_schedules.set()
        if self._consumer is not None:
            self._consumer.shutdown_timeout = timeout
            self._consumer.stop_flag.set()
            self._wake.set()  # idle workers see the stop flag now, not after their wait
            self._consumer.stop(graceful=True)
            self._consumer = None
