"""Workers the node has seen, and which kind of device a job needs.

A remote worker calls the node for everything it does with a job (``/api/worker/...``), and says
hello while idle, so the node knows each worker's id, host, device, last heartbeat and current job
without a registry of its own on the workers' side. The table lives in the node's memory: a worker
that is alive says hello again within a lease, so a restarted node knows its workers again within
one lease. In-process workers (``segnode serve``'s threads) are listed as well.

Device kinds. A job names the kind it needs (``[rule.pipeline] device = "gpu"``) or none. Each kind
has its own huey queue (:mod:`node.jobs.queue`): a CPU worker does not even see GPU jobs (no
take-and-requeue loop, no job bouncing between CPU workers), and a GPU job with no GPU worker stays
in its queue, shown as waiting for one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: Queue kinds: ``any`` (jobs every worker may run) and ``gpu`` (GPU workers only).
ANY, GPU = "any", "gpu"


def device_kind(device: str) -> str:
    """``cpu``/``mps`` -> ``cpu``; ``gpu``/``gpu:N``/``cuda:N`` -> ``gpu``."""
    return GPU if device.split(":")[0] in ("gpu", "cuda") else "cpu"


def queue_kind(job_device: str | None) -> str:
    """The queue of a job needing ``job_device`` (a rule's ``pipeline.device``)."""
    return GPU if job_device == GPU else ANY


def queue_kinds_for(device: str) -> tuple[str, ...]:
    """The queues a worker on ``device`` takes jobs from, first to last: a GPU worker takes GPU jobs
    first; a CPU worker never sees them."""
    return (GPU, ANY) if device_kind(device) == GPU else (ANY,)


def job_device(pipeline: dict[str, Any]) -> str | None:
    device = pipeline.get("device")
    return str(device) if device else None


@dataclass
class WorkerSeen:
    id: str  # host:pid:token (node.jobs.store.worker_id)
    name: str  # the worker token's name, or "local"
    host: str
    device: str
    last_seen: float
    job: str | None = None  # the job it holds now
    jobs: dict[str, int] = field(default_factory=dict)  # state at the run's end -> count
    fetch_seconds: float = 0.0  # totals over its runs
    upload_seconds: float = 0.0


class WorkerRegistry:
    """The workers this node has seen; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerSeen] = {}

    def seen(self, worker_id: str, *, name: str, device: str, job: str | None | bool = False) -> WorkerSeen:
        """A call from ``worker_id``; ``job`` (when not False) is the job it holds now (None: idle)."""
        host = worker_id.split(":")[0]
        with self._lock:
            entry = self._workers.get(worker_id)
            if entry is None:
                entry = self._workers[worker_id] = WorkerSeen(worker_id, name, host, device, self.clock())
            entry.last_seen, entry.device, entry.name = self.clock(), device, name
            if job is not False:
                entry.job = job  # type: ignore[assignment]
            return entry

    def ended(self, worker_id: str, job_id: str, state: str, *, fetch_s: float = 0.0,
              upload_s: float = 0.0) -> None:
        """A run of ``job_id`` by ``worker_id`` ended in ``state`` (done, failed, queued, lost)."""
        with self._lock:
            entry = self._workers.get(worker_id)
            if entry is None:
                return
            entry.jobs[state] = entry.jobs.get(state, 0) + 1
            entry.fetch_seconds += fetch_s
            entry.upload_seconds += upload_s
            if entry.job == job_id:
                entry.job = None

    def alive(self, within_s: float) -> list[WorkerSeen]:
        now = self.clock()
        with self._lock:
            return [w for w in self._workers.values() if now - w.last_seen <= within_s]

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = [asdict(w) for w in self._workers.values()]
        return sorted(rows, key=lambda w: (-w["last_seen"], w["id"]))

    def waiting_for(self, job_device_kind: str | None, within_s: float) -> str | None:
        """Why a queued job needing ``job_device_kind`` waits, if it is for want of a worker."""
        if job_device_kind != GPU:
            return None
        if any(device_kind(w.device) == GPU for w in self.alive(within_s)):
            return None
        return "waiting for a GPU worker"
