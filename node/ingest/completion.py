"""Series completion: when a series in the spool is whole and is handed on as a :class:`SeriesReady`.

DICOM has no "end of series" message, so a series is taken as complete when either

* **complete**: every session (association, STOW-RS request) that brought it has been released
  cleanly, and its slices are evenly spaced along the normal with no gap and agree with any count
  hint they carry (ImagesInAcquisition, an equal count per acquisition; a multi-frame instance is
  whole by itself); the geometry checks are :mod:`node.dicom.series`'s own; or
* **quiet**: no instance of it arrived for ``quiet_seconds``, whatever its shape.

Non-image series (SEG, SR, RTSTRUCT, PR, KO, ...) complete at release as they are, flagged
``is_image=False`` so the router never selects them. Instances that arrive after a series was handed
on make a new :class:`SeriesReady` with ``generation + 1`` over the whole folder.

The tracker is pure bookkeeping: the caller passes ``now`` (monotonic seconds) into every call, and
gets back the :class:`Handoff` decisions; nothing here sleeps, reads files or calls back.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from node.dicom.series import ORIENTATION_TOLERANCE, VolumeError, check_slice_steps, plane_axes
from node.ingest import SeriesReady, Sender
from node.ingest.instance import InstanceInfo

#: Two slices closer than this along the normal (mm) lie at the same position.
SAME_POSITION_MM = 1e-3


def geometry_complete(instances: Iterable[InstanceInfo], spacing_tolerance: float = 0.01) -> tuple[bool, str]:
    """(True, "") when these instances form whole stacks; else (False, why it looks incomplete)."""
    infos = list(instances)
    if not infos:
        return False, "no instances"
    if any(i.number_of_frames > 1 for i in infos):
        return True, ""  # enhanced multi-frame: each instance carries its whole stack
    if any(i.position is None or i.orientation is None for i in infos):
        return False, "some instances have no ImagePositionPatient/ImageOrientationPatient"
    reference = np.asarray(infos[0].orientation)
    if any(np.max(np.abs(np.asarray(i.orientation) - reference)) > ORIENTATION_TOLERANCE for i in infos):
        return False, "instances have different orientations"
    try:
        row, col = plane_axes(reference)
    except VolumeError as exc:
        return False, exc.message
    normal = np.cross(row, col)
    groups: dict[int | None, list[float]] = defaultdict(list)
    for i in infos:
        groups[i.acquisition_number].append(float(np.asarray(i.position) @ normal))
    stacks = [sorted(v for g in groups.values() for v in g)]
    if any(b - a < SAME_POSITION_MM for a, b in zip(stacks[0], stacks[0][1:])):
        # Several images per position: complete only as equal acquisitions, each a whole stack.
        stacks = [sorted(g) for g in groups.values()]
        if len(stacks) == 1 or len({len(s) for s in stacks}) > 1:
            return False, "several images share a position and acquisitions differ in count"
    for along in stacks:
        if len(along) > 1:
            if any(b - a < SAME_POSITION_MM for a, b in zip(along, along[1:])):
                return False, "two images of one acquisition share a position"
            try:
                check_slice_steps(np.asarray(along), spacing_tolerance)
            except VolumeError as exc:
                return False, exc.message
    sizes = {key: len(v) for key, v in groups.items()}
    for i in infos:
        hint = i.images_in_acquisition
        if hint is not None and hint not in (len(infos), sizes[i.acquisition_number]):
            return False, f"ImagesInAcquisition says {hint}, {len(infos)} received"
    return True, ""


@dataclass(frozen=True)
class Handoff:
    """A decision: this series is ready; these pending instances go out with it."""

    ready: SeriesReady
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class SeriesState:
    """What the tracker knows about one series (for tests, the API and logs)."""

    series_uid: str
    status: Literal["receiving", "handed_on"]
    generation: int
    instance_count: int
    pending: int
    open_sessions: int
    interrupted: bool
    waiting_for: str


@dataclass
class _Series:
    study_uid: str
    series_uid: str
    sender: Sender
    last_received: float
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)
    generation: int = 0
    #: A session that brought it ended without a release (abort, crash): only quiet completes it.
    interrupted: bool = False


class CompletionTracker:
    """Decides when series are complete; thread-safe, every call takes ``now`` (monotonic seconds)."""

    def __init__(
        self,
        quiet_seconds: float = 60.0,
        *,
        spacing_tolerance: float = 0.01,
        forget_seconds: float = 3600.0,
        folder_for: Callable[[str, str], Path] = lambda study, series: Path(study) / series,
    ) -> None:
        self.quiet_seconds = quiet_seconds
        self.spacing_tolerance = spacing_tolerance
        self.forget_seconds = forget_seconds
        self.folder_for = folder_for
        self._series: dict[str, _Series] = {}
        self._sessions: dict[str, set[str]] = defaultdict(set)
        self._lock = threading.RLock()

    def knows(self, series_uid: str) -> bool:
        with self._lock:
            return series_uid in self._series

    def load(self, instances: Iterable[tuple[InstanceInfo, int, Sender]], now: float) -> None:
        """Resume a series from the spool index: (info, generation handed on in or 0, sender) rows.

        Used at start and for a series forgotten after handoff. Its senders' sessions are gone, so
        pending instances complete by the quiet period from ``now``.
        """
        with self._lock:
            for info, generation, sender in instances:
                series = self._get(info, sender, now)
                series.instances[info.sop_instance_uid] = info
                series.generation = max(series.generation, generation)
                if generation == 0:
                    series.pending.add(info.sop_instance_uid)
                    series.interrupted = True

    def _get(self, info: InstanceInfo, sender: Sender, now: float) -> _Series:
        series = self._series.get(info.series_uid)
        if series is None:
            series = self._series[info.series_uid] = _Series(info.study_uid, info.series_uid, sender, now)
        return series

    def instance_stored(
        self, info: InstanceInfo, *, session: str, sender: Sender, now: float, duplicate: bool = False
    ) -> None:
        """An instance is durably in the spool. A duplicate joins the session but is not new."""
        with self._lock:
            series = self._get(info, sender, now)
            if session not in series.sessions:
                series.sessions.add(session)
                series.interrupted = False  # a new session takes over from an interrupted one
                self._sessions[session].add(info.series_uid)
            series.sender = sender
            series.last_received = now
            known = info.sop_instance_uid in series.instances
            series.instances[info.sop_instance_uid] = info
            if not (duplicate or known):
                series.pending.add(info.sop_instance_uid)

    def session_ended(self, session: str, *, clean: bool, now: float) -> list[Handoff]:
        """An association was released (``clean``) or aborted; returns the series now complete."""
        with self._lock:
            handoffs = []
            for series_uid in sorted(self._sessions.pop(session, ())):
                series = self._series.get(series_uid)
                if series is None:
                    continue
                series.sessions.discard(session)
                if not clean:
                    series.interrupted = True
                handoff = self._decide(series, now)
                if handoff:
                    handoffs.append(handoff)
            return handoffs

    def poll(self, now: float) -> list[Handoff]:
        """Series that have been quiet long enough; forgets handed-on series idle for ``forget_seconds``."""
        with self._lock:
            handoffs = []
            for series_uid, series in list(self._series.items()):
                idle = now - series.last_received
                if series.pending and idle >= self.quiet_seconds:
                    handoffs.append(self._handoff(series, "quiet"))
                elif not (series.pending or series.sessions) and idle >= self.forget_seconds:
                    del self._series[series_uid]
            return handoffs

    def state(self, series_uid: str, now: float) -> SeriesState | None:
        with self._lock:
            series = self._series.get(series_uid)
            if series is None:
                return None
            return SeriesState(
                series_uid=series_uid,
                status="receiving" if series.pending else "handed_on",
                generation=series.generation,
                instance_count=len(series.instances),
                pending=len(series.pending),
                open_sessions=len(series.sessions),
                interrupted=series.interrupted,
                waiting_for=self._waiting_for(series, now) if series.pending else "",
            )

    def _waiting_for(self, series: _Series, now: float) -> str:
        left = max(0.0, self.quiet_seconds - (now - series.last_received))
        if series.sessions:
            return f"{len(series.sessions)} open session(s), or {left:.0f} s of quiet"
        if series.interrupted:
            return f"a session was interrupted: {left:.0f} s of quiet"
        complete, why = self._complete(series)
        return f"{why}: {left:.0f} s of quiet" if not complete else ""

    def _complete(self, series: _Series) -> tuple[bool, str]:
        infos = series.instances.values()
        if not all(i.is_image for i in infos):
            return True, ""  # non-image objects complete as they are
        return geometry_complete(infos, self.spacing_tolerance)

    def _decide(self, series: _Series, now: float) -> Handoff | None:
        if not series.pending:
            return None
        if now - series.last_received >= self.quiet_seconds:
            return self._handoff(series, "quiet")
        if series.sessions or series.interrupted:
            return None
        return self._handoff(series, "complete") if self._complete(series)[0] else None

    def _handoff(self, series: _Series, reason: Literal["complete", "quiet"]) -> Handoff:
        if reason == "quiet":
            # Sessions idle this long may never end (a lost connection fires no event): let them go;
            # a later instance on one of them joins again and makes the next generation.
            for session in series.sessions:
                members = self._sessions.get(session)
                if members is not None:
                    members.discard(series.series_uid)
                    if not members:
                        del self._sessions[session]
            series.sessions.clear()
        series.generation += 1
        handed, series.pending = tuple(sorted(series.pending)), set()
        infos = list(series.instances.values())
        ready = SeriesReady(
            study_uid=series.study_uid,
            series_uid=series.series_uid,
            folder=self.folder_for(series.study_uid, series.series_uid),
            instance_count=len(infos),
            reason=reason,
            sender=series.sender,
            generation=series.generation,
            modality=infos[0].modality if infos else "",
            is_image=all(i.is_image for i in infos),
        )
        return Handoff(ready, handed)
