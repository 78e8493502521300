"""Job records: what each job is, where it stands, and what happened to it.

A job's life: ``queued -> running -> done``; ``running -> queued`` again for a retry after a
transient error or when its worker died; ``failed`` with a code and message; ``superseded`` when a
later generation of the same series arrived. Every transition is a compare-and-set on the record's
``version``, so two workers can never both run or both finish one job (exactly-once completion).

Where the records live: SQLite ``<data_dir>/jobs.db`` with the embedded SQLite queue, **Redis** with
the Redis queue. With Redis, workers run on other machines: they must update the records they run,
and the API must see those updates at once. A SQLite file on the serving node would need a second
channel (workers calling the API back) and SQLite over a network filesystem is unsafe (broken
locking). Redis is already the shared, durable (AOF) point every worker talks to, and WATCH/MULTI
gives the same compare-and-set. Both backends sit behind the same few primitives, so every rule
about jobs (idempotency, supersede, claim, retry) is written once, here, and tested on both.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

from node.sqlite import Schema, connect_durable, open_store, statements

State = Literal["queued", "running", "done", "failed", "superseded"]
STATES: tuple[State, ...] = ("queued", "running", "done", "failed", "superseded")
#: States a later generation supersedes (a failed job stays failed: its reason stays visible).
SUPERSEDABLE = ("queued", "running", "done")
HISTORY_LIMIT = 50


@dataclass
class Job:
    """One run of one pipeline over one instance set of one series."""

    id: str
    key: str  # idempotency: series + instance set + pipeline version
    series_uid: str
    study_uid: str
    generation: int
    folder: str
    instance_count: int
    rule: str
    pipeline: dict[str, Any]
    pipeline_version: str
    engine: str
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"state": ...}
    sender: dict[str, str] = field(default_factory=dict)
    state: State = "queued"
    stage: str = ""
    progress: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    error: dict[str, str] | None = None  # {"code", "message"}
    #: A done job's outputs that failed (the labels stand): name -> {"code", "message"}.
    failed_outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    attempts: int = 0  # runs started
    max_attempts: int = 3
    not_before: float = 0.0  # a retry waits until then
    run_id: str | None = None
    worker: str | None = None
    heartbeat: float = 0.0
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    results: str | None = None
    superseded_by: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def note(self, event: str, detail: str = "", now: float | None = None) -> None:
        self.history.append({"t": round(now or time.time(), 3), "event": event, "detail": detail})
        del self.history[:-HISTORY_LIMIT]

    def public(self) -> dict[str, Any]:
        """The record as the API shows it."""
        data = asdict(self)
        data.pop("key")
        data.pop("version")
        return data


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


#: Tells this process from an earlier one with the same pid (a container's PID 1 after a restart).
_PROCESS_TOKEN = uuid.uuid4().hex[:6]


def worker_id() -> str:
    """``host:pid:token`` of this process: who runs a job, so that the same host can tell a dead one."""
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TOKEN}"


def dead_on_this_host(worker: str) -> bool:
    """True when ``worker`` ran on this host in a process that no longer exists. Never for a remote
    worker (``host:pid:token:name``, claimed through ``/api/worker``): its host name says nothing
    about this machine's processes (containers share names), so only its lease tells."""
    parts = worker.split(":")
    host, pid, token = (parts + ["", ""])[:3]
    if len(parts) > 3 or host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return token != _PROCESS_TOKEN
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Backend(Protocol):
    """What a storage must offer; every operation is atomic on its own."""

    def insert(self, job: Job) -> bool:
        """Store a new job; False when a job with its ``key`` exists."""

    def load(self, job_id: str) -> Job | None: ...

    def by_key(self, key: str) -> str | None: ...

    def replace(self, job: Job, expected_version: int) -> bool:
        """Store ``job`` (with ``version = expected_version + 1``) if the stored one has that version."""

    def series_job_ids(self, series_uid: str) -> list[str]: ...

    def jobs(self, state: str | None, limit: int, offset: int) -> list[Job]:
        """Newest first."""

    def counts(self) -> dict[str, int]: ...

    def put_series(self, record: dict[str, Any]) -> None: ...

    def series(self, limit: int, offset: int) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class JobStore:
    """Job records and their transitions, over a :class:`Backend`."""

    def __init__(self, backend: Backend, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock

    # --- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self.backend.load(job_id)

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        return self.backend.jobs(state, limit, offset)

    def counts(self) -> dict[str, int]:
        counts = self.backend.counts()
        return {s: counts.get(s, 0) for s in STATES}

    def for_series(self, series_uid: str) -> list[Job]:
        jobs = [j for j in map(self.backend.load, self.backend.series_job_ids(series_uid)) if j]
        return sorted(jobs, key=lambda j: (j.created, j.id))

    # --- the one way to change a record ------------------------------------------------------
    def mutate(self, job_id: str, change: Callable[[Job], bool]) -> Job | None:
        """Apply ``change`` (returns False to leave the record as it is) with compare-and-set,
        retrying on conflict. Returns the job as stored after a change, None if unchanged."""
        for _ in range(100):
            job = self.backend.load(job_id)
            if job is None:
                return None
            version = job.version
            if not change(job):
                return None
            job.version = version + 1
            if self.backend.replace(job, version):
                return job
        raise RuntimeError(f"job {job_id}: too many concurrent updates")

    # --- transitions ---------------------------------------------------------------------------
    def submit(self, job: Job) -> tuple[Job, bool]:
        """Add ``job`` unless one with the same key exists (then return that one, False).
        A job of a lower generation of the same series is superseded; a job that arrives after a
        higher generation is stored as superseded at once."""
        existing = self._by_key(job.key)
        if existing is not None:
            return existing, False
        now = self.clock()
        job.created = job.created or now
        others = self.for_series(job.series_uid)
        newer = [o for o in others if o.generation > job.generation and o.state != "superseded"]
        if newer:
            job.state, job.superseded_by = "superseded", newer[-1].id
            job.note("superseded", f"generation {newer[-1].generation} arrived first", now)
        else:
            job.note("queued", f"rule {job.rule}, generation {job.generation}", now)
        if not self.backend.insert(job):
            existing = self._by_key(job.key)
            if existing is None:
                raise RuntimeError(f"job key {job.key} is taken but its job is missing")
            return existing, False
        for other in others:
            if other.generation < job.generation:
                self._supersede(other.id, job)
        return job, True

    def _by_key(self, key: str) -> Job | None:
        job_id = self.backend.by_key(key)
        return self.backend.load(job_id) if job_id else None

    def _supersede(self, job_id: str, by: Job) -> None:
        def change(j: Job) -> bool:
            if j.state not in SUPERSEDABLE:
                return False
            j.note("superseded", f"by job {by.id} (generation {by.generation}) while {j.state}", self.clock())
            j.state, j.superseded_by = "superseded", by.id
            return True

        self.mutate(job_id, change)

    def claim(self, job_id: str, worker: str) -> Job | None:
        """queued -> running for ``worker``; None if the job is not queued or must still wait."""
        now = self.clock()

        def change(j: Job) -> bool:
            if j.state != "queued" or j.not_before > now:
                return False
            j.state, j.run_id, j.worker, j.heartbeat = "running", uuid.uuid4().hex[:12], worker, now
            j.attempts += 1
            j.started, j.finished, j.stage, j.progress, j.timings = now, None, "", 0.0, {}
            j.note("running", f"attempt {j.attempts} on {worker}", now)
            return True

        return self.mutate(job_id, change)

    def _running(self, job_id: str, run_id: str, change: Callable[[Job], None]) -> bool:
        """Change a job only while it is running under ``run_id``; False if it no longer is."""
        def guarded(j: Job) -> bool:
            if j.state != "running" or j.run_id != run_id:
                return False
            change(j)
            return True

        return self.mutate(job_id, guarded) is not None

    def progress(self, job_id: str, run_id: str, stage: str, fraction: float,
                 timings: dict[str, float] | None = None) -> bool:
        now = self.clock()

        def change(j: Job) -> None:
            j.stage, j.progress, j.heartbeat = stage, max(0.0, min(1.0, fraction)), now
            if timings is not None:
                j.timings = {k: round(v, 3) for k, v in timings.items()}

        return self._running(job_id, run_id, change)

    def heartbeat(self, job_id: str, run_id: str) -> bool:
        now = self.clock()
        return self._running(job_id, run_id, lambda j: setattr(j, "heartbeat", now))

    def finish(self, job_id: str, run_id: str, results: str, timings: dict[str, float],
               failed_outputs: dict[str, dict[str, str]] | None = None) -> bool:
        """running -> done, once: False if the run lost the job (superseded, requeued). ``failed_outputs``
        (name -> code, message): outputs that failed while the segmentation succeeded; the history
        says "done, N output(s) failed"."""
        now = self.clock()
        failed = {name: dict(e) for name, e in (failed_outputs or {}).items()}

        def change(j: Job) -> None:
            j.state, j.stage, j.progress, j.finished, j.results, j.error = "done", "done", 1.0, now, results, None
            j.failed_outputs = failed
            j.timings = {k: round(v, 3) for k, v in timings.items()}
            detail = f"attempt {j.attempts}"
            if failed:
                listed = ", ".join(f"{name} [{e['code']}]" for name, e in failed.items())
                detail += f", {len(failed)} output{'s' if len(failed) > 1 else ''} failed: {listed}"
            j.note("done", detail, now)

        return self._running(job_id, run_id, change)

    def fail(self, job_id: str, run_id: str, code: str, message: str, retry_in: float | None,
             timings: dict[str, float] | None = None) -> Job | None:
        """After an error: back to queued for a retry in ``retry_in`` seconds when given and attempts
        are left, else failed. Returns the job as stored, None if the run had lost it."""
        now = self.clock()

        def change(j: Job) -> bool:
            if j.state != "running" or j.run_id != run_id:
                return False
            j.error, j.finished = {"code": code, "message": message}, now
            if timings is not None:
                j.timings = {k: round(v, 3) for k, v in timings.items()}
            if retry_in is not None and j.attempts < j.max_attempts:
                j.state, j.run_id, j.not_before = "queued", None, now + retry_in
                j.note("retry", f"{code}: {message} (attempt {j.attempts}/{j.max_attempts}, "
                                f"again in {retry_in:g} s)", now)
            else:
                j.state = "failed"
                j.note("failed", f"{code}: {message}", now)
            return True

        return self.mutate(job_id, change)

    def requeue(self, job_id: str, reason: str, *, states: Iterable[str] = ("failed",),
                reset_attempts: bool = True) -> Job | None:
        """Back to queued (a user's retry, or a job whose worker died); None if not in ``states``."""
        allowed, now = tuple(states), self.clock()

        def change(j: Job) -> bool:
            if j.state not in allowed:
                return False
            j.state, j.run_id, j.not_before, j.stage, j.progress = "queued", None, 0.0, "", 0.0
            if reset_attempts:
                j.attempts, j.error = 0, None
            j.note("requeued", reason, now)
            return True

        return self.mutate(job_id, change)

    def release(self, job_id: str, run_id: str, reason: str) -> Job | None:
        """A run cut off on purpose (the node stops): back to queued, the attempt not counted.
        None if the run no longer owns the job (it finished or was superseded meanwhile)."""
        now = self.clock()

        def change(j: Job) -> bool:
            if j.state != "running" or j.run_id != run_id:
                return False
            j.state, j.run_id, j.not_before, j.stage, j.progress = "queued", None, 0.0, "", 0.0
            j.attempts = max(0, j.attempts - 1)
            j.note("requeued", reason, now)
            return True

        return self.mutate(job_id, change)

    def orphaned(self, job_id: str, reason: str) -> Job | None:
        """A running job whose worker is gone: queued again, or failed once its attempts are used up
        (a job that kills its worker every time, e.g. out of memory, must not loop forever)."""
        now = self.clock()

        def change(j: Job) -> bool:
            if j.state != "running":
                return False
            j.run_id, j.stage, j.progress = None, "", 0.0
            if j.attempts >= j.max_attempts:
                j.state, j.finished = "failed", now
                j.error = {"code": "worker_lost", "message": f"{reason} in each of {j.attempts} attempts"}
                j.note("failed", f"worker_lost: {reason}", now)
            else:
                j.state, j.not_before = "queued", 0.0
                j.note("requeued", reason, now)
            return True

        return self.mutate(job_id, change)

    def orphans(self, stale_after: float, dead_worker: Callable[[str], bool]) -> list[Job]:
        """Running jobs whose worker is gone: known dead, or silent for ``stale_after`` seconds."""
        now = self.clock()
        return [j for j in self.list("running", limit=10_000)
                if dead_worker(j.worker or "") or now - j.heartbeat > stale_after]

    def set_destinations(self, job_id: str, states: dict[str, dict[str, Any]]) -> Job | None:
        def change(j: Job) -> bool:
            j.destinations = {**j.destinations, **states}
            return True

        return self.mutate(job_id, change)

    # --- series seen ---------------------------------------------------------------------------
    def record_series(self, record: dict[str, Any]) -> None:
        """What the router decided for a series (also when no rule matched)."""
        self.backend.put_series({**record, "updated": self.clock()})

    def series(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return self.backend.series(limit, offset)

    def close(self) -> None:
        self.backend.close()


# --- SQLite ---------------------------------------------------------------------------------------

#: ``jobs.db``. Version 0: segnode 0.1.0 (unversioned); 1: the same tables, versioned.
SCHEMA = Schema("job store", 1, statements("""
    create table if not exists jobs (id text primary key, key text unique not null,
        series_uid text not null, state text not null, created real not null,
        version integer not null, doc text not null);
    create index if not exists jobs_series on jobs (series_uid);
    create index if not exists jobs_state on jobs (state, created);
    create index if not exists jobs_created on jobs (created);
    create table if not exists series (uid text primary key, updated real not null, doc text not null)
"""), migrations={0: ()})


class SqliteBackend:
    """``jobs.db``: one row per job (indexed columns + the JSON record), one per series."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._local.db = open_store(self.path, SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect_durable(self.path)
            self._local.db = db
        return db

    def insert(self, job: Job) -> bool:
        try:
            self._db().execute(
                "insert into jobs (id, key, series_uid, state, created, version, doc) values (?,?,?,?,?,?,?)",
                (job.id, job.key, job.series_uid, job.state, job.created, job.version, job.to_json()))
        except sqlite3.IntegrityError:
            return False
        return True

    def load(self, job_id: str) -> Job | None:
        row = self._db().execute("select doc from jobs where id = ?", (job_id,)).fetchone()
        return Job.from_json(row[0]) if row else None

    def by_key(self, key: str) -> str | None:
        row = self._db().execute("select id from jobs where key = ?", (key,)).fetchone()
        return row[0] if row else None

    def replace(self, job: Job, expected_version: int) -> bool:
        cursor = self._db().execute(
            "update jobs set state = ?, version = ?, doc = ? where id = ? and version = ?",
            (job.state, job.version, job.to_json(), job.id, expected_version))
        return cursor.rowcount == 1

    def series_job_ids(self, series_uid: str) -> list[str]:
        rows = self._db().execute("select id from jobs where series_uid = ?", (series_uid,)).fetchall()
        return [r[0] for r in rows]

    def jobs(self, state: str | None, limit: int, offset: int) -> list[Job]:
        where, args = ("where state = ?", [state]) if state else ("", [])
        rows = self._db().execute(f"select doc from jobs {where} order by created desc, id desc limit ? offset ?",
                                  (*args, limit, offset)).fetchall()
        return [Job.from_json(r[0]) for r in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db().execute("select state, count(*) from jobs group by state").fetchall())

    def put_series(self, record: dict[str, Any]) -> None:
        self._db().execute("insert or replace into series (uid, updated, doc) values (?,?,?)",
                           (record["series_uid"], record["updated"], json.dumps(record)))

    def series(self, limit: int, offset: int) -> list[dict[str, Any]]:
        rows = self._db().execute("select doc from series order by updated desc limit ? offset ?",
                                  (limit, offset)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


# --- Redis ----------------------------------------------------------------------------------------

class RedisBackend:
    """The same records in Redis: ``<prefix>:job:<id>`` JSON, indexes as sets and sorted sets;
    compare-and-set with WATCH/MULTI."""

    def __init__(self, url: str, prefix: str = "segnode") -> None:
        import redis

        self.redis = redis.Redis.from_url(url)
        self.p = prefix
        self._watch_error = redis.WatchError

    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def insert(self, job: Job) -> bool:
        key_key = f"{self.p}:jobkey:{job.key}"
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key_key)
                if pipe.exists(key_key):
                    return False
                pipe.multi()
                pipe.set(key_key, job.id)
                pipe.set(self._job(job.id), job.to_json())
                pipe.sadd(f"{self.p}:series-jobs:{job.series_uid}", job.id)
                pipe.zadd(f"{self.p}:jobs", {job.id: job.created})
                pipe.zadd(f"{self.p}:state:{job.state}", {job.id: job.created})
                pipe.execute()
                return True
            except self._watch_error:
                return False

    def load(self, job_id: str) -> Job | None:
        raw = self.redis.get(self._job(job_id))
        return Job.from_json(raw) if raw else None

    def by_key(self, key: str) -> str | None:
        raw = self.redis.get(f"{self.p}:jobkey:{key}")
        return raw.decode() if raw else None

    def replace(self, job: Job, expected_version: int) -> bool:
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(self._job(job.id))
                raw = pipe.get(self._job(job.id))
                if raw is None:
                    return False
                old = Job.from_json(raw)
                if old.version != expected_version:
                    return False
                pipe.multi()
                pipe.set(self._job(job.id), job.to_json())
                if old.state != job.state:
                    pipe.zrem(f"{self.p}:state:{old.state}", job.id)
                    pipe.zadd(f"{self.p}:state:{job.state}", {job.id: job.created})
                pipe.execute()
                return True
            except self._watch_error:
                return False

    def series_job_ids(self, series_uid: str) -> list[str]:
        return [m.decode() for m in self.redis.smembers(f"{self.p}:series-jobs:{series_uid}")]

    def jobs(self, state: str | None, limit: int, offset: int) -> list[Job]:
        index = f"{self.p}:state:{state}" if state else f"{self.p}:jobs"
        ids = self.redis.zrevrange(index, offset, offset + limit - 1)
        raws = self.redis.mget([self._job(i.decode()) for i in ids]) if ids else []
        return [Job.from_json(r) for r in raws if r]

    def counts(self) -> dict[str, int]:
        return {s: int(self.redis.zcard(f"{self.p}:state:{s}")) for s in STATES}

    def put_series(self, record: dict[str, Any]) -> None:
        uid = record["series_uid"]
        with self.redis.pipeline() as pipe:
            pipe.set(f"{self.p}:series:{uid}", json.dumps(record))
            pipe.zadd(f"{self.p}:series", {uid: record["updated"]})
            pipe.execute()

    def series(self, limit: int, offset: int) -> list[dict[str, Any]]:
        uids = self.redis.zrevrange(f"{self.p}:series", offset, offset + limit - 1)
        raws = self.redis.mget([f"{self.p}:series:{u.decode()}" for u in uids]) if uids else []
        return [json.loads(r) for r in raws if r]

    def close(self) -> None:
        self.redis.close()
