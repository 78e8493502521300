"""The spool: every received instance, on disk before it is acknowledged, and a small index of them.

Layout: ``<data_dir>/spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (UIDs validated, so never
a path trick), ``<data_dir>/spool/index.sqlite`` and ``<data_dir>/journal/``. Files are the
truth: each is written to a temporary name and renamed into place, and before :meth:`Spool.store`
returns success it is durable (so a C-STORE success status means the instance survives a crash or
power loss): recorded in the ingest journal (:mod:`node.ingest.journal`, one data flush; the file is
fsynced later in the background, and rewritten from the journal after a crash), or, without a
journal, fsynced with its folder. The index is a rebuildable cache (SQLite WAL, no fsync);
:meth:`Spool.reconcile` brings it back in line with the files at every start.

Every receiver calls :meth:`Spool.store` (through :class:`node.ingest.receiver.Receiver`, which
adds series completion): the C-STORE SCP, the STOW-RS route, a file import.

Two hooks let the C-STORE SCP keep work off the time a sender waits for its status, without moving
the acknowledgement before the instance is durable: :meth:`Spool.reserve` makes the next temporary
file while the association waits for the next instance, and ``on_durable`` answers as soon as the
instance is durable, before the file (with a journal) and the index are written.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.ingest import Sender
from node.ingest.instance import Encoded, InstanceInfo, Refused, Status, encode_instance, valid_uid
from node.ingest.journal import Journal, JournalBusy

log = logging.getLogger(__name__)

#: ``spool/index.sqlite``, derived from the spool's files. 0: segnode 0.1.0 (unversioned); 1: the same
#: table, versioned (0 is stamped 1). A newer release's index is rebuilt from the files, not read.
INDEX_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    modality TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    instance_number INTEGER,
    acquisition_number INTEGER,
    position TEXT,
    orientation TEXT,
    images_in_acquisition INTEGER,
    number_of_frames INTEGER NOT NULL,
    is_image INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    via TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    address TEXT NOT NULL,
    session TEXT NOT NULL,
    received REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0  -- the SeriesReady generation it was handed on in; 0 = not yet
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
"""
_COLUMNS = (
    "sop_uid, study_uid, series_uid, sop_class, modality, transfer_syntax, instance_number, "
    "acquisition_number, position, orientation, images_in_acquisition, number_of_frames, is_image, "
    "path, size, via, calling_aet, address, session, received, generation"
)
_UPSERT = f"""
INSERT INTO instances ({_COLUMNS}) VALUES ({", ".join("?" * 21)})
ON CONFLICT (sop_uid) DO UPDATE SET
    study_uid = excluded.study_uid, series_uid = excluded.series_uid, sop_class = excluded.sop_class,
    modality = excluded.modality, transfer_syntax = excluded.transfer_syntax,
    instance_number = excluded.instance_number, acquisition_number = excluded.acquisition_number,
    position = excluded.position, orientation = excluded.orientation,
    images_in_acquisition = excluded.images_in_acquisition, number_of_frames = excluded.number_of_frames,
    is_image = excluded.is_image, path = excluded.path, size = excluded.size, via = excluded.via,
    calling_aet = excluded.calling_aet, address = excluded.address, session = excluded.session,
    received = excluded.received
"""
_TEMP_SUFFIX = ".tmp"
#: The ingest journal is this many segment files of ``journal_mb / JOURNAL_SEGMENTS`` each.
JOURNAL_SEGMENTS = 8
_counter = itertools.count()


@dataclass(frozen=True)
class StoreResult:
    """What became of one instance; ``status`` is the C-STORE status to answer (PS3.4 B.2.3).

    The STOW-RS route answers a failure with the same code as FailureReason (0008,1197), PS3.18 10.5.
    """

    status: int
    reason: str = ""
    info: InstanceInfo | None = None
    path: Path | None = None
    #: The same SOP Instance UID was already in the spool (the file is replaced, nothing else changes).
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


@dataclass(frozen=True)
class SpooledInstance:
    """One row of the index."""

    info: InstanceInfo
    path: Path
    sender: Sender
    session: str
    received: float
    generation: int


def _text(values: tuple[float, ...] | None) -> str | None:
    return None if values is None else "\\".join(repr(v) for v in values)


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(v) for v in text.split("\\"))


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TempFile:
    """A new, empty temporary file in a series folder, both open by descriptor: the file is written,
    fsynced, renamed and the folder fsynced through these, so all act on the same folder."""

    def __init__(self, study_uid: str, series_uid: str, dir_fd: int, fd: int, name: str) -> None:
        self.series = (study_uid, series_uid)
        self.dir_fd, self.fd, self.name = dir_fd, fd, name

    def take(self) -> tuple[int, int, str]:
        """Hand the descriptors over to the caller, who closes them."""
        taken = (self.dir_fd, self.fd, self.name)
        self.dir_fd = self.fd = -1
        return taken

    def discard(self) -> None:
        """Close and delete the file (not used after all); nothing when it was taken."""
        if self.fd < 0:
            return
        dir_fd, fd, name = self.take()
        os.close(fd)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        os.close(dir_fd)


class Spool:
    """Durable per-series storage of received instances (thread-safe: one per process and folder)."""

    def __init__(
        self, data_dir: Path, *, fsync: bool = True, min_free_mb: int = 0, journal_mb: int = 512
    ) -> None:
        """``fsync`` false keeps nothing durable (tests, benchmarks); ``journal_mb`` is the ingest
        journal's size (0: fsync each file and its folder instead)."""
        self.root = Path(data_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self._lock = threading.Lock()
        self._root = str(self.root)
        #: Series folders known to exist (paths as strings: no pathlib on the per-instance path).
        self._dirs: set[str] = set()
        self._free, self._checked, self._written = 0, -1e9, 0
        self._db = self._open_index()
        self._journal = self._open_journal(journal_mb) if fsync and journal_mb else None

    def _open_journal(self, size_mb: int) -> Journal | None:
        segment_bytes = max((size_mb << 20) // JOURNAL_SEGMENTS, 1 << 20)  # whole 128 KiB: whole blocks
        try:
            journal = Journal(self.root.parent / "journal", self.root, segment_bytes=segment_bytes,
                              segments=JOURNAL_SEGMENTS)  # fmt: skip
        except JournalBusy as exc:
            log.warning("%s: this spool fsyncs each file instead", exc)
            return None
        journal.recover(self._restore)
        return journal

    def _restore(self, relative: str, payload: memoryview) -> str | None:
        """Write one file the journal replays (not fsynced: the journal does that), or refuse it."""
        parts = relative.split("/")
        names = (*parts[:2], parts[-1].removesuffix(".dcm"))
        if not (len(parts) == 3 and parts[2].endswith(".dcm") and all(map(valid_uid, names))):
            log.warning("journal record for %r is not a spool path; skipped", relative)
            return None
        folder = f"{self._root}/{parts[0]}/{parts[1]}"
        self._ensure_dir(folder)
        temp = f"{folder}/.restore{_TEMP_SUFFIX}"
        with open(temp, "wb") as out:
            out.write(payload)
        os.replace(temp, f"{self._root}/{relative}")
        return relative

    def _open_index(self) -> sqlite3.Connection:
        path = self.root / "index.sqlite"
        for attempt in range(2):
            try:
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                # The files are the truth and reconcile() rebuilds the index, so no fsync here.
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=OFF")
                found = db.execute("PRAGMA user_version").fetchone()[0]
                if found > INDEX_VERSION:
                    # A derived store: a newer release's index is not read but rebuilt from the files.
                    db.close()
                    log.info("spool index %s has schema version %d, this release writes %d; rebuilding it "
                             "from the files", path, found, INDEX_VERSION)
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
                    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=OFF")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
                return db
            except sqlite3.DatabaseError as exc:
                if attempt:
                    raise
                log.warning("spool index %s is damaged (%s); rebuilding it from the files", path, exc)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def problem(self) -> str | None:
        """What keeps the spool from storing right now, for ``/healthz``; None when nothing does."""
        journal = self._journal
        return None if journal is None or journal.problem is None else f"spool {journal.problem}"

    def close(self) -> None:
        """Make every file durable by itself (journal checkpoint) and close the index."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        with self._lock:
            self._db.close()

    # --- writing ---------------------------------------------------------------------------

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        """Where a series' files live (both UIDs must be valid UIDs)."""
        if not (valid_uid(study_uid) and valid_uid(series_uid)):
            raise ValueError("study and series UIDs must be valid UIDs")
        return self.root / study_uid / series_uid

    def store(
        self,
        dataset: bytes | bytearray | memoryview,
        sender: Sender,
        *,
        transfer_syntax: str | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        session: str = "",
        reserved: TempFile | None = None,
        on_durable: Callable[[StoreResult], None] | None = None,
    ) -> StoreResult:
        """Check one instance and write it durably; never raises for bad input or a full disk.

        ``dataset`` is a Part 10 file (STOW-RS part, file import: leave ``transfer_syntax`` None) or
        a bare dataset as C-STORE carries it (give its ``transfer_syntax``). ``sop_class_uid`` and
        ``sop_instance_uid`` are what a C-STORE request announced. ``session`` names the association
        or request that brought it (for completion and the index).

        ``reserved`` (from :meth:`reserve`) is used when it lies in the instance's series folder and
        deleted otherwise. ``on_durable(result)`` is called once the file and its folder are fsynced,
        before the index is updated (``result.duplicate`` is not known yet); it must not raise.
        """
        try:
            encoded = encode_instance(
                dataset,
                transfer_syntax,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                source_aet=sender.calling_aet,
            )
        except Refused as exc:
            if reserved is not None:
                reserved.discard()
            return StoreResult(int(exc.status), exc.message)
        try:
            return self._write(encoded, sender, session, reserved, on_durable)
        except OSError as exc:
            log.error("spool write failed for series %s: %s", encoded.info.series_uid, exc)
            return StoreResult(int(Status.OUT_OF_RESOURCES), f"spool cannot be written: {exc}", encoded.info)
        except sqlite3.Error as exc:
            log.error("spool index write failed for series %s: %s", encoded.info.series_uid, exc)
            reason = f"spool index cannot be written: {exc}"
            return StoreResult(int(Status.OUT_OF_RESOURCES), reason, encoded.info)
        finally:
            if reserved is not None:
                reserved.discard()  # nothing to do when _write took it

    def reserve(self, study_uid: str, series_uid: str) -> TempFile | None:
        """A temporary file made ahead of time in a series folder, for the next :meth:`store` there
        (the SCP makes it while it waits for the next instance: creating a file costs ~0.1 ms).
        None when the UIDs are not valid or the folder cannot be made."""
        if not (valid_uid(study_uid) and valid_uid(series_uid)):
            return None
        try:
            return self._create_temp(study_uid, series_uid, "next")
        except OSError:
            return None

    def _ensure_dir(self, folder: str) -> None:
        if folder in self._dirs:
            return
        parent = os.path.dirname(folder)
        created = [p for p in (parent, folder) if not os.path.isdir(p)]
        os.makedirs(folder, exist_ok=True)
        if self.fsync:
            for new in created:  # make the new folder entries themselves durable
                _fsync_dir(os.path.dirname(new))
        self._dirs.add(folder)

    def _create_temp(self, study_uid: str, series_uid: str, stem: str) -> TempFile:
        """A new temporary file in the series folder (UIDs already validated), made if missing."""
        folder = f"{self._root}/{study_uid}/{series_uid}"
        name = f".{stem}.{os.getpid()}.{next(_counter)}{_TEMP_SUFFIX}"
        for attempt in range(2):
            self._ensure_dir(folder)
            dir_fd = -1
            try:
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dir_fd)
                return TempFile(study_uid, series_uid, dir_fd, fd, name)
            except FileNotFoundError:
                if dir_fd >= 0:
                    os.close(dir_fd)
                if attempt:
                    raise
                self._dirs.discard(folder)  # removed (retention) since it was made: make it again
            except BaseException:
                if dir_fd >= 0:
                    os.close(dir_fd)
                raise
        raise AssertionError("unreachable")

    def _space_left(self, size: int) -> bool:
        """False when the disk would keep less than ``min_free_mb``; asks the OS at most once a second
        or after writing half the margin (statvfs costs ~0.2 ms, more than the rest of a store)."""
        if not self.min_free_bytes:
            return True
        now = time.monotonic()
        with self._lock:
            self._written += size
            if now - self._checked > 1.0 or self._written > self.min_free_bytes // 2:
                self._free, self._checked, self._written = shutil.disk_usage(self.root).free, now, size
            return self._free - self._written >= self.min_free_bytes

    def _write(
        self,
        encoded: Encoded,
        sender: Sender,
        session: str,
        reserved: TempFile | None,
        on_durable: Callable[[StoreResult], None] | None,
    ) -> StoreResult:
        info = encoded.info
        size = len(encoded.meta) + len(encoded.body)
        if reserved is not None and (
            reserved.series != (info.study_uid, info.series_uid) or os.fstat(reserved.dir_fd).st_nlink == 0
        ):  # another series, or its folder was removed (retention) meanwhile
            reserved.discard()
            reserved = None
        if not self._space_left(size):
            if reserved is not None:
                reserved.discard()
            reason = f"less than {self.min_free_bytes >> 20} MB free in the spool"
            return StoreResult(int(Status.OUT_OF_RESOURCES), reason, info)
        relative = f"{info.study_uid}/{info.series_uid}/{info.sop_instance_uid}.dcm"
        path = Path(self._root, relative)
        durable = StoreResult(int(Status.SUCCESS), "", info, path)
        journal = self._journal if self._journal is not None and size <= self._journal.max_payload else None
        if journal is None:
            self._write_file(encoded, reserved, sync=self.fsync)
            self._announce(durable, on_durable)
        else:
            # One flush of the journal record makes it durable: the sender hears success while the
            # file is written (to the page cache; the journal fsyncs it later).
            record = journal.append(relative, [encoded.meta, encoded.body])
            self._announce(durable, on_durable)
            try:
                self._write_file(encoded, reserved, sync=False)
            except OSError as exc:
                journal.written(record, ok=False)
                log.error("spool file for series %s not written (%s); the journal writes it from its "
                          "record later", info.series_uid, exc)  # fmt: skip
                return durable
            journal.written(record)
        row = (
            info.sop_instance_uid, info.study_uid, info.series_uid, info.sop_class_uid, info.modality,
            info.transfer_syntax, info.instance_number, info.acquisition_number, _text(info.position),
            _text(info.orientation), info.images_in_acquisition, info.number_of_frames, int(info.is_image),
            relative, size, sender.via, sender.calling_aet, sender.address, session, time.time(), 0,
        )  # fmt: skip
        with self._lock:
            old = self._db.execute(
                "SELECT path FROM instances WHERE sop_uid = ?", (info.sop_instance_uid,)
            ).fetchone()
            self._db.execute(_UPSERT, row)
        if old and old[0] != relative:
            # The same instance now claims another study/series: keep only the newest copy.
            if self._journal is not None:
                self._journal.checkpoint()  # a replay must not bring the old copy back
            try:
                os.unlink(f"{self._root}/{old[0]}")
            except FileNotFoundError:
                pass
        return StoreResult(int(Status.SUCCESS), "", info, path, duplicate=old is not None)

    def _write_file(self, encoded: Encoded, reserved: TempFile | None, *, sync: bool) -> None:
        """Temp file, [fsync], rename, [fsync of the folder: the rename itself is durable]."""
        info = encoded.info
        if reserved is None:
            reserved = self._create_temp(info.study_uid, info.series_uid, info.sop_instance_uid)
        dir_fd, fd, temp = reserved.take()
        size = len(encoded.meta) + len(encoded.body)
        try:
            try:
                written = os.writev(fd, [encoded.meta, encoded.body])
                if written != size:
                    raise OSError(f"short write ({written} bytes)")
                if sync:
                    os.fsync(fd)
            except BaseException:
                os.unlink(temp, dir_fd=dir_fd)
                raise
            finally:
                os.close(fd)
            os.replace(temp, f"{info.sop_instance_uid}.dcm", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            if sync:
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _announce(durable: StoreResult, on_durable: Callable[[StoreResult], None] | None) -> None:
        if on_durable is not None:
            try:
                on_durable(durable)
            except Exception:
                log.exception("on_durable failed for series %s", durable.info.series_uid)

    # --- reading ---------------------------------------------------------------------------

    def _rows(self, where: str, args: tuple) -> list[SpooledInstance]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE {where}", args).fetchall()
        return [self._row(r) for r in rows]

    def _row(self, r: tuple) -> SpooledInstance:
        return SpooledInstance(
            info=InstanceInfo(
                sop_instance_uid=r[0], study_uid=r[1], series_uid=r[2], sop_class_uid=r[3], modality=r[4],
                transfer_syntax=r[5], instance_number=r[6], acquisition_number=r[7],
                position=_floats(r[8]), orientation=_floats(r[9]),  # type: ignore[arg-type]
                images_in_acquisition=r[10], number_of_frames=r[11], is_image=bool(r[12]),
            ),
            path=self.root / r[13],
            sender=Sender(r[15], r[16], r[17]),  # type: ignore[arg-type]
            session=r[18],
            received=r[19],
            generation=r[20],
        )  # fmt: skip

    def instances(self, series_uid: str) -> list[SpooledInstance]:
        """The indexed instances of one series, in arrival order."""
        return self._rows("series_uid = ? ORDER BY rowid", (series_uid,))

    def instance(self, sop_instance_uid: str) -> SpooledInstance | None:
        rows = self._rows("sop_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def series_uids(self, *, pending_only: bool = False) -> list[str]:
        """Every series in the index, or only those with instances not yet handed on."""
        where = " WHERE generation = 0" if pending_only else ""
        with self._lock:
            rows = self._db.execute(f"SELECT DISTINCT series_uid FROM instances{where}").fetchall()
        return [r[0] for r in rows]

    def mark_handed(self, series_uid: str, generation: int, sop_instance_uids: list[str]) -> None:
        """Record that these instances went out in SeriesReady ``generation`` (survives restarts)."""
        with self._lock:
            self._db.executemany(
                "UPDATE instances SET generation = ? WHERE sop_uid = ? AND series_uid = ?",
                [(generation, uid, series_uid) for uid in sop_instance_uids],
            )

    # --- upkeep ----------------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """Bring the index in line with the files (run at start): the files are the truth.

        Leftover temporary files (never acknowledged) are deleted, files missing from the index are
        read and added as not yet handed on, index rows without a file are dropped.
        """
        with self._lock:
            known = dict(self._db.execute("SELECT path, sop_uid FROM instances").fetchall())
        counts = {"added": 0, "dropped": 0, "temp_removed": 0, "unreadable": 0}
        seen: set[str] = set()
        for study in (p for p in self.root.iterdir() if p.is_dir()):
            for folder in (p for p in study.iterdir() if p.is_dir()):
                for file in folder.iterdir():
                    relative = str(file.relative_to(self.root))
                    if file.name.endswith(_TEMP_SUFFIX):
                        file.unlink(missing_ok=True)
                        counts["temp_removed"] += 1
                    elif relative in known:
                        seen.add(relative)
                    elif file.suffix == ".dcm":
                        result = self._adopt(file)
                        counts["added" if result else "unreadable"] += 1
        gone = [(known[p],) for p in known if p not in seen]
        if gone:
            with self._lock:
                self._db.executemany("DELETE FROM instances WHERE sop_uid = ?", gone)
        counts["dropped"] = len(gone)
        if any(counts.values()):
            log.info("spool reconciled: %s", counts)
        return counts

    def _adopt(self, file: Path) -> bool:
        """Index a file found on disk without a row (written, then the process died before indexing)."""
        try:
            encoded = encode_instance(file.read_bytes())
        except (Refused, OSError) as exc:
            log.warning("spool file %s cannot be indexed: %s", file, exc)
            return False
        info = encoded.info
        if file != self.series_folder(info.study_uid, info.series_uid) / f"{info.sop_instance_uid}.dcm":
            log.warning("spool file %s is not where its UIDs say it belongs; left alone", file)
            return False
        row = (
            info.sop_instance_uid, info.study_uid, info.series_uid, info.sop_class_uid, info.modality,
            info.transfer_syntax, info.instance_number, info.acquisition_number, _text(info.position),
            _text(info.orientation), info.images_in_acquisition, info.number_of_frames, int(info.is_image),
            str(file.relative_to(self.root)), file.stat().st_size, "file", "", "", "recovered",
            file.stat().st_mtime, 0,
        )  # fmt: skip
        with self._lock:
            self._db.execute(_UPSERT, row)
        return True

    def remove_series(self, series_uid: str) -> int:
        """Delete a series' folder and index rows (after success, or by retention); returns files removed."""
        instances = self.instances(series_uid)
        if not instances:
            return 0
        folder = self.series_folder(instances[0].info.study_uid, series_uid)
        if self._journal is not None:
            self._journal.checkpoint()  # a replay must not bring deleted files back
        count = sum(1 for _ in folder.glob("*.dcm")) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        self._dirs.discard(str(folder))
        try:
            folder.parent.rmdir()  # the study folder, once its last series is gone
        except OSError:
            pass
        with self._lock:
            self._db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
        return count


def purge_older_than(
    spool: Spool, days: float, *, now: float | None = None, handed_only: bool = True
) -> list[str]:
    """Retention: remove series whose newest instance arrived more than ``days`` ago.

    With ``handed_only`` (default) a series that still has instances not handed on is kept.
    Returns the series UIDs removed.
    """
    cutoff = (time.time() if now is None else now) - days * 86400
    with spool._lock:
        rows = spool._db.execute(
            "SELECT series_uid, MAX(received), MIN(generation) FROM instances GROUP BY series_uid"
        ).fetchall()
    removed = []
    for series_uid, newest, lowest_generation in rows:
        if newest < cutoff and (lowest_generation > 0 or not handed_only):
            spool.remove_series(series_uid)
            removed.append(series_uid)
    return removed
