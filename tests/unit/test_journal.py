"""The ingest journal (node/ingest/journal.py) behind the spool: what a crash may and may not bring back.

A crash is a child process that stores instances and then SIGKILLs itself; a power loss that took the
page cache with it is the parent deleting the spool files the child wrote (they were never fsynced:
only their journal records were).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node.ingest import journal as journal_module
from node.ingest.instance import Status, encode_instance
from node.ingest.spool import Spool
from tests.unit.test_series import ramp_volume
from tests.unit.test_spool import SENDER, datasets, part10, spool_files

REPO = Path(__file__).resolve().parents[2]

_CRASH = """
import os, pickle, signal, sys
from pathlib import Path
from node.ingest import Sender, journal
from node.ingest.spool import Spool
journal.IDLE_SECONDS = 3600.0  # no idle checkpoint before the kill, however slow this machine is
steps = pickle.loads(Path(sys.argv[2]).read_bytes())
spool = Spool(Path(sys.argv[1]), journal_mb=int(sys.argv[3]))
for action, value in steps:
    if action == "store":
        assert spool.store(value, Sender("dimse", "MODALITY", "10.0.0.7"), session="s").ok
    elif action == "remove":
        spool.remove_series(value)
    elif action == "append":  # a record no spool would write
        spool._journal.written(spool._journal.append(value, [b"not DICOM"]))
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash_after(data: Path, steps: list[tuple[str, object]], journal_mb: int = 8) -> None:
    """Run ``steps`` in a child process on a spool in ``data``, which then dies by SIGKILL."""
    script = data.parent / "steps.pickle"
    script.write_bytes(pickle.dumps(steps))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", _CRASH, str(data), str(script), str(journal_mb)]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == -9, done.stderr


def lose_files(paths: list[Path]) -> dict[Path, bytes]:
    """The power loss: files written but never fsynced are gone. Returns what they held."""
    held = {p: p.read_bytes() for p in paths}
    for p in paths:
        p.unlink()
    return held


def test_acknowledged_instances_come_back_byte_for_byte_after_a_power_loss(tmp_path: Path) -> None:
    data = tmp_path / "data"
    series = datasets(6)
    crash_after(data, [("store", part10(ds)) for ds in series])
    spool = Spool(data, fsync=False)  # only to find the files: no journal replayed here
    paths = [spool.instance(ds.SOPInstanceUID).path for ds in series]
    spool.close()
    held = lose_files(paths)

    spool = Spool(data, journal_mb=8)  # the start after the crash replays the journal
    assert {p: p.read_bytes() for p in paths} == held
    assert spool.reconcile()["added"] == 0  # the index kept its rows: the files are back under them
    assert [r.path for r in spool.instances(series[0].SeriesInstanceUID)] == paths
    assert list(data.rglob("*.tmp")) == []
    spool.close()


def test_the_last_copy_of_an_instance_sent_twice_is_the_one_replayed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = datasets(1)[0]
    second = datasets(1)[0]  # the same SOP Instance UID, other pixels
    second.PixelData = bytes(len(first.PixelData))
    crash_after(data, [("store", part10(first)), ("store", part10(second))])
    [path] = (data / "spool").rglob("*.dcm")
    held = lose_files([path])
    Spool(data, journal_mb=8).close()
    assert path.read_bytes() == held[path] and path.read_bytes().endswith(second.PixelData)


def test_a_clean_close_leaves_nothing_to_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data", journal_mb=8)
    stored = spool.store(part10(datasets(1)[0]), SENDER, session="s")
    spool.close()  # checkpoint: the file is fsynced by itself, the journal emptied
    stored.path.unlink()  # deleted by hand afterwards: the journal must not bring it back
    spool = Spool(tmp_path / "data", journal_mb=8)
    assert not stored.path.exists()
    segments = sorted((tmp_path / "data" / "journal").glob("segment-*.log"))
    assert [p.stat().st_size for p in segments] == [1 << 20] * 8
    spool.close()


def test_a_deleted_series_does_not_come_back(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gone, kept = datasets(3, seed="gone"), datasets(3, seed="kept")
    steps = [("store", part10(ds)) for ds in gone]
    steps += [("remove", gone[0].SeriesInstanceUID)] + [("store", part10(ds)) for ds in kept]
    crash_after(data, steps)
    kept_paths = sorted(p for p in (data / "spool").rglob("*.dcm"))
    assert len(kept_paths) == 3 and all(kept[0].SeriesInstanceUID in str(p) for p in kept_paths)
    held = lose_files(kept_paths)
    spool = Spool(data, journal_mb=8)
    assert sorted((data / "spool").rglob("*.dcm")) == kept_paths  # the removed series stays removed
    assert {p: p.read_bytes() for p in kept_paths} == held
    spool.close()


def test_a_torn_record_and_what_follows_it_are_not_replayed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    series = datasets(3)
    crash_after(data, [("store", part10(ds)) for ds in series])
    files = {ds.SOPInstanceUID: next((data / "spool").rglob(f"{ds.SOPInstanceUID}.dcm")) for ds in series}
    # Find the second record (in the segment in use: the one whose first record names our file)
    # and flip a byte of its payload: as if the crash came while it was being written.
    first_file = files[series[0].SOPInstanceUID]
    first_path = str(first_file.relative_to(data / "spool"))
    segments = (data / "journal").glob("segment-*.log")
    segment = next(p for p in segments if first_path.encode() in p.read_bytes()[:8192])
    first = journal_module._RECORD.size + len(first_path) + first_file.stat().st_size
    offset = journal_module._HEADER_BYTES + journal_module._aligned(first)
    raw = bytearray(segment.read_bytes())
    raw[offset + journal_module._RECORD.size + 200] ^= 0xFF
    segment.write_bytes(bytes(raw))
    held = lose_files(list(files.values()))

    spool = Spool(data, journal_mb=8)
    restored = sorted(uid for uid, p in files.items() if p.exists())
    assert restored == [series[0].SOPInstanceUID]  # the scan stops at the torn record
    assert first_file.read_bytes() == held[first_file]
    spool.close()


def test_a_record_that_names_no_spool_path_is_skipped(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    crash_after(data, [("append", "../../outside.dcm"), ("append", "1.2/3.4/not-a-uid.dcm")])
    spool = Spool(data, journal_mb=8)
    assert not (tmp_path / "outside.dcm").exists() and spool_files(spool) == []
    assert caplog.text.count("is not a spool path; skipped") == 2
    spool.close()


def test_segments_are_retired_and_reused_when_the_journal_wraps(tmp_path: Path) -> None:
    # 1 MiB segments hold ~28 records of these 32 KiB slices: 300 slices go round the 8 segments
    # more than once, so writers wait for the retirer to fsync files and re-arm segments.
    from node.dicom.writer import SeriesInfo, series_datasets

    series = series_datasets(ramp_volume(shape=(300, 128, 128)), SeriesInfo(uid_seed="wrap"))
    spool = Spool(tmp_path / "data", journal_mb=8)
    results = [spool.store(part10(ds), SENDER, session="s") for ds in series]
    assert all(r.ok for r in results)
    # ~11 segments' worth of records: at least 3 segments were retired and armed again (seq 1-8 at
    # the start, one more per arming).
    assert spool._journal._next_seq >= 9 + 3
    spool.close()
    assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == 300
    for ds, result in zip(series[::37], results[::37], strict=True):
        stored = result.path.read_bytes()
        assert encode_instance(stored).info.sop_instance_uid == ds.SOPInstanceUID
        assert stored.endswith(ds.PixelData)


def test_concurrent_stores_share_flushes_and_all_arrive(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path / "data", journal_mb=8)
    series = [datasets(25, seed=f"thread{i}") for i in range(8)]
    flushes: list[int] = []
    fdatasync = journal_module._fdatasync
    monkeypatch.setattr(journal_module, "_fdatasync", lambda fd: (flushes.append(fd), fdatasync(fd)))
    failures: list[object] = []

    def send(items) -> None:
        for ds in items:
            result = spool.store(part10(ds), SENDER, session="s")
            if not result.ok:
                failures.append(result)

    threads = [threading.Thread(target=send, args=(items,)) for items in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(spool_files(spool)) == 200
    assert 1 <= len(flushes) <= 200  # group commit: never more than one flush per record
    spool.close()


def test_a_second_spool_on_the_same_folder_fsyncs_each_file(tmp_path: Path, monkeypatch, caplog) -> None:
    first = Spool(tmp_path / "data", journal_mb=8)
    second = Spool(tmp_path / "data", journal_mb=8)
    assert "is in use by another spool" in caplog.text
    one, two = datasets(2)
    assert second.store(part10(one), SENDER, session="s").ok  # folders made
    events: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd)))
    assert second.store(part10(two), SENDER, session="s").ok
    assert events == ["fsync", "fsync"]  # the file, then its folder
    second.close()
    first.close()


def test_an_instance_larger_than_a_record_is_fsynced_by_itself(tmp_path: Path, monkeypatch) -> None:
    from node.dicom.writer import SeriesInfo, series_datasets

    big = series_datasets(ramp_volume(shape=(1, 512, 512)), SeriesInfo(uid_seed="big"))[0]  # 512 KiB
    spool = Spool(tmp_path / "data", journal_mb=8)  # 1 MiB segments take records up to ~0.5 MiB
    assert len(big.PixelData) > spool._journal.max_payload
    assert spool.store(part10(datasets(1)[0]), SENDER, session="s").ok  # folders made
    events: list[str] = []
    fsync, fdatasync = os.fsync, journal_module._fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd)))
    monkeypatch.setattr(journal_module, "_fdatasync", lambda fd: (events.append("fdatasync"), fdatasync(fd)))
    assert spool.store(part10(big), SENDER, session="s").ok
    assert events[-2:] == ["fsync", "fsync"] and "fdatasync" not in events
    spool.close()


def test_a_journal_write_error_refuses_the_instance_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path / "data", journal_mb=8)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.os, "pwrite", full)
    result = spool.store(part10(datasets(1)[0]), SENDER, session="s")
    assert result.status == Status.OUT_OF_RESOURCES and "No space left" in result.reason
    assert spool_files(spool) == []
    monkeypatch.undo()
    spool.close()


def test_a_file_that_cannot_be_written_after_the_ack_is_written_from_its_record(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    spool = Spool(tmp_path / "data", journal_mb=8)
    ds = datasets(1)[0]

    def full(fd, buffers):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    result = spool.store(part10(ds), SENDER, session="s")
    assert result.ok and not result.path.exists()  # durable in the journal: the sender heard success
    assert "the journal writes it from its record later" in caplog.text
    monkeypatch.undo()
    spool.close()  # the last checkpoint retires the segment: the file is written from the record first
    assert result.path.read_bytes().endswith(ds.PixelData)


def test_when_segments_cannot_be_retired_stores_are_refused_until_they_can(
    tmp_path: Path, monkeypatch
) -> None:
    from node.dicom.writer import SeriesInfo, series_datasets

    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.1)
    series = series_datasets(ramp_volume(shape=(300, 128, 128)), SeriesInfo(uid_seed="stuck"))
    spool = Spool(tmp_path / "data", journal_mb=8)  # ~28 of these slices per segment, 8 segments
    broken = journal_module.Journal._make_durable

    def failing(self, relatives):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module.Journal, "_make_durable", failing)
    results = [spool.store(part10(ds), SENDER, session="s") for ds in series[:250]]
    refused = [r for r in results if not r.ok]
    assert 150 < results.index(refused[0]) < 250  # the journal filled up: no wait without end
    reason = "spool cannot be written: journal cannot retire segments: [Errno 5] Input/output error"
    assert {(r.status, r.reason) for r in refused} == {(Status.OUT_OF_RESOURCES, reason)}
    assert spool.problem() == "spool journal cannot retire segments: [Errno 5] Input/output error"
    monkeypatch.setattr(journal_module.Journal, "_make_durable", broken)  # the disk is back
    deadline = time.monotonic() + 10  # the retirer tries again after RETRY_SECONDS
    while not spool.store(part10(series[250]), SENDER, session="s").ok:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert all(spool.store(part10(ds), SENDER, session="s").ok for ds in series[251:])
    assert spool.problem() is None
    spool.close()


@pytest.mark.parametrize("size", [0, 1 << 20, 3 << 20])
def test_segments_of_another_size_are_made_anew(tmp_path: Path, size: int) -> None:
    folder = tmp_path / "data" / "journal"
    folder.mkdir(parents=True)
    (folder / "segment-00.log").write_bytes(bytes(size))
    spool = Spool(tmp_path / "data", journal_mb=16)  # 2 MiB segments
    assert sorted(p.stat().st_size for p in folder.glob("segment-*.log")) == [2 << 20] * 8
    spool.close()
