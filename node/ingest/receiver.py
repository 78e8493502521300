"""The receiver: spool + series completion behind one small API that every way in shares.

The C-STORE SCP, the STOW-RS route and file imports all do the same three things::

    receiver = Receiver.from_settings(settings, on_series_ready=router.submit)
    receiver.start()                                # reconcile the spool, resume pending series
    with receiver.session("stow") as session:       # one association / one HTTP request
        result = receiver.store(part_bytes, Sender("stow", address=client_ip), session=session)
        # result.status: 0x0000 or the failure code (PS3.4 B.2.3); result.reason: one sentence
    ...                                             # session end = release: completion is checked
    receiver.close()

``on_series_ready(SeriesReady)`` is called from the thread that ended the session, or from the
receiver's quiet-period timer thread; it must be quick and thread-safe (queue the work). Delivery is
at least once: a crash between the call and recording it repeats the same generation on restart.
After a job succeeded, ``receiver.spool.remove_series(series_uid)`` deletes the series if wanted;
``[ingest] retention_days`` removes handed-on series after that many idle days (timer, hourly).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from node.config import Settings
from node.ingest import Sender, SeriesReady
from node.ingest.completion import CompletionTracker, Handoff
from node.ingest.spool import Spool, StoreResult, TempFile, purge_older_than

log = logging.getLogger(__name__)

_sessions = itertools.count(1)
#: How often the timer applies ``[ingest] retention_days``.
RETENTION_CHECK_SECONDS = 3600.0


class Receiver:
    """Stores instances durably and hands complete series to ``on_series_ready``."""

    def __init__(
        self,
        spool: Spool,
        on_series_ready: Callable[[SeriesReady], None] | None = None,
        *,
        quiet_seconds: float = 60.0,
        spacing_tolerance: float = 0.01,
        poll_interval: float = 1.0,
        retention_days: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.retention_days = retention_days
        self.on_series_ready = on_series_ready
        self.clock = clock
        self.poll_interval = poll_interval
        self.tracker = CompletionTracker(
            quiet_seconds, spacing_tolerance=spacing_tolerance, folder_for=spool.series_folder
        )
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._prefix = f"{int(time.time()):x}"

    @classmethod
    def from_settings(
        cls, settings: Settings, on_series_ready: Callable[[SeriesReady], None] | None = None
    ) -> Receiver:
        ingest = settings.ingest
        spool = Spool(
            settings.node.data_dir, fsync=ingest.fsync, min_free_mb=ingest.min_free_mb, journal_mb=ingest.journal_mb
        )
        return cls(
            spool,
            on_series_ready,
            quiet_seconds=ingest.quiet_seconds,
            spacing_tolerance=settings.volume.spacing_tolerance,
            retention_days=ingest.retention_days,
        )

    # --- life cycle --------------------------------------------------------------------------

    def start(self, *, timer: bool = True) -> None:
        """Reconcile the spool with its files, resume series not yet handed on, start the quiet timer."""
        self.spool.reconcile()
        now = self.clock()
        for series_uid in self.spool.series_uids(pending_only=True):
            self._load(series_uid, now)
        if timer and self._timer is None:
            self._timer = threading.Thread(target=self._run_timer, name="segnode-completion", daemon=True)
            self._timer.start()

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
            self._timer = None
        self.spool.close()

    def _run_timer(self) -> None:
        next_purge = time.monotonic()
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll()
                if self.retention_days and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + RETENTION_CHECK_SECONDS
                    removed = purge_older_than(self.spool, self.retention_days)
                    if removed:
                        log.info("retention: removed %d series older than %g days", len(removed),
                                 self.retention_days)
            except Exception:  # never let the timer die: quiet completion depends on it
                log.exception("completion timer failed")

    # --- receiving ---------------------------------------------------------------------------

    def new_session(self, kind: str = "session") -> str:
        """A name for one association or request, unique in this process and across restarts."""
        return f"{kind}-{self._prefix}-{next(_sessions)}"

    @contextmanager
    def session(self, kind: str = "session") -> Iterator[str]:
        """A session that ends cleanly when the block ends, or interrupted if it raises."""
        session = self.new_session(kind)
        try:
            yield session
        except BaseException:
            self.end_session(session, clean=False)
            raise
        self.end_session(session, clean=True)

    def store(
        self,
        dataset: bytes | bytearray | memoryview,
        sender: Sender,
        *,
        session: str,
        transfer_syntax: str | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        reserved: TempFile | None = None,
        on_durable: Callable[[StoreResult], None] | None = None,
    ) -> StoreResult:
        """Store one instance (see :meth:`Spool.store`) and tell completion about it.

        ``dataset`` is only read during the call (the listener reuses its buffer for the next one).
        ``reserved`` and ``on_durable`` are the SCP's hooks described at :meth:`Spool.store`.
        """
        result = self.spool.store(
            dataset,
            sender,
            transfer_syntax=transfer_syntax,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            session=session,
            reserved=reserved,
            on_durable=on_durable,
        )
        if result.ok and result.info is not None:
            now = self.clock()
            if not self.tracker.knows(result.info.series_uid):
                self._load(result.info.series_uid, now)
            self.tracker.instance_stored(
                result.info, session=session, sender=sender, now=now, duplicate=result.duplicate
            )
        return result

    def reserve(self, study_uid: str, series_uid: str) -> TempFile | None:
        """A temporary file made ahead of time for the next instance of a series (:meth:`Spool.reserve`)."""
        return self.spool.reserve(study_uid, series_uid)

    def _load(self, series_uid: str, now: float) -> None:
        """Bring a series the tracker does not hold (new, restarted, forgotten) in from the index."""
        with self._load_lock:
            if self.tracker.knows(series_uid):
                return
            rows = self.spool.instances(series_uid)
            self.tracker.load(((r.info, r.generation, r.sender) for r in rows), now)

    def end_session(self, session: str, *, clean: bool = True) -> list[SeriesReady]:
        """The association was released (``clean``) or aborted; hands on series now complete."""
        return self._deliver(self.tracker.session_ended(session, clean=clean, now=self.clock()))

    def poll(self) -> list[SeriesReady]:
        """Hand on series that have been quiet long enough (the timer thread calls this each second)."""
        return self._deliver(self.tracker.poll(self.clock()))

    def _deliver(self, handoffs: list[Handoff]) -> list[SeriesReady]:
        for handoff in handoffs:
            ready = handoff.ready
            log.info(
                "series %s ready: %s, %d instance(s), generation %d, %s from %s%s",
                ready.series_uid, ready.reason, ready.instance_count, ready.generation, ready.modality or "?",
                ready.sender.calling_aet or ready.sender.via,
                "" if ready.is_image else " (not an image series)",
            )  # fmt: skip
            if self.on_series_ready is not None:
                try:
                    self.on_series_ready(ready)
                except Exception:
                    log.exception("on_series_ready failed for series %s", ready.series_uid)
            self.spool.mark_handed(ready.series_uid, ready.generation, list(handoff.sop_instance_uids))
        return [h.ready for h in handoffs]
