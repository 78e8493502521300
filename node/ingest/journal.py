"""The ingest journal: one data flush per received instance instead of two file-system commits.

A spool file is durable only after ``fsync(file)`` and ``fsync(folder)`` (the rename), and on ext4
each is a journal commit with its own cache flush. The journal makes the acknowledgement cheaper
without weakening it. Each instance is first appended to a segment file whose blocks were all
written (zeros) and flushed when it was made, with direct I/O, so the ``fdatasync`` that follows has
no metadata to commit and flushes only the new bytes. The sender hears success then; the spool file
is written (temp, rename, no fsync) after that. A background retirer fsyncs the files of full
segments and their folders and then re-arms the segments for reuse: once half of them are full, and
all of them after :data:`IDLE_SECONDS` without a new record (during a burst the disk serves the
acknowledgements). After a crash, :meth:`Journal.recover` rewrites every file whose record is still
in an armed segment, so what was acknowledged comes back byte for byte.

Layout: ``<data_dir>/journal/segment-NN.log``, each a 4 KiB header, then records on 4 KiB
boundaries::

    header  magic "SNJSEG01", seq (u64, order of use), nonce (u64, random per arming), crc32
    record  magic "SNJR", nonce (u64), path length (u16), payload length (u32), XXH3-64 of path
            and payload (u64), header crc32 (u32); then the path (relative to the spool) and the
            payload (the Part 10 file)

A record counts only when its nonce is the segment's current one and both checksums match, so data
left from an earlier arming or a torn write is never replayed; the scan of a segment stops at the
first record that does not count. Records are written one at a time under a lock and flushed by
group commit (one ``fdatasync`` may cover several senders' records), so an acknowledged record never
follows a gap. Deleting spool files first retires every segment (:meth:`Journal.checkpoint`), so a
replay never brings back a file that was deleted on purpose.

Only one process may use a journal folder (``flock``); a second spool there gets
:class:`JournalBusy` and fsyncs each file as before. Instances larger than
:attr:`Journal.max_payload` (huge multi-frame objects, where the extra flushes cost little) take
that path too.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash  # XXH3: 5x zlib's crc32 on a 512 KiB slice, the checksum is on the acknowledgement path

log = logging.getLogger(__name__)

_SEGMENT_MAGIC = b"SNJSEG01"
_SEGMENT_HEADER = struct.Struct("<8sQQI")  # magic, seq, nonce, crc32 of the rest
_HEADER_BYTES = _BLOCK = 4096  # records start on block boundaries: direct I/O needs that
_RECORD_MAGIC = b"SNJR"
_RECORD = struct.Struct("<4sQHIQI")  # magic, nonce, path length, payload length, body hash, header crc
_fdatasync = getattr(os, "fdatasync", os.fsync)
#: After this long without a new record, the retirer makes every recorded file durable by itself.
IDLE_SECONDS = 1.0
#: After a failed retirement (disk full, I/O error), the retirer tries again this much later.
RETRY_SECONDS = 5.0


class JournalBusy(RuntimeError):
    """Another process (or another spool object) holds the journal folder."""


def _aligned(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _open_for_writing(path: Path) -> int:
    """Direct I/O where the file system has it: the record goes from one reused buffer to the disk
    without a second copy in the page cache (and its first-touch cost, high in virtual machines)."""
    try:
        return os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
    except OSError:  # tmpfs and some network file systems refuse O_DIRECT
        return os.open(path, os.O_RDWR)


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return  # replaced or removed since: nothing of it is left to make durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int
    seq: int = 0
    nonce: int = 0
    end: int = _HEADER_BYTES
    #: Spool files (relative paths) with a record here: fsynced before the segment is re-armed.
    files: set[str] = field(default_factory=set)
    #: Records whose spool file is still being written (retirement waits for them).
    writing: int = 0
    #: A file whose record is here could not be written: retirement writes it from the record.
    missing_files: bool = False


class Journal:
    """Append-only, group-committed record of spool files; see the module docstring.

    ``spool_root`` is the folder record paths are relative to. ``segment_bytes`` x ``segments`` is
    the most the journal holds and its disk use; the segment files are made at the first start
    (making one while instances arrive would stall them).
    """

    def __init__(
        self,
        folder: Path,
        spool_root: Path,
        *,
        segment_bytes: int = 32 << 20,
        segments: int = 8,
    ) -> None:
        if segment_bytes < 4 * _BLOCK or segment_bytes % _BLOCK or segments < 2:
            raise ValueError("a journal needs at least two segments of 16 KiB, in whole 4 KiB blocks")
        self.folder, self.root = Path(folder), str(spool_root)
        self.segment_bytes, self.segment_count = segment_bytes, segments
        #: The largest payload the journal takes; bigger instances are fsynced directly.
        self.max_payload = (segment_bytes - _HEADER_BYTES) // 2 - _RECORD.size - 1024
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalBusy(f"{self.folder} is in use by another spool") from None
        self._segments: list[_Segment] = []
        self._free: deque[_Segment] = deque()
        self._full: deque[_Segment] = deque()
        self._current: _Segment | None = None
        self._next_seq = 1
        self._written = self._synced = 0  # group commit tickets
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._retire_lock = threading.Lock()
        self._changed = threading.Condition()  # guards _free, _full and _closing
        self._closing = False
        self._last_append = 0.0
        self._restore: Callable[[str, memoryview], str | None] = lambda relative, payload: None
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        #: One block-aligned buffer (records are copied into it under the write lock).
        self._buffer = mmap.mmap(-1, _aligned(self.max_payload + _RECORD.size + 1024))

    # --- start: replay, then arm ---------------------------------------------------------------

    def recover(self, restore: Callable[[str, memoryview], str | None]) -> int:
        """Replay the records left by a crash, then arm the segments and start the retirer.

        ``restore(relative_path, payload)`` writes one spool file (without fsync) and returns its
        relative path, or None to skip a record it refuses; it is also used later for files that could
        not be written after their record (see :meth:`written`). Only the newest record of each file name
        (SOP Instance UID) is replayed. The files and their folders are fsynced before any segment is
        re-armed. Returns the number of files restored.
        """
        self._restore = restore
        for path in sorted(self.folder.glob("segment-*.log")):
            fd = _open_for_writing(path)
            self._segments.append(_Segment(path, fd, os.fstat(fd).st_size))
        found: dict[str, tuple[int, _Segment, int, int, str]] = {}  # file name -> newest record
        readers = {id(s): os.open(s.path, os.O_RDONLY) for s in self._segments}  # no alignment rules
        try:
            for segment in self._segments:
                seq = self._read_header(segment, readers[id(segment)])
                if seq is None:
                    continue
                self._next_seq = max(self._next_seq, seq + 1)
                for offset, length, relative in self._scan(segment, readers[id(segment)]):
                    key = relative.rsplit("/", 1)[-1]
                    if key not in found or found[key][0] <= seq:  # later in a segment: newer too
                        found[key] = (seq, segment, offset, length, relative)
            restored = self._replay(found.values(), readers, restore)
        finally:
            for fd in readers.values():
                os.close(fd)
        self._make_durable(restored)
        if restored:
            log.warning("journal: %d spool files written again from records the last run left", len(restored))
        for segment in list(self._segments):
            if segment.size != self.segment_bytes:  # made with another size setting: make anew
                os.close(segment.fd)
                segment.path.unlink()
                self._segments.remove(segment)
                continue
            self._arm(segment)
            self._free.append(segment)
        while len(self._segments) < self.segment_count:
            self._free.append(self._create())
        self._thread = threading.Thread(target=self._run_retirer, name="segnode-journal", daemon=True)
        self._thread.start()
        return len(restored)

    @staticmethod
    def _replay(records, readers: dict[int, int], restore) -> set[str]:
        restored: set[str] = set()
        for _, segment, offset, length, relative in sorted(records, key=lambda r: (r[0], r[2])):
            payload = os.pread(readers[id(segment)], length, offset)
            try:
                written = restore(relative, memoryview(payload))
            except OSError as exc:
                raise OSError(f"journal replay cannot restore {relative}: {exc}") from exc
            if written is not None:
                restored.add(written)
        return restored

    def _read_header(self, segment: _Segment, fd: int) -> int | None:
        raw = os.pread(fd, _SEGMENT_HEADER.size, 0)
        if len(raw) < _SEGMENT_HEADER.size:
            return None
        magic, seq, nonce, crc = _SEGMENT_HEADER.unpack(raw)
        if magic != _SEGMENT_MAGIC or crc != zlib.crc32(raw[:-4]):
            return None
        segment.seq, segment.nonce = seq, nonce
        return seq

    def _scan(self, segment: _Segment, fd: int):
        """(payload offset, payload length, relative path) of each record that counts, in order."""
        offset = _HEADER_BYTES
        while offset + _RECORD.size <= segment.size:
            head = os.pread(fd, _RECORD.size, offset)
            magic, nonce, path_len, length, body_hash, head_crc = _RECORD.unpack(head)
            if magic != _RECORD_MAGIC or nonce != segment.nonce or head_crc != zlib.crc32(head[:-4]):
                return
            start = offset + _RECORD.size + path_len
            if start + length > segment.size:
                return
            body = os.pread(fd, path_len + length, offset + _RECORD.size)
            if xxhash.xxh3_64_intdigest(body) != body_hash:
                return  # torn: written but not flushed whole, so never acknowledged
            yield start, length, body[:path_len].decode("utf-8", "replace")
            offset = _aligned(start + length)

    def _create(self) -> _Segment:
        """A new segment file, every block written once and flushed: later flushes carry no metadata.
        Written past the page cache where possible, so that the zeros do not crowd it."""
        taken = {s.path.name for s in self._segments}
        name = next(n for i in range(len(taken) + 1) if (n := f"segment-{i:02d}.log") not in taken)
        path = self.folder / name
        temp = path.with_suffix(".new")
        temp.touch(0o640)
        fd = _open_for_writing(temp)
        zeros = mmap.mmap(-1, 1 << 20)  # aligned, zeroed
        try:
            left = self.segment_bytes
            with memoryview(zeros) as view:
                while left:
                    left -= os.write(fd, view[: min(left, len(zeros))])
            os.fsync(fd)
            os.rename(temp, path)
            _fsync_path(str(self.folder), os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
            zeros.close()
        segment = _Segment(path, _open_for_writing(path), self.segment_bytes)
        self._segments.append(segment)
        self._arm(segment)
        return segment

    def _arm(self, segment: _Segment) -> None:
        """Give the segment a new nonce (older records stop counting) and make that durable."""
        segment.seq, self._next_seq = self._next_seq, self._next_seq + 1
        segment.nonce = secrets.randbits(64)
        segment.end, segment.files, segment.missing_files = _HEADER_BYTES, set(), False
        head = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, segment.seq, segment.nonce, 0)[:-4]
        block = mmap.mmap(-1, _BLOCK)  # aligned, zeroed
        block[: len(head) + 4] = head + struct.pack("<I", zlib.crc32(head))
        try:
            os.pwrite(segment.fd, block, 0)
        finally:
            block.close()
        _fdatasync(segment.fd)

    # --- appending -------------------------------------------------------------------------------

    def append(self, relative: str, parts: Sequence[bytes | bytearray | memoryview]) -> _Segment:
        """Record the spool file ``relative`` (its bytes: ``parts``); durable on return.

        The caller then writes the file (no fsync needed) and calls :meth:`written` with the value
        returned, so that the segment is not retired before the file exists. Raises OSError when the
        record cannot be written or flushed (the caller refuses the instance), ValueError when the
        payload is larger than :attr:`max_payload` or the path longer than 1 KiB.
        """
        path = relative.encode()
        length = sum(len(p) for p in parts)
        if length > self.max_payload or len(path) > 1024:
            raise ValueError(f"a {length}-byte record is larger than the journal takes")
        size = _aligned(_RECORD.size + len(path) + length)
        with self._write_lock:
            segment = self._segment_for(size)
            buffer, at = self._buffer, _RECORD.size
            for part in (path, *parts):
                buffer[at : at + len(part)] = part
                at += len(part)
            with memoryview(buffer) as view, view[_RECORD.size : at] as body:  # released on errors too
                body_hash = xxhash.xxh3_64_intdigest(body)
            head = _RECORD.pack(_RECORD_MAGIC, segment.nonce, len(path), length, body_hash, 0)[:-4]
            buffer[: _RECORD.size] = head + struct.pack("<I", zlib.crc32(head))
            with memoryview(buffer) as view, view[:size] as record:
                if os.pwrite(segment.fd, record, segment.end) != size:
                    raise OSError("short write to the journal")
            segment.end += size
            segment.files.add(relative)
            segment.writing += 1
            self._written += 1
            self._last_append = time.monotonic()
            ticket = self._written
        try:
            self._commit(ticket)
        except BaseException:
            self.written(segment)
            raise
        return segment

    def written(self, segment: _Segment, *, ok: bool = True) -> None:
        """The spool file of a record appended to ``segment`` is written (``ok``) or failed to be:
        then its retirement writes the file from the record first (and a crash before that leaves
        the record to the next start's replay)."""
        with self._changed:
            segment.writing -= 1
            segment.missing_files |= not ok
            self._changed.notify_all()

    def _commit(self, ticket: int) -> None:
        """Group commit: one fdatasync covers every record written before it started."""
        with self._sync_lock:
            if self._synced >= ticket:
                return
            with self._write_lock:
                target, segment = self._written, self._current
            if segment is not None:  # None: the last switch flushed every record written
                _fdatasync(segment.fd)
            self._synced = target

    @property
    def problem(self) -> str | None:
        """Why segments cannot be retired right now (stores are refused once all are full), or None."""
        error = self._error
        return None if error is None else f"journal cannot retire segments: {error}"

    def _segment_for(self, size: int) -> _Segment:
        """The segment the next ``size`` bytes go to (called with the write lock held)."""
        current = self._current
        if current is not None and current.end + size <= current.size:
            return current
        if current is not None:
            self._close_current()
        with self._changed:
            while not self._free:  # every segment holds records whose files are not fsynced yet
                if self._error is not None:
                    raise OSError(f"journal cannot retire segments: {self._error}")
                self._changed.wait()
            self._current = self._free.popleft()
        return self._current

    def _close_current(self) -> None:
        """Flush the current segment and queue it for retirement (write lock held): records before
        this are durable, so a group commit only ever needs to flush the segment that follows."""
        assert self._current is not None
        _fdatasync(self._current.fd)
        with self._changed:
            self._full.append(self._current)
            self._changed.notify_all()
        self._current = None

    # --- retiring --------------------------------------------------------------------------------

    def _run_retirer(self) -> None:
        """Retire full segments once half the journal is in use, and everything once ingest has
        been idle for :data:`IDLE_SECONDS`: during a burst the disk serves the acknowledgements."""
        while True:
            with self._changed:
                while not self._closing and not self._retiring_due():
                    self._changed.wait(IDLE_SECONDS / 2)
                if self._closing:
                    return
            try:
                if self._idle():
                    self.checkpoint()
                else:
                    self._retire_full()
            except OSError as exc:  # disk full or failing: writers waiting for a segment hear it
                log.error("journal: cannot retire a segment (%s); trying again in %g s", exc, RETRY_SECONDS)
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                    self._changed.wait(RETRY_SECONDS)

    def _idle(self) -> bool:
        return time.monotonic() - self._last_append >= IDLE_SECONDS

    def _retiring_due(self) -> bool:
        """(``_changed`` held.)"""
        if self._full and len(self._free) < self.segment_count // 2:
            return True
        current = self._current
        return bool(self._full or (current is not None and current.files)) and self._idle()

    def _retire_full(self) -> None:
        # Pop only under the retire lock: checkpoint() holds it while it empties _full, so it never
        # returns while a segment it should wait for is half retired elsewhere.
        with self._retire_lock:
            while True:
                with self._changed:
                    segment = self._full.popleft() if self._full else None
                if segment is None:
                    return
                try:
                    self._retire(segment)
                except BaseException:
                    with self._changed:
                        self._full.appendleft(segment)  # its records still count: try again later
                    raise

    def _retire(self, segment: _Segment) -> None:
        with self._changed:
            while segment.writing:
                self._changed.wait()
        if segment.missing_files:  # a file was not written after its record: write it from the record
            self._restore_missing(segment)
            segment.missing_files = False
        self._make_durable(segment.files)
        self._arm(segment)
        with self._changed:
            self._free.append(segment)
            self._error = None  # retiring works (again)
            self._changed.notify_all()

    def _restore_missing(self, segment: _Segment) -> None:
        reader = os.open(segment.path, os.O_RDONLY)
        try:
            for offset, length, relative in self._scan(segment, reader):
                if not os.path.exists(f"{self.root}/{relative}"):
                    self._restore(relative, memoryview(os.pread(reader, length, offset)))
                    log.info("journal: wrote %s from its record", relative)
        finally:
            os.close(reader)

    def _make_durable(self, relatives: set[str]) -> None:
        for relative in relatives:
            _fsync_path(f"{self.root}/{relative}")
        for folder in {relative.rsplit("/", 1)[0] for relative in relatives}:
            _fsync_path(f"{self.root}/{folder}", os.O_RDONLY | os.O_DIRECTORY)

    def checkpoint(self) -> None:
        """Make every spool file recorded so far durable by itself and empty the journal (before
        files are deleted, and at close). Appends may go on meanwhile, into a fresh segment."""
        with self._write_lock:
            if self._current is not None and self._current.files:
                self._close_current()
        self._retire_full()

    def close(self) -> None:
        """Checkpoint, stop the retirer and release the folder."""
        if self._thread is not None:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
            self._thread.join()
            self.checkpoint()
        for segment in self._segments:
            os.close(segment.fd)
        self._segments = []
        self._buffer.close()
        os.close(self._lock_fd)
