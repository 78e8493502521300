"""Jobs: a routed series becomes a job record and a queue message; workers run it.

* :class:`Router` — ``on_series_ready(SeriesReady)``: rules -> job (idempotent) -> queue.
* :func:`open_store` — the job records (SQLite ``<data_dir>/jobs.db``, or Redis with the Redis queue).
* :func:`reconcile` — at start: jobs whose worker died are queued again, queued jobs re-sent.
* :mod:`node.jobs.queue` (huey), :mod:`node.jobs.worker` (the job itself), :mod:`node.jobs.store`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from node.config import Settings
from node.ingest import SeriesReady
from node.jobs.store import Job, JobStore, RedisBackend, SqliteBackend, dead_on_this_host, new_job_id
from node.rules import Decision, Rule, destinations_of, load_rules, read_facts, route
from node import metrics

log = logging.getLogger(__name__)

__all__ = ["Job", "JobStore", "Router", "job_key", "open_store", "reconcile"]


def open_store(settings: Settings) -> JobStore:
    if settings.queue.backend == "redis":
        return JobStore(RedisBackend(settings.queue.redis_url.get_secret_value()))
    return JobStore(SqliteBackend(Path(settings.node.data_dir) / "jobs.db"))


def job_key(series_uid: str, sop_instance_uids: tuple[str, ...] | list[str], pipeline_version: str) -> str:
    """Same series, same instance set, same pipeline version: the same job."""
    digest = hashlib.sha256()
    for part in (series_uid, *sorted(sop_instance_uids), pipeline_version):
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()[:32]


class Router:
    """Turns ready series into jobs. ``enqueue(job_id, delay)`` sends a queue message."""

    def __init__(self, settings: Settings, store: JobStore, enqueue: Callable[[str, float], None],
                 rules: tuple[Rule, ...] | None = None,
                 sop_uids: Callable[[str], list[str]] | None = None) -> None:
        self.settings, self.store, self.enqueue = settings, store, enqueue
        #: The SOP instance UIDs of a series by its UID (the spool's index), so that routing reads one
        #: file instead of all: ``on_series_ready`` runs in ingest's thread and must be quick.
        self.sop_uids = sop_uids
        self.destination_names = [d.name for d in settings.destinations]
        self.rules = rules if rules is not None else load_rules(settings.node.rules, self.destination_names)

    def on_series_ready(self, ready: SeriesReady) -> Job | None:
        """The ingest callback: never raises (a bad series must not stop ingest)."""
        try:
            return self.submit(ready)[1]
        except Exception as exc:
            log.exception("series %s: routing failed", ready.series_uid)
            metrics.SERIES_ROUTED.labels(outcome="error").inc()
            try:
                self.store.record_series({"series_uid": ready.series_uid, "study_uid": ready.study_uid,
                                          "folder": str(ready.folder), "generation": ready.generation,
                                          "decision": f"routing failed: {type(exc).__name__}: {exc}",
                                          "rule": None, "job_id": None})
            except Exception:
                log.exception("series %s: cannot record the routing failure", ready.series_uid)
            return None

    def submit(self, ready: SeriesReady) -> tuple[Decision, Job | None]:
        uids = self.sop_uids(ready.series_uid) if self.sop_uids else None
        facts = read_facts(ready.folder, ready.sender, uids or None)
        if not ready.is_image:
            decision = Decision(None, f"never routed: ingest says {ready.modality or 'this'} is not an image series",
                                refused="not an image series")
        else:
            decision = route(facts, self.rules)
        record = {
            "series_uid": ready.series_uid, "study_uid": ready.study_uid, "folder": str(ready.folder),
            "instances": facts.instance_count, "generation": ready.generation, "reason": ready.reason,
            "via": ready.sender.via, "modality": facts.modality, "rule": decision.rule.name if decision.rule else None,
            "decision": decision.reason, "job_id": None,
        }
        if decision.rule is None:
            log.info("series %s: not routed: %s", ready.series_uid, decision.reason)
            self.store.record_series(record)
            metrics.SERIES_ROUTED.labels(outcome="refused" if decision.refused else "no_rule").inc()
            return decision, None
        job = self._job(ready, decision.rule, facts.sop_instance_uids, facts.instance_count)
        job, created = self.store.submit(job)
        self.store.record_series({**record, "job_id": job.id})
        metrics.SERIES_ROUTED.labels(outcome="job" if created else "duplicate").inc()
        if created and job.state == "queued":
            self.enqueue(job.id, 0.0)
            log.info("series %s: job %s queued (rule %s)", ready.series_uid, job.id, job.rule)
        else:
            log.info("series %s: job %s already %s (same instances and pipeline)", ready.series_uid, job.id,
                     job.state)
        return decision, job

    def _job(self, ready: SeriesReady, rule: Rule, uids: tuple[str, ...], count: int) -> Job:
        spec = rule.pipeline
        version = spec.version()
        destinations = destinations_of(rule, self.destination_names)
        return Job(
            id=new_job_id(), key=job_key(ready.series_uid, uids, version), series_uid=ready.series_uid,
            study_uid=ready.study_uid, generation=ready.generation, folder=str(ready.folder),
            instance_count=count, rule=rule.name, pipeline=spec.model_dump(), pipeline_version=version,
            engine=spec.engine or self.settings.segmentation.engine,
            destinations={name: {"state": "pending"} for name in destinations},
            sender={"via": ready.sender.via, "calling_aet": ready.sender.calling_aet},
            max_attempts=self.settings.queue.max_attempts, created=time.time(),
        )


def reconcile(store: JobStore, enqueue: Callable[[str, float], None], *, stale_after: float,
              all_running_are_orphans: bool = False, resend_queued: bool = True) -> dict[str, int]:
    """Put the queue back in line with the job records (at start, and now and then).

    huey drops a message when a worker takes it, so a worker that dies mid-job leaves a job that only
    its record remembers. Running jobs whose worker is gone (a dead process on this host, silent for
    ``stale_after`` s: its lease expired, or any with ``all_running_are_orphans``, when this process is
    the only worker) are queued again, or failed once their attempts are used up. With ``resend_queued`` every queued
    job gets a message too (a duplicate is harmless: only one run can claim a job).
    """
    dead = (lambda worker: True) if all_running_are_orphans else dead_on_this_host
    counts = {"requeued": 0, "failed": 0, "queued": 0}
    for job in store.orphans(stale_after, dead):
        reason = ("the worker died during the run" if dead(job.worker or "") else
                  f"the worker's lease expired (no heartbeat for {stale_after:g} s)")
        after = store.orphaned(job.id, reason)
        if after is None:
            continue
        log.warning("job %s series %s: worker gone mid-run; now %s", job.id, job.series_uid, after.state)
        if after.state == "queued":
            counts["requeued"] += 1
            if not resend_queued:
                enqueue(job.id, 0.0)
        else:
            counts["failed"] += 1
    if resend_queued:
        now = time.time()
        for job in store.list("queued", limit=100_000):
            enqueue(job.id, max(0.0, job.not_before - now))
            counts["queued"] += 1
    return counts
