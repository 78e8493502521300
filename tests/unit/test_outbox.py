"""The outbox on local files: durable queue, exactly once per destination and SOP Instance UID,
backoff schedule (injected clock), restart safety (a crash before, during and after a send),
superseded results. Network senders are tested against real Orthanc in tests/integration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from node.config import Destination, OutboxSection
from node.dicom.writer import SeriesInfo, write_series
from node.export.outbox import Outbox, backoff, dicom_files
from node.export.senders import DeliveryError, Failure, FolderSender, Item
from node.jobs.store import Job, JobStore, SqliteBackend
from node.volume import Geometry, Volume

SETTINGS = OutboxSection(initial_delay_s=5, max_delay_s=60, max_attempts=6)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A sender that answers from a script (a list of per-call outcomes), then succeeds; it records
    what it was asked. With ``folder`` it really writes there (a FolderSender underneath)."""

    def __init__(self, script=(), folder: Path | None = None, present=None) -> None:
        self.script = list(script)
        self.sent: list[str] = []
        self.asked: list[str] = []
        self.deleted: list[str] = []
        self.folder = FolderSender(Destination(name="f", kind="folder", path=folder)) if folder else None
        self._present = present

    def send(self, items: list[Item]):
        self.sent.extend(i.sop_uid for i in items)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, Failure):
            return {i.sop_uid: step for i in items}
        if self.folder:
            return self.folder.send(items)
        return {i.sop_uid: None for i in items}

    def present(self, items: list[Item]):
        self.asked.extend(i.sop_uid for i in items)
        if self._present is not None:
            return self._present
        return self.folder.present(items) if self.folder else None

    def delete(self, sop_uids):
        self.deleted.extend(sop_uids)
        return list(sop_uids)

    def close(self) -> None:
        pass


def dicom_series(folder: Path, n: int = 3, seed: str = "outbox") -> list[Path]:
    array = (np.arange(n * 8 * 8).reshape(n, 8, 8) % 100).astype(np.int16)
    volume = Volume(array, Geometry(origin=(0, 0, 0), spacing=(1.0, 1.0, 2.0), direction=np.eye(3)))
    return write_series(volume, folder, SeriesInfo(uid_seed=seed))


def sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def job(job_id: str, destinations=("pacs",), series: str = "1.2.3.4", results: Path | None = None):
    return SimpleNamespace(
        id=job_id,
        destinations={d: {"state": "pending"} for d in destinations},
        series_uid=series,
        study_uid="1.2.3",
        results=str(results) if results else None,
    )


def make(tmp_path: Path, sender, *, clock=None, names=("pacs",), changes=None, **dest) -> Outbox:
    destinations = [Destination(name=n, kind="folder", path=tmp_path / "unused", **dest) for n in names]
    on_change = (lambda job_id, states: changes.append((job_id, states))) if changes is not None else None
    return Outbox(
        tmp_path / "data",
        destinations,
        SETTINGS,
        senders=lambda d: sender,
        on_change=on_change,
        clock=clock or Clock(),
    )


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    assert [backoff(n, SETTINGS) for n in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]
    assert backoff(1, OutboxSection()) == 5.0 and backoff(20, OutboxSection()) == 300.0


def test_results_are_linked_queued_and_delivered_to_a_folder(tmp_path: Path) -> None:
    results = tmp_path / "results"
    files = dicom_series(results / "dicom")
    (results / "labels.nii.gz").write_bytes(b"not dicom")
    (results / "notes.dcm").write_text("a .dcm that is not DICOM is skipped")
    changes: list = []
    clock = Clock(1000.0)
    target = tmp_path / "delivered"
    outbox = Outbox(
        tmp_path / "data",
        [Destination(name="archive", kind="folder", path=target)],
        SETTINGS,
        on_change=lambda j, s: changes.append((j, s)),
        clock=clock,
    )

    queued = outbox.enqueue_results(job("job1", ["archive"]), results)

    assert queued == {
        "archive": {
            "state": "pending",
            "instances": 3,
            "delivered": 0,
            "attempts": 0,
            "last_error": None,
            "next_attempt": 1000.0,
            "queued_at": 1000.0,
            "delivered_at": None,
        }
    }
    staged = sorted((tmp_path / "data" / "outbox").iterdir())
    assert [p.name for p in staged] == sorted(f"{sop(f)}.dcm" for f in files)
    assert all(
        p.stat().st_ino == f.stat().st_ino for p, f in zip(staged, sorted(files, key=lambda f: sop(f)))
    )
    clock.now = 1001.5
    assert outbox.run_once() == 3
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (
        target / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    ).read_bytes() == files[0].read_bytes()
    final = {
        "archive": {
            "state": "delivered",
            "instances": 3,
            "delivered": 3,
            "attempts": 1,
            "last_error": None,
            "next_attempt": None,
            "queued_at": 1000.0,
            "delivered_at": 1001.5,
        }
    }
    assert changes[-1] == ("job1", final)
    assert outbox.job_destinations("job1") == final
    assert list((tmp_path / "data" / "outbox").iterdir()) == []  # delivered everywhere: the links go
    assert outbox.run_once() == 0
    assert dicom_files(results) == sorted(files + [results / "notes.dcm"])


def test_transient_failures_follow_the_backoff_schedule_then_fail(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dicom_series(results, n=1)
    clock = Clock(1000.0)
    sender = Scripted([Failure("connection refused")] * 10)
    outbox = make(tmp_path, sender, clock=clock)
    outbox.enqueue_results(job("j"), results)

    schedule = []
    for _ in range(6):
        nxt = outbox.job_destinations("j")["pacs"]["next_attempt"]
        clock.now = nxt - 0.001
        assert outbox.run_once() == 0  # not due yet
        clock.now = nxt
        assert outbox.run_once() == 1
        schedule.append(nxt)
    assert schedule == [1000.0, 1005.0, 1015.0, 1035.0, 1075.0, 1135.0]
    state = outbox.job_destinations("j")["pacs"]
    assert state == {
        "state": "failed",
        "instances": 1,
        "delivered": 0,
        "attempts": 6,
        "last_error": "connection refused",
        "next_attempt": None,
        "queued_at": 1000.0,
        "delivered_at": None,
    }
    clock.now = 5000.0
    assert outbox.run_once() == 0 and len(sender.sent) == 6
    assert outbox.status() == [
        {
            "destination": "pacs",
            "kind": "folder",
            "pending": 0,
            "delivering": 0,
            "delivered": 0,
            "failed": 1,
            "cancelled": 0,
            "next_attempt": None,
            "last_error": "connection refused",
        }
    ]
    # `segnode outbox retry`: due again with fresh attempts; this time it goes through.
    sender.script = []
    assert outbox.retry(destination="pacs") == 1
    assert outbox.run_once() == 1
    assert outbox.job_destinations("j")["pacs"]["state"] == "delivered"


def test_a_permanent_refusal_fails_at_once_and_a_whole_batch_error_counts_for_each(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dicom_series(results, n=2)
    sender = Scripted([DeliveryError("HTTP 401 Unauthorized", permanent=True)])
    outbox = make(tmp_path, sender, names=("a",))
    outbox.enqueue_results(job("j", ["a"]), results)
    assert outbox.run_once() == 2
    assert outbox.job_destinations("j")["a"] == {
        "state": "failed",
        "instances": 2,
        "delivered": 0,
        "attempts": 1,
        "last_error": "HTTP 401 Unauthorized",
        "next_attempt": None,
        "queued_at": 1000.0,
        "delivered_at": None,
    }
    assert len(list((tmp_path / "data" / "outbox").iterdir())) == 2  # kept for a retry


def test_an_instance_is_delivered_once_per_destination_however_often_it_is_queued(tmp_path: Path) -> None:
    results = tmp_path / "results"
    files = dicom_series(results, n=2)
    sender = Scripted()
    outbox = make(tmp_path, sender, names=("a", "b"))
    outbox.enqueue_results(job("j1", ["a", "b"]), results)
    outbox.enqueue_results(job("j1", ["a", "b"]), results)  # the hook twice
    assert outbox.run_once() == 4
    outbox.enqueue_results(job("j2", ["a"]), results)  # another job with the same instances
    assert outbox.run_once() == 0
    assert sorted(sender.sent) == sorted([sop(f) for f in files] * 2)
    assert outbox.job_destinations("j2")["a"]["state"] == "delivered"


def test_queued_results_survive_a_restart(tmp_path: Path) -> None:
    results = tmp_path / "results"
    files = dicom_series(results, n=2)
    sender = Scripted([DeliveryError("connection refused")])
    clock = Clock(1000.0)
    first = make(tmp_path, sender, clock=clock)
    first.enqueue_results(job("j"), results)
    first.run_once()
    first.close()
    for f in files:  # the results folder may go; the outbox has its own links
        f.unlink()

    clock.now = 1004.0
    second = make(tmp_path, sender, clock=clock)
    assert second.recovered == 0
    assert second.run_once() == 0  # the schedule survived: next attempt at 1005
    clock.now = 1005.0
    assert second.run_once() == 2
    assert second.job_destinations("j")["pacs"]["state"] == "delivered"
    assert len(sender.sent) == 4


@pytest.mark.parametrize("reached", [True, False], ids=["send-reached-destination", "send-lost"])
def test_a_crash_during_a_send_delivers_exactly_once_after_restart(tmp_path: Path, reached: bool) -> None:
    results = tmp_path / "results"
    files = dicom_series(results, n=2)
    target = tmp_path / "pacs"

    class Killed(BaseException):
        pass

    class CrashingSender(Scripted):
        def send(self, items):
            self.sent.extend(i.sop_uid for i in items)
            if reached:
                self.folder.send(items)
            raise Killed  # the process dies before it records the outcome

    crashing = CrashingSender(folder=target)
    first = make(tmp_path, crashing)
    first.enqueue_results(job("j"), results)
    with pytest.raises(Killed):
        first.run_once()
    assert first.job_destinations("j")["pacs"]["state"] == "delivering"
    # (no close(): the process is gone)

    after = Scripted(folder=target)
    second = make(tmp_path, after)
    assert second.recovered == 2
    assert second.run_once() == 2
    uids = sorted(sop(f) for f in files)
    assert sorted(after.asked) == uids  # in doubt: the destination was asked first
    assert sorted(after.sent) == ([] if reached else uids)
    state = second.job_destinations("j")["pacs"]
    assert state["state"] == "delivered"
    delivered = sorted(p.name for p in target.rglob("*.dcm"))
    assert delivered == [f"{u}.dcm" for u in uids]


def test_an_in_doubt_delivery_is_sent_again_when_the_destination_cannot_tell(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dicom_series(results, n=1)
    clock = Clock()
    sender = Scripted(
        [Failure("read timed out")], present=None
    )  # after a timeout the request may have landed
    outbox = make(tmp_path, sender, clock=clock)
    outbox.enqueue_results(job("j"), results)
    outbox.run_once()
    clock.now += 5
    outbox.run_once()
    assert len(sender.asked) == 1 and len(sender.sent) == 2
    assert outbox.job_destinations("j")["pacs"]["state"] == "delivered"


def test_a_newer_job_cancels_undelivered_results_of_an_older_one_and_deletes_delivered_ones(
    tmp_path: Path,
) -> None:
    old, new, newest = tmp_path / "old", tmp_path / "new", tmp_path / "newest"
    dicom_series(old, n=1, seed="gen1")
    new_files = dicom_series(new, n=1, seed="gen2")
    newest_files = dicom_series(newest, n=1, seed="gen3")
    clock = Clock()
    sender = Scripted([DeliveryError("connection refused")])
    outbox = make(tmp_path, sender, clock=clock, delete_superseded=True)
    outbox.enqueue_results(job("gen1"), old)
    outbox.run_once()  # fails: gen1 waits for its retry
    clock.now += 1
    outbox.enqueue_results(job("gen2"), new)
    assert outbox.job_destinations("gen1")["pacs"]["state"] == "cancelled"
    assert outbox.job_destinations("gen1")["pacs"]["last_error"] == "superseded by job gen2"
    clock.now += 10
    outbox.run_once()
    assert sender.sent[1:] == [sop(new_files[0])]  # gen1 never again
    assert sender.deleted == []  # gen1 was never delivered: nothing to delete
    clock.now += 1
    outbox.enqueue_results(job("gen3"), newest)
    outbox.run_once()
    assert sender.sent[2:] == [sop(newest_files[0])]
    assert sender.deleted == [sop(new_files[0])]
    assert outbox.job_destinations("gen2")["pacs"]["removed_superseded"] == 1
    assert outbox.job_destinations("gen3")["pacs"]["state"] == "delivered"
    # another series is not touched
    clock.now += 1
    other = tmp_path / "other"
    dicom_series(other, n=1, seed="other")
    outbox.enqueue_results(job("x", series="9.9"), other)
    outbox.run_once()
    assert sender.deleted == [sop(new_files[0])]


def test_a_newer_job_with_the_same_instance_does_not_cancel_it(tmp_path: Path) -> None:
    results = tmp_path / "results"
    files = dicom_series(results, n=1)
    clock = Clock()
    sender = Scripted([DeliveryError("connection refused")])
    outbox = make(tmp_path, sender, clock=clock)
    outbox.enqueue_results(job("first"), results)
    outbox.run_once()
    clock.now += 1
    outbox.enqueue_results(job("again"), results)  # e.g. a rerun that reproduced the same SEG
    assert outbox.job_destinations("again")["pacs"]["state"] == "pending"
    clock.now += 10
    outbox.run_once()
    assert sender.sent == [sop(files[0])] * 2  # the failed attempt, then the delivery
    assert outbox.job_destinations("first")["pacs"]["state"] == "delivered"
    assert outbox.job_destinations("again")["pacs"]["state"] == "delivered"


def test_no_dicom_output_or_an_unknown_destination_is_shown_on_the_job(tmp_path: Path) -> None:
    empty = tmp_path / "results"
    empty.mkdir()
    (empty / "labels.nii.gz").write_bytes(b"x")
    changes: list = []
    outbox = make(tmp_path, Scripted(), changes=changes)
    outbox.enqueue_results(job("j", ["pacs", "gone"]), empty)
    assert changes == [
        (
            "j",
            {
                "pacs": {
                    "state": "skipped",
                    "instances": 0,
                    "delivered": 0,
                    "attempts": 0,
                    "last_error": "the job wrote no DICOM output to send",
                    "next_attempt": None,
                    "queued_at": None,
                    "delivered_at": None,
                },
                "gone": {
                    "state": "failed",
                    "instances": 0,
                    "delivered": 0,
                    "attempts": 0,
                    "last_error": "no destination named 'gone' in the config",
                    "next_attempt": None,
                    "queued_at": None,
                    "delivered_at": None,
                },
            },
        )
    ]
    assert outbox.enqueue_results(job("k", []), empty) == {}


def test_catch_up_queues_done_jobs_the_hook_never_saw(tmp_path: Path) -> None:
    results = tmp_path / "data" / "results" / "missed" / "run1"  # <data_dir>/results/<job>/<run>
    dicom_series(results, n=1)
    elsewhere = tmp_path / "other-machine" / "results" / "remote" / "run1"
    dicom_series(elsewhere, n=1, seed="remote")
    sender = Scripted()
    outbox = make(tmp_path, sender)
    jobs = [
        job("missed", results=results),
        job("no-results"),
        job("no-destinations", [], results=results),
        job("remote", results=elsewhere),
    ]  # a Redis worker's job on another machine: its outbox sends it
    assert outbox.catch_up(jobs) == 1
    assert outbox.catch_up(jobs) == 0
    outbox.run_once()
    assert outbox.job_destinations("missed")["pacs"]["state"] == "delivered"


def test_the_delivery_thread_sends_what_is_queued(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dicom_series(results, n=1)
    changes: list = []
    target = tmp_path / "archive"
    outbox = Outbox(
        tmp_path / "data",
        [Destination(name="archive", kind="folder", path=target)],
        OutboxSection(poll_s=30),
        on_change=lambda j, s: changes.append(s["archive"]["state"]),
    )
    outbox.start()
    try:
        outbox.enqueue_results(job("j", ["archive"]), results)
        deadline = time.monotonic() + 10
        while "delivered" not in changes and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        outbox.close()
    assert changes[-1] == "delivered"  # woken by the enqueue: within the 10 s, not after poll_s (30 s)
    assert len(list(target.rglob("*.dcm"))) == 1


def test_segnode_outbox_status_and_retry(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dicom_series(results, n=1)
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{data}"\n[[destinations]]\nname = "pacs"\nkind = "folder"\n'
        f'path = "{tmp_path / "pacs"}"\n'
    )
    store = JobStore(SqliteBackend(data / "jobs.db"))
    store.submit(
        Job(
            id="j1",
            key="k1",
            series_uid="1.2.3.4",
            study_uid="1.2.3",
            generation=1,
            folder="",
            instance_count=1,
            rule="r",
            pipeline={},
            pipeline_version="v",
            engine="threshold",
            destinations={"pacs": {"state": "pending"}},
        )
    )
    outbox = Outbox(
        data,
        [Destination(name="pacs", kind="folder", path=tmp_path / "pacs")],
        SETTINGS,
        senders=lambda d: Scripted([DeliveryError("HTTP 403 Forbidden", permanent=True)]),
    )
    outbox.enqueue_results(job("j1"), results)
    outbox.run_once()
    outbox.close()

    def segnode(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(config), "outbox", *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )

    status = segnode("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == [
        {
            "destination": "pacs",
            "kind": "folder",
            "pending": 0,
            "delivering": 0,
            "delivered": 0,
            "failed": 1,
            "cancelled": 0,
            "next_attempt": None,
            "last_error": "HTTP 403 Forbidden",
        }
    ]
    assert "HTTP 403 Forbidden" in segnode("status").stdout
    retried = segnode("retry", "--destination", "pacs")
    assert (retried.returncode, retried.stdout.strip()) == (0, "1 failed delivery queued again")
    assert store.get("j1").destinations["pacs"]["state"] == "pending"
    assert store.get("j1").destinations["pacs"]["attempts"] == 0
    assert segnode("retry").stdout.strip() == "0 failed deliveries queued again"
    store.close()


class FrozenArchive:
    """A loopback STOW-RS + QIDO-RS server whose first STOW-RS request hangs (read, held, not answered)
    until ``thaw()``; then it stores and answers, late. It counts what it was asked."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posts: list[list[str]] = []
        self.queries = 0
        self.stored: set[str] = set()
        self.frozen = threading.Event()
        self.frozen.set()
        self.holding = threading.Event()
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                from node.web.stow import split_parts

                body = self.rfile.read(int(self.headers["Content-Length"]))
                boundary = self.headers["Content-Type"].split("boundary=")[1]
                uids = [str(pydicom.dcmread(__import__("io").BytesIO(body[a:b])).SOPInstanceUID)
                        for _, a, b in split_parts(body, boundary)]
                archive.posts.append(uids)
                if archive.frozen.is_set():
                    archive.holding.set()
                    while archive.frozen.is_set():
                        time.sleep(0.02)
                archive.stored.update(uids)
                self._json(200, {"00081199": {"vr": "SQ", "Value": [
                    {"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}})

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlparse

                archive.queries += 1
                uid = parse_qs(urlparse(self.path).query).get("SOPInstanceUID", [""])[0]
                if uid in archive.stored:
                    self._json(200, [{"00080018": {"vr": "UI", "Value": [uid]}}])
                else:
                    self._json(200, [])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicomweb"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def thaw(self) -> None:
        self.frozen.clear()

    def close(self) -> None:
        self.thaw()
        self.server.shutdown()
        self.server.server_close()


def test_a_late_answer_from_a_frozen_archive_is_awaited_not_sent_twice(tmp_path: Path) -> None:
    """STOW-RS times out while the archive is frozen, not down: the next attempts neither look the SEG
    up nor send it again while that request is open; its late answer delivers it, with one POST."""
    archive = FrozenArchive()
    results = tmp_path / "results"
    (uid,) = [sop(f) for f in dicom_series(results, n=1)]
    clock = Clock(1000.0)
    settings = OutboxSection(initial_delay_s=5, max_delay_s=60, max_attempts=6, timeout_s=0.5)
    outbox = Outbox(tmp_path / "data", [Destination(name="pacs", kind="stowrs", url=archive.url)], settings,
                    clock=clock)
    try:
        outbox.enqueue_results(job("job1"), results)
        assert outbox.run_once() == 1  # the request hangs; after 0.5 s: failed attempt, in doubt
        state = outbox.job_destinations("job1")["pacs"]
        assert (state["state"], state["attempts"]) == ("pending", 1) and "stays open" in state["last_error"]
        clock.now += 10
        assert outbox.run_once() == 1  # still frozen: no QIDO-RS, no second POST
        assert (archive.posts, archive.queries) == ([[uid]], 0)
        assert "has had no answer" in outbox.job_destinations("job1")["pacs"]["last_error"]
        archive.thaw()  # the held request is stored now and answered, late
        clock.now += 20
        assert outbox.run_once() == 1
        state = outbox.job_destinations("job1")["pacs"]
        assert (state["state"], archive.posts, archive.queries) == ("delivered", [[uid]], 0)
    finally:
        outbox.close()
        archive.close()
