"""The outbox: a job's DICOM results, delivered to each of its destinations exactly once, durably.

While a job runs, :meth:`Outbox.enqueue_output` (a :class:`~node.jobs.worker.JobRunner` ``on_output``
hook) takes its SEG as soon as the pipeline has written it, before the other results; when the job is
done, :meth:`Outbox.enqueue_results` (a ``JobRunner`` hook) finds the DICOM files in its results folder
(the SEG, ``seg.dcm``, and any other ``*.dcm``; those already queued are no-ops). Both hard-link them
(copies across filesystems) into ``<data_dir>/outbox/<SOPInstanceUID>.dcm`` and records one
*delivery* per destination and instance in ``<data_dir>/outbox.db`` (SQLite, WAL, synchronous=FULL),
all before it returns. One thread per destination then sends what is due, and retries what failed.

Exactly once, per destination and SOP Instance UID:

* a delivery's key is ``(destination, sop_uid)``: enqueueing an instance that is already queued or
  delivered there (the same job twice, another job with the same output) is a no-op;
* ``pending -> delivering`` is recorded (fsynced) before anything is sent, and the outcome after. A
  delivery found ``delivering`` at start was interrupted (crash, kill): it is *in doubt* — before it
  is sent again the destination is asked whether it already holds the instance (QIDO-RS, C-FIND, a
  file check); only a destination that cannot tell gets it again. Transient failures (a timeout
  after the request went out) make a delivery in doubt too.

Retries: after failed attempt ``n`` the next one waits ``initial_delay_s * 2**(n-1)`` seconds, at most
``max_delay_s``; after ``max_attempts`` attempts, or at once for a permanent refusal (HTTP 4xx, C-STORE
0xA9xx/0xCxxx, rejected association), the delivery is ``failed`` until ``segnode outbox retry``. Times
are wall-clock seconds (``clock``), so schedules survive a restart; tests inject the clock.

Each job shows its state per destination in the job record's ``destinations`` (``on_change`` is
:meth:`node.jobs.store.JobStore.set_destinations`): ``pending | delivering | delivered | failed |
cancelled | skipped``, with attempts, the last error, the next attempt and the delivered time.
``cancelled``: a newer job for the same series was queued for that destination first; ``skipped``:
the job wrote no DICOM output (or none that the destination's ``accepts`` names: a treatment-planning
system with ``accepts = ["rtstruct"]`` gets the RTSTRUCT and nothing else; the output an instance is
comes from its SOP class, :data:`OUTPUT_OF_SOP_CLASS`). With a destination's ``delete_superseded``, once a job's results are
delivered, the results of older jobs for the same series are deleted from that Orthanc.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import logs
from node.config import Destination, OutboxSection, Settings
from node.export.senders import DeliveryError, Failure, Item, Sender, make_sender
from node.sqlite import Schema, connect_durable, open_store, statements

log = logging.getLogger(__name__)

STATES = ("pending", "delivering", "delivered", "failed", "cancelled")
#: ``outbox.db``. Version 0: segnode 0.1.0 (unversioned), ``instances.path`` absolute; 1: ``path`` relative
#: to ``<data_dir>/outbox`` (the file name), so a data folder can be moved or restored elsewhere.
SCHEMA = Schema("outbox", 1, statements("""
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, source_series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, created REAL NOT NULL,
    notes TEXT NOT NULL DEFAULT '{}');  -- destination -> {"state": "skipped"|"failed", "last_error": ...}
CREATE TABLE IF NOT EXISTS deliveries (
    destination TEXT NOT NULL, sop_uid TEXT NOT NULL, job_id TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, last_error TEXT,
    in_doubt INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
    delivered_at REAL, removed_at REAL,
    PRIMARY KEY (destination, sop_uid));
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_at);
CREATE TABLE IF NOT EXISTS job_deliveries (
    job_id TEXT NOT NULL, destination TEXT NOT NULL, sop_uid TEXT NOT NULL,
    PRIMARY KEY (job_id, destination, sop_uid));
CREATE INDEX IF NOT EXISTS job_deliveries_sop ON job_deliveries (destination, sop_uid);
"""), migrations={
    0: ("UPDATE instances SET path = sop_uid || '.dcm' WHERE path LIKE '%/' || sop_uid || '.dcm'",),
})
#: Instances per STOW-RS request or C-STORE association.
BATCH = 50
#: The pipeline output each DICOM result is, by SOP Class UID (what a destination's ``accepts`` names).
OUTPUT_OF_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7": "seg",  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.3": "rtstruct",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.104.1": "review",  # Encapsulated PDF Storage
    "1.2.840.10008.5.1.4.1.1.104.3": "dicom_mesh",  # Encapsulated STL Storage
}


def output_kind(sop_class_uid: str) -> str | None:
    """The output a DICOM result is (``seg``, ``rtstruct``, ...), or None for another SOP class."""
    return OUTPUT_OF_SOP_CLASS.get(sop_class_uid)

OnChange = Callable[[str, dict[str, dict[str, Any]]], Any]


@dataclass(frozen=True)
class Staged:
    """A DICOM file of a job's results, linked into the outbox."""

    item: Item
    size: int


def backoff(attempts: int, settings: OutboxSection) -> float:
    """Seconds to wait after ``attempts`` failed attempts (1, 2, ...): doubling, capped."""
    return min(settings.max_delay_s, settings.initial_delay_s * 2 ** max(0, attempts - 1))


def dicom_files(results_dir: Path) -> list[Path]:
    """The DICOM files a results folder holds (``*.dcm`` anywhere under it), sorted."""
    root = Path(results_dir)
    return sorted(p for p in root.rglob("*.dcm") if p.is_file() and not p.name.startswith("."))


class Outbox:
    """Durable deliveries of DICOM instances to the configured destinations; thread-safe."""

    def __init__(
        self,
        data_dir: Path,
        destinations: Iterable[Destination],
        settings: OutboxSection | None = None,
        *,
        calling_aet: str = "SEGNODE",
        on_change: OnChange | None = None,
        senders: Callable[[Destination], Sender] | None = None,
        clock: Callable[[], float] = time.time,
        recover: bool = True,
    ) -> None:
        """``recover=False`` for a second process on the same outbox (``segnode outbox``) while the node
        runs: only the process that delivers may take in-flight deliveries for interrupted ones."""
        self.root = Path(data_dir) / "outbox"
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(data_dir) / "outbox.db"
        self.destinations: dict[str, Destination] = {d.name: d for d in destinations}
        settings = settings or OutboxSection()
        self.settings, self.on_change, self.clock = settings, on_change, clock
        self._make_sender = senders or (
            lambda d: make_sender(d, calling_aet=calling_aet, timeout=settings.timeout_s)
        )
        self._senders: dict[str, Sender] = {}
        self._sender_lock = threading.Lock()
        self._notify_lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.destinations}
        self._threads: list[threading.Thread] = []
        self._adopt(open_store(self.db_path, SCHEMA))
        self.recovered = self._recover() if recover else 0

    @classmethod
    def from_settings(cls, settings: Settings, on_change: OnChange | None = None, **kwargs: Any) -> Outbox:
        return cls(
            Path(settings.node.data_dir),
            settings.destinations,
            settings.outbox,
            calling_aet=settings.dicom.ae_title,
            on_change=on_change,
            **kwargs,
        )

    # --- SQLite ---------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        return db if db is not None else self._adopt(connect_durable(self.db_path))

    def _adopt(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """``db`` becomes this thread's connection (closed by :meth:`close`)."""
        db.row_factory = sqlite3.Row
        self._local.db = db
        with self._connections_lock:
            self._connections.append(db)
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("begin immediate")
        try:
            yield db
        except BaseException:
            db.execute("rollback")
            raise
        db.execute("commit")

    def close(self) -> None:
        self.stop()
        with self._sender_lock:
            for sender in self._senders.values():
                try:
                    sender.close()
                except Exception:
                    pass
            self._senders.clear()
        with self._connections_lock:
            for db in self._connections:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()

    def _recover(self) -> int:
        """Deliveries left ``delivering`` by a stopped process: in doubt, due now."""
        now = self.clock()
        with self._tx() as db:
            cursor = db.execute(
                "update deliveries set state = 'pending', in_doubt = 1, next_at = ?, updated = ? "
                "where state = 'delivering'",
                (now, now),
            )
        if cursor.rowcount:
            log.warning(
                "outbox: %d delivery(ies) were in flight when the node stopped; the destinations "
                "are asked before they are sent again",
                cursor.rowcount,
            )
        return cursor.rowcount

    # --- queueing -------------------------------------------------------------------------------
    def enqueue_output(self, job: Any, name: str, path: Path) -> dict[str, dict[str, Any]]:
        """The JobRunner ``on_output`` hook: one output of a running job, queued for its destinations
        at once if it is a DICOM file (the SEG); anything else (meshes, NIfTI) is not for the outbox."""
        path = Path(path)
        names = list(getattr(job, "destinations", {}) or {})
        if not names or path.suffix.lower() != ".dcm" or not path.is_file():
            return {}
        return self.enqueue(job.id, names, [path], source_series_uid=job.series_uid, study_uid=job.study_uid)

    def enqueue_results(self, job: Any, results_dir: Path) -> dict[str, dict[str, Any]]:
        """The JobRunner hook: the job's DICOM results, queued for each of its destinations."""
        names = list(getattr(job, "destinations", {}) or {})
        if not names:
            return {}
        return self.enqueue(
            job.id, names, dicom_files(results_dir), source_series_uid=job.series_uid, study_uid=job.study_uid
        )

    def enqueue(
        self,
        job_id: str,
        destinations: Iterable[str],
        files: Iterable[Path],
        *,
        source_series_uid: str = "",
        study_uid: str = "",
    ) -> dict[str, dict[str, Any]]:
        """Queue ``files`` for each destination; returns the job's state per destination."""
        staged = [s for s in (self._stage(Path(f)) for f in files) if s is not None]
        names = list(dict.fromkeys(destinations))
        now = self.clock()
        notes: dict[str, dict[str, Any]] = {}
        accepted = {name: self._accepted(name, staged) for name in names}
        for name in names:
            if name not in self.destinations:
                notes[name] = {
                    "state": "failed",
                    "last_error": f"no destination named {name!r} in the config",
                }
            elif not staged:
                notes[name] = {"state": "skipped", "last_error": "the job wrote no DICOM output to send"}
            elif not accepted[name]:
                wanted = ", ".join(self.destinations[name].accepts)
                notes[name] = {"state": "skipped", "last_error": f"it accepts only {wanted}: none of these"}
        cancelled_jobs: set[str] = set()
        with self._tx() as db:
            db.execute(
                "insert or ignore into jobs (job_id, source_series_uid, study_uid, created, notes) "
                "values (?,?,?,?,?)",
                (job_id, source_series_uid, study_uid, now, json.dumps(notes)),
            )
            db.execute("update jobs set notes = ? where job_id = ?", (json.dumps(notes), job_id))
            created = db.execute("select created from jobs where job_id = ?", (job_id,)).fetchone()[0]
            for s in staged:
                i = s.item
                db.execute(
                    "insert or ignore into instances values (?,?,?,?,?,?,?,?)",
                    (
                        i.sop_uid,
                        i.sop_class_uid,
                        i.study_uid,
                        i.series_uid,
                        i.transfer_syntax,
                        i.path.name,  # relative to the outbox folder (schema version 1)
                        s.size,
                        now,
                    ),
                )
            for name in names:
                if name not in self.destinations or not accepted[name]:
                    continue
                for s in accepted[name]:
                    db.execute(
                        "insert or ignore into deliveries (destination, sop_uid, job_id, state, next_at, "
                        "created, updated) values (?,?,?,'pending',?,?,?)",
                        (name, s.item.sop_uid, job_id, now, now, now),
                    )
                    db.execute(
                        "insert or ignore into job_deliveries values (?,?,?)", (job_id, name, s.item.sop_uid)
                    )
                if source_series_uid:
                    older = db.execute(
                        "select d.sop_uid, d.job_id from deliveries d join jobs j on j.job_id = d.job_id "
                        "where d.destination = ? and d.state in ('pending', 'failed') "
                        "and j.source_series_uid = ? "
                        "and d.job_id != ? and j.created < ?",
                        (name, source_series_uid, job_id, created),
                    ).fetchall()
                    mine = {st.item.sop_uid for st in accepted[name]}
                    for row in older:
                        if row["sop_uid"] in mine:  # the same instance again: this job needs it too
                            continue
                        db.execute(
                            "update deliveries set state = 'cancelled', last_error = ?, updated = ? "
                            "where destination = ? and sop_uid = ? and state in ('pending', 'failed')",
                            (f"superseded by job {job_id}", now, name, row["sop_uid"]),
                        )
                        cancelled_jobs.add(row["job_id"])
        if staged:
            log.info(
                "outbox: job %s: %d instance(s) queued for %s",
                job_id,
                len(staged),
                ", ".join(n for n in names if n in self.destinations) or "no known destination",
            )
        self._cleanup([s.item.sop_uid for s in staged])
        for other in sorted(cancelled_jobs):
            self._notify(other)
        states = self._notify(job_id)
        for name in names:
            if name in self._wake:
                self._wake[name].set()
        return states

    def _accepted(self, name: str, staged: list[Staged]) -> list[Staged]:
        """What of ``staged`` destination ``name`` receives: all, or the outputs its ``accepts`` names."""
        destination = self.destinations.get(name)
        if destination is None or not destination.accepts:
            return list(staged)
        return [s for s in staged if output_kind(s.item.sop_class_uid) in destination.accepts]

    def _stage(self, path: Path) -> Staged | None:
        """Reads the file's identity and links it into the outbox (once per SOP Instance UID)."""
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            logs.register_dataset(ds)  # its patient's values stay out of the delivery's log lines
            meta = ds.file_meta
            sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
            item = {
                "sop_class_uid": sop_class,
                "study_uid": str(ds.StudyInstanceUID),
                "series_uid": str(ds.SeriesInstanceUID),
                "transfer_syntax": str(meta.TransferSyntaxUID),
            }
        except Exception as exc:
            log.warning("outbox: %s is not a DICOM file to send (%s)", path, exc)
            return None
        if not sop_uid.replace(".", "").isdigit():
            log.warning("outbox: %s has an invalid SOP Instance UID", path)
            return None
        target = self.root / f"{sop_uid}.dcm"
        if not target.exists():
            _link_or_copy(path, target)
        return Staged(Item(sop_uid=sop_uid, path=target, **item), target.stat().st_size)

    # --- delivering -----------------------------------------------------------------------------
    def start(self) -> Outbox:
        """One delivery thread per destination."""
        self._stop.clear()
        for name in self.destinations:
            try:  # import the client libraries and open sessions now, not when the first result waits
                self._sender(name)
            except Exception as exc:  # a bad destination shows on its deliveries, with this reason
                log.warning("outbox: destination %s: %s", name, exc)
            thread = threading.Thread(
                target=self._loop, args=(name,), name=f"segnode-outbox-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for event in self._wake.values():
            event.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def _loop(self, name: str) -> None:
        wake = self._wake[name]
        while not self._stop.is_set():
            try:
                self.run_once(name)
            except Exception:  # never let a delivery thread die
                log.exception("outbox: delivery to %s failed unexpectedly", name)
            wake.wait(self.settings.poll_s)
            wake.clear()

    def run_once(self, destination: str | None = None) -> int:
        """Sends every delivery due now (each at most once per call); returns how many were tried."""
        tried = 0
        for name in [destination] if destination else list(self.destinations):
            now = self.clock()
            due = (
                self._db()
                .execute(
                    "select sop_uid, job_id, in_doubt from deliveries "
                    "where destination = ? and state = 'pending' "
                    "and next_at <= ? order by next_at, job_id, sop_uid",
                    (name, now),
                )
                .fetchall()
            )
            by_job: dict[str, list[sqlite3.Row]] = defaultdict(list)
            for row in due:
                by_job[row["job_id"]].append(row)
            for rows in by_job.values():
                for start in range(0, len(rows), BATCH):
                    if self._stop.is_set() and destination is None:
                        return tried
                    claimed = self._claim(name, rows[start : start + BATCH])
                    if claimed:
                        with logs.job_context(claimed[0]["job_id"]):
                            self._deliver(name, claimed)
                        tried += len(claimed)
        return tried

    def _claim(self, name: str, rows: list[sqlite3.Row]) -> list[sqlite3.Row]:
        now, claimed = self.clock(), []
        with self._tx() as db:
            for row in rows:
                cursor = db.execute(
                    "update deliveries set state = 'delivering', updated = ? where destination = ? "
                    "and sop_uid = ? and state = 'pending'",
                    (now, name, row["sop_uid"]),
                )
                if cursor.rowcount == 1:
                    claimed.append(row)
        return claimed

    def _sender(self, name: str) -> Sender:
        with self._sender_lock:
            sender = self._senders.get(name)
            if sender is None:
                sender = self._senders[name] = self._make_sender(self.destinations[name])
            return sender

    def _deliver(self, name: str, rows: list[sqlite3.Row]) -> None:
        items: dict[str, Item] = {}
        outcome: dict[str, Failure | None] = {}
        notes: dict[str, str] = {}
        for row in rows:
            item = self._item(row["sop_uid"])
            if item is None or not item.path.is_file():
                outcome[row["sop_uid"]] = Failure("the outbox file is missing", permanent=True)
            else:
                items[row["sop_uid"]] = item
        try:
            sender = self._sender(name)
            doubtful = [items[r["sop_uid"]] for r in rows if r["in_doubt"] and r["sop_uid"] in items]
            if doubtful:
                present = sender.present(doubtful)
                for uid in present or ():
                    outcome[uid] = None
                    notes[uid] = "already at the destination (an interrupted delivery had reached it)"
                    items.pop(uid)
            if items:
                outcome.update(sender.send(list(items.values())))
        except DeliveryError as exc:
            for uid in items:
                outcome.setdefault(uid, Failure(str(exc), exc.permanent))
        except Exception as exc:  # a bug or an unexpected library error: worth another attempt
            log.exception("outbox: sending to %s failed", name)
            for uid in items:
                outcome.setdefault(uid, Failure(f"{type(exc).__name__}: {exc}"))
        for row in rows:  # a sender that forgot an instance: treat as a failed attempt
            outcome.setdefault(row["sop_uid"], Failure("the sender gave no result for this instance"))
        self._record(name, rows, outcome, notes)

    def _record(
        self,
        name: str,
        rows: list[sqlite3.Row],
        outcome: Mapping[str, Failure | None],
        notes: Mapping[str, str],
    ) -> None:
        now = self.clock()
        jobs: set[str] = set()
        delivered: list[str] = []
        with self._tx() as db:
            for row in rows:
                uid, failure = row["sop_uid"], outcome[row["sop_uid"]]
                current = db.execute(
                    "select attempts from deliveries where destination = ? and sop_uid = ?", (name, uid)
                ).fetchone()
                attempts = (current["attempts"] if current else 0) + (0 if uid in notes else 1)
                if failure is None:
                    db.execute(
                        "update deliveries set state = 'delivered', attempts = ?, delivered_at = ?, "
                        "updated = ?, in_doubt = 0, last_error = ? where destination = ? and sop_uid = ?",
                        (attempts, now, now, notes.get(uid), name, uid),
                    )
                    delivered.append(uid)
                elif failure.permanent or attempts >= self.settings.max_attempts:
                    db.execute(
                        "update deliveries set state = 'failed', attempts = ?, last_error = ?, updated = ? "
                        "where destination = ? and sop_uid = ?",
                        (attempts, failure.message, now, name, uid),
                    )
                else:
                    db.execute(
                        "update deliveries set state = 'pending', attempts = ?, last_error = ?, next_at = ?, "
                        "updated = ?, in_doubt = 1 where destination = ? and sop_uid = ?",
                        (attempts, failure.message, now + backoff(attempts, self.settings), now, name, uid),
                    )
                jobs.update(
                    r[0]
                    for r in db.execute(
                        "select job_id from job_deliveries where destination = ? and sop_uid = ?", (name, uid)
                    )
                )
        failures = {uid: f for uid, f in outcome.items() if f is not None}
        if delivered:
            log.info("outbox: %d instance(s) delivered to %s", len(delivered), name)
        if failures:
            first = next(iter(failures.values()))
            log.warning("outbox: %d instance(s) not delivered to %s: %s", len(failures), name, first.message)
        for job_id in sorted(jobs):
            summary = self._notify(job_id).get(name, {})
            if summary.get("state") == "delivered" and self.destinations[name].delete_superseded:
                self._delete_superseded(name, job_id)
        self._cleanup([r["sop_uid"] for r in rows])

    def _item(self, sop_uid: str) -> Item | None:
        row = self._db().execute("select * from instances where sop_uid = ?", (sop_uid,)).fetchone()
        if row is None:
            return None
        return Item(
            sop_uid=row["sop_uid"],
            sop_class_uid=row["sop_class_uid"],
            study_uid=row["study_uid"],
            series_uid=row["series_uid"],
            transfer_syntax=row["transfer_syntax"],
            path=self.root / row["path"],  # a name; an absolute path (a version 0 row) stays as it is
        )

    def _delete_superseded(self, name: str, job_id: str) -> None:
        """Deletes older jobs' results for the same series from this (Orthanc) destination."""
        db = self._db()
        job = db.execute("select source_series_uid, created from jobs where job_id = ?", (job_id,)).fetchone()
        if job is None or not job["source_series_uid"]:
            return
        mine = {
            r[0]
            for r in db.execute(
                "select sop_uid from job_deliveries where job_id = ? and destination = ?", (job_id, name)
            )
        }
        older = db.execute(
            "select d.sop_uid, d.job_id from deliveries d join jobs j on j.job_id = d.job_id "
            "where d.destination = ? and d.state = 'delivered' and d.removed_at is null "
            "and j.source_series_uid = ? and d.job_id != ? "
            "and j.created < ?",
            (name, job["source_series_uid"], job_id, job["created"]),
        ).fetchall()
        uids = [r["sop_uid"] for r in older if r["sop_uid"] not in mine]
        if not uids:
            return
        try:
            deleted = self._sender(name).delete(uids)
        except Exception as exc:
            log.warning(
                "outbox: superseded results of series %s not deleted from %s: %s",
                job["source_series_uid"],
                name,
                exc,
            )
            return
        now = self.clock()
        with self._tx() as tx:
            for uid in uids:  # gone, whether we deleted it or someone else did
                tx.execute(
                    "update deliveries set removed_at = ?, updated = ? where destination = ? and sop_uid = ?",
                    (now, now, name, uid),
                )
        log.info(
            "outbox: %d superseded instance(s) of series %s deleted from %s (job %s is newer)",
            len(deleted),
            job["source_series_uid"],
            name,
            job_id,
        )
        for other in sorted({r["job_id"] for r in older}):
            self._notify(other)

    def _cleanup(self, sop_uids: Iterable[str]) -> None:
        """Outbox files whose every delivery is final (delivered or cancelled) are removed."""
        db = self._db()
        for uid in set(sop_uids):
            open_ = db.execute(
                "select count(*) from deliveries where sop_uid = ? and state not in "
                "('delivered', 'cancelled')",
                (uid,),
            ).fetchone()[0]
            if open_ == 0:
                (self.root / f"{uid}.dcm").unlink(missing_ok=True)

    # --- state ----------------------------------------------------------------------------------
    def job_destinations(self, job_id: str) -> dict[str, dict[str, Any]]:
        """The job's state per destination (what its record's ``destinations`` shows)."""
        db = self._db()
        job = db.execute("select notes from jobs where job_id = ?", (job_id,)).fetchone()
        out: dict[str, dict[str, Any]] = {}
        if job is not None:
            for name, note in json.loads(job["notes"]).items():
                out[name] = {
                    "state": note["state"],
                    "instances": 0,
                    "delivered": 0,
                    "attempts": 0,
                    "last_error": note.get("last_error"),
                    "next_attempt": None,
                    "queued_at": None,
                    "delivered_at": None,
                }
        rows = db.execute(
            "select jd.destination, d.state, d.attempts, d.last_error, d.next_at, d.delivered_at, "
            "d.removed_at, d.created from job_deliveries jd join deliveries d "
            "on d.destination = jd.destination and d.sop_uid = jd.sop_uid "
            "where jd.job_id = ? order by jd.destination, jd.sop_uid",
            (job_id,),
        ).fetchall()
        grouped: dict[str, list[sqlite3.Row]] = defaultdict(list)
        for row in rows:
            grouped[row["destination"]].append(row)
        for name, group in grouped.items():
            out[name] = _summary(group)
        return out

    def _notify(self, job_id: str) -> dict[str, dict[str, Any]]:
        # Read and record under one lock: two threads that change one job's deliveries must not
        # record their summaries in the opposite order (the older state would stay on the job).
        with self._notify_lock:
            summary = self.job_destinations(job_id)
            if self.on_change is not None and summary:
                try:
                    self.on_change(job_id, summary)
                except Exception:
                    log.exception("outbox: cannot record the delivery state of job %s", job_id)
        return summary

    def status(self) -> list[dict[str, Any]]:
        """Per destination: deliveries by state, the next due attempt, the latest error."""
        db = self._db()
        out = []
        names = list(self.destinations) + sorted(
            {r[0] for r in db.execute("select distinct destination from deliveries")} - set(self.destinations)
        )
        for name in names:
            counts = {state: 0 for state in STATES}
            counts.update(
                dict(
                    db.execute(
                        "select state, count(*) from deliveries where destination = ? group by state", (name,)
                    ).fetchall()
                )
            )
            nxt = db.execute(
                "select min(next_at) from deliveries where destination = ? and state = 'pending'", (name,)
            ).fetchone()[0]
            err = db.execute(
                "select last_error from deliveries where destination = ? and state in "
                "('pending', 'failed') and last_error is not null order by updated desc limit 1",
                (name,),
            ).fetchone()
            dest = self.destinations.get(name)
            out.append(
                {
                    "destination": name,
                    "kind": dest.kind if dest else "(not configured)",
                    **counts,
                    "next_attempt": nxt,
                    "last_error": err[0] if err else None,
                }
            )
        return out

    def retry(self, destination: str | None = None, job_id: str | None = None) -> int:
        """Failed deliveries (of one destination, one job, or all) are due again with fresh attempts."""
        now = self.clock()
        where, args = ["d.state = 'failed'"], []
        if destination:
            where.append("d.destination = ?")
            args.append(destination)
        if job_id:
            where.append(
                "exists (select 1 from job_deliveries jd where jd.job_id = ? and "
                "jd.destination = d.destination and jd.sop_uid = d.sop_uid)"
            )
            args.append(job_id)
        with self._tx() as db:
            rows = db.execute(
                f"select d.destination, d.sop_uid from deliveries d where {' and '.join(where)}", args
            ).fetchall()
            for row in rows:
                db.execute(
                    "update deliveries set state = 'pending', attempts = 0, next_at = ?, updated = ? "
                    "where destination = ? and sop_uid = ? and state = 'failed'",
                    (now, now, row["destination"], row["sop_uid"]),
                )
            jobs = {
                r[0]
                for row in rows
                for r in db.execute(
                    "select job_id from job_deliveries where destination = ? and sop_uid = ?",
                    (row["destination"], row["sop_uid"]),
                )
            }
        for job in sorted(jobs):
            self._notify(job)
        for row in rows:
            if row["destination"] in self._wake:
                self._wake[row["destination"]].set()
        return len(rows)

    def catch_up(self, jobs: Iterable[Any]) -> int:
        """Done jobs whose results never reached the outbox (the node stopped between the job's end
        and its hook) are queued now; returns how many."""
        db = self._db()
        count = 0
        ours = (self.root.parent / "results").resolve()
        for job in jobs:
            if not getattr(job, "destinations", None) or not getattr(job, "results", None):
                continue
            if db.execute("select 1 from jobs where job_id = ?", (job.id,)).fetchone():
                continue
            results = Path(job.results).resolve()
            if not results.is_dir() or not results.is_relative_to(ours):
                continue  # another machine's worker (Redis queue) delivers its own results
            self.enqueue_results(job, Path(job.results))
            count += 1
        return count


def _summary(rows: list[sqlite3.Row]) -> dict[str, Any]:
    states = [r["state"] for r in rows]
    delivered = states.count("delivered")
    if delivered == len(states):
        state = "delivered"
    elif "failed" in states:
        state = "failed"
    elif "delivering" in states:
        state = "delivering"
    elif "pending" in states:
        state = "pending"
    else:
        state = "cancelled"
    errors = [r["last_error"] for r in rows if r["last_error"] and r["state"] != "delivered"]
    pending = [r["next_at"] for r in rows if r["state"] == "pending"]
    done = [r["delivered_at"] for r in rows if r["delivered_at"] is not None]
    summary: dict[str, Any] = {
        "state": state,
        "instances": len(rows),
        "delivered": delivered,
        "attempts": max(r["attempts"] for r in rows),
        "last_error": errors[0] if errors else None,
        "next_attempt": round(min(pending), 3) if pending else None,
        "queued_at": round(min(r["created"] for r in rows), 3),
        "delivered_at": round(max(done), 3) if state == "delivered" and done else None,
    }
    removed = sum(r["removed_at"] is not None for r in rows)
    if removed:
        summary["removed_superseded"] = removed
    return summary


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link (no copy, same inode as the result) or, across filesystems, copy + fsync + rename."""
    try:
        os.link(source, target)
    except FileExistsError:
        return
    except OSError:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(source, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
