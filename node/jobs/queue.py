"""The job queue: huey, with SQLite storage embedded (``<data_dir>/queue.db``) or Redis for workers
on many machines. A queue message is only a job id; everything else lives in the job record, so a
lost or repeated message is harmless (claiming a job is a compare-and-set on its record).

huey removes a message when a worker takes it (SQLite and Redis alike): a worker killed mid-job
takes its message with it. Recovery therefore comes from the job store, not from huey:
:func:`node.jobs.reconcile` requeues running jobs whose worker is gone.
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

log = logging.getLogger(__name__)

TASK_NAME = "segnode.run_job"


def make_huey(settings: Settings) -> Huey:
    """The huey instance the settings ask for; results are not stored (the job store has them)."""
    if settings.queue.backend == "redis":
        return RedisHuey(name="segnode", url=settings.queue.redis_url.get_secret_value(), results=False,
                         utc=True)
    path = Path(settings.node.data_dir) / "queue.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name="segnode", filename=str(path), results=False, utc=True, fsync=True)


def _no_worker_here(job_id: str) -> None:
    raise RuntimeError(f"job {job_id}: this process only enqueues")


class _QuietConsumer(Consumer):
    """A huey consumer that leaves signal handling to its host (``segnode serve`` runs it beside
    uvicorn, which owns SIGINT/SIGTERM)."""

    def _set_signal_handlers(self) -> None:
        pass


def _wakeable(wake: threading.Event) -> type[Worker]:
    class WakeableWorker(Worker):
        """A huey worker whose idle wait (SQLite: it polls the queue) ends as soon as this process
        enqueues a job, not at its next poll: up to ``max_delay`` (0.5 s) before a job started."""

        def sleep(self) -> None:
            if wake.wait(min(self.delay, self.max_delay)):
                wake.clear()
                self.delay = self.default_delay
            else:
                self.delay = min(self.delay * self.backoff, self.max_delay)

    return WakeableWorker


class JobQueue:
    """Enqueue job ids; run them with ``handler(job_id)`` in a huey consumer."""

    def __init__(self, huey: Huey, handler: Callable[[str], None] | None = None) -> None:
        self.huey = huey
        run = handler or _no_worker_here

        def run_job(job_id: str) -> None:
            run(job_id)

        # Defined here, so the task's registry name (module + name) is the same in every process,
        # whatever the handler: a producer-only process and a worker must agree on it.
        self._task = huey.task(name=TASK_NAME)(run_job)
        self._consumer: Consumer | None = None
        self._wake = threading.Event()  # set when this process enqueues: idle workers look at once

    def enqueue(self, job_id: str, delay: float = 0.0) -> None:
        if delay > 0:
            self._task.schedule((job_id,), delay=delay)
        else:
            self._task(job_id)
            self._wake.set()

    def pending(self) -> int:
        return self.huey.pending_count()

    def consumer(self, workers: int) -> Consumer:
        """Worker threads plus huey's scheduler (for delayed retries); signals are the host's
        (``segnode serve`` and ``segnode worker`` drain on SIGTERM, see :mod:`node.serve`)."""
        cls = type("Consumer", (_QuietConsumer,), {"worker_class": _wakeable(self._wake)})
        return cls(self.huey, workers=workers, worker_type="thread", periodic=False,
                   initial_delay=0.05, backoff=1.5, max_delay=0.5, check_worker_health=True)

    def start(self, workers: int) -> None:
        """Start a consumer in this process's threads (without signal handlers)."""
        self._consumer = self.consumer(workers)
        self._consumer.start()
        log.info("queue: %d worker thread(s) on %s", workers, type(self.huey).__name__)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs; wait up to ``timeout`` s for running ones (they are requeued at the next
        start if they do not finish)."""
        if self._consumer is not None:
            self._consumer.shutdown_timeout = timeout
            self._consumer.stop_flag.set()
            self._wake.set()  # idle workers see the stop flag now, not after their wait
            self._consumer.stop(graceful=True)
            self._consumer = None
