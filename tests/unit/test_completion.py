"""Series completion, decided on an injected clock: no network, no sleeps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from node.dicom.writer import SeriesInfo, series_datasets
from node.ingest import Sender
from node.ingest.completion import CompletionTracker, geometry_complete
from node.ingest.instance import InstanceInfo
from node.ingest.receiver import Receiver
from node.ingest.spool import Spool
from tests.unit.test_series import oblique_direction, ramp_volume

SENDER = Sender("dimse", "CT1", "10.0.0.7")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def stack(count: int = 5, *, step: float = 2.5, skip=(), hint: int | None = None, series: str = "1.2.3.4",
          acquisition: int | None = None, orientation=AXIAL, start: int = 0, **extra) -> list[InstanceInfo]:
    """Single-frame instances along the normal of ``orientation`` (instance k at k*step mm)."""
    normal = np.cross(orientation[:3], orientation[3:])
    return [
        InstanceInfo(
            study_uid="1.2.3", series_uid=series, sop_instance_uid=f"{series}.{acquisition or 0}.{k + 1}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1", modality="CT",
            instance_number=k + 1, acquisition_number=acquisition,
            position=tuple(float(v) for v in np.array([-100.0, -120.0, 30.0]) + k * step * normal),
            orientation=tuple(orientation), images_in_acquisition=hint, **extra,
        )  # fmt: skip
        for k in range(start, count)
        if k not in skip
    ]


def receive(tracker: CompletionTracker, infos, session: str = "a", now: float = 0.0) -> None:
    for info in infos:
        tracker.instance_stored(info, session=session, sender=SENDER, now=now)


@pytest.fixture
def tracker() -> CompletionTracker:
    return CompletionTracker(quiet_seconds=60)


# --- the rules -------------------------------------------------------------------------------------


def test_complete_at_release(tracker: CompletionTracker) -> None:
    receive(tracker, stack(5, hint=5))
    assert tracker.state("1.2.3.4", 1).status == "receiving"
    assert tracker.poll(now=30) == []
    [handoff] = tracker.session_ended("a", clean=True, now=30)
    ready = handoff.ready
    assert (ready.series_uid, ready.reason, ready.instance_count, ready.generation) == ("1.2.3.4", "complete", 5, 1)
    assert (ready.sender, ready.modality, ready.is_image, ready.folder) == (SENDER, "CT", True, Path("1.2.3/1.2.3.4"))
    assert handoff.sop_instance_uids == tuple(sorted(i.sop_instance_uid for i in stack(5)))
    state = tracker.state("1.2.3.4", 30)
    assert (state.status, state.generation, state.pending, state.open_sessions) == ("handed_on", 1, 0, 0)
    assert tracker.poll(now=1000) == []  # handed on once


def test_a_gap_waits_for_the_quiet_period(tracker: CompletionTracker) -> None:
    receive(tracker, stack(6, skip={3}), now=10)
    assert tracker.session_ended("a", clean=True, now=11) == []
    assert "missing" in tracker.state("1.2.3.4", 11).waiting_for
    assert tracker.poll(now=69.9) == []
    [handoff] = tracker.poll(now=70)
    assert (handoff.ready.reason, handoff.ready.instance_count, handoff.ready.generation) == ("quiet", 5, 1)


def test_a_missing_end_slice_is_seen_by_the_count_hint(tracker: CompletionTracker) -> None:
    receive(tracker, stack(4, hint=5))
    assert tracker.session_ended("a", clean=True, now=1) == []
    assert "ImagesInAcquisition says 5, 4 received" in tracker.state("1.2.3.4", 1).waiting_for
    assert [h.ready.reason for h in tracker.poll(now=60)] == ["quiet"]


def test_the_late_slice_makes_generation_two(tracker: CompletionTracker) -> None:
    receive(tracker, stack(6, skip={3}), now=0)
    tracker.session_ended("a", clean=True, now=1)
    assert [h.ready.generation for h in tracker.poll(now=60)] == [1]
    receive(tracker, stack(4, start=3), session="b", now=100)  # the missing slice
    [late] = tracker.session_ended("b", clean=True, now=101)
    assert (late.ready.reason, late.ready.generation, late.ready.instance_count) == ("complete", 2, 6)
    assert late.sop_instance_uids == ("1.2.3.4.0.4",)


def test_a_resent_series_is_not_a_new_generation(tracker: CompletionTracker) -> None:
    receive(tracker, stack(5))
    assert len(tracker.session_ended("a", clean=True, now=1)) == 1
    for info in stack(5):
        tracker.instance_stored(info, session="b", sender=SENDER, now=5, duplicate=True)
    assert tracker.session_ended("b", clean=True, now=6) == []
    assert tracker.poll(now=1000) == []


def test_an_aborted_association_completes_only_by_quiet(tracker: CompletionTracker) -> None:
    receive(tracker, stack(5, hint=5))
    assert tracker.session_ended("a", clean=False, now=1) == []
    assert tracker.state("1.2.3.4", 1).interrupted
    assert [h.ready.reason for h in tracker.poll(now=60)] == ["quiet"]


def test_a_retry_after_an_abort_completes_at_its_release(tracker: CompletionTracker) -> None:
    receive(tracker, stack(5, hint=5)[:3])
    tracker.session_ended("a", clean=False, now=1)
    receive(tracker, stack(5, hint=5)[3:], session="b", now=2)
    assert [h.ready.reason for h in tracker.session_ended("b", clean=True, now=3)] == ["complete"]


def test_two_associations_complete_when_both_are_released(tracker: CompletionTracker) -> None:
    infos = stack(6)
    receive(tracker, infos[::2], session="a")
    receive(tracker, infos[1::2], session="b")
    assert tracker.session_ended("a", clean=True, now=1) == []
    assert "1 open session" in tracker.state("1.2.3.4", 1).waiting_for
    [handoff] = tracker.session_ended("b", clean=True, now=2)
    assert handoff.ready.instance_count == 6


def test_one_association_two_series(tracker: CompletionTracker) -> None:
    receive(tracker, stack(3, series="1.2.3.4") + stack(4, series="1.2.3.5", skip={1}))
    handoffs = tracker.session_ended("a", clean=True, now=1)
    assert [h.ready.series_uid for h in handoffs] == ["1.2.3.4"]
    assert [h.ready.series_uid for h in tracker.poll(now=60)] == ["1.2.3.5"]


def test_non_image_objects_complete_as_they_are(tracker: CompletionTracker) -> None:
    seg = InstanceInfo("1.2.3", "1.2.3.9", "1.2.3.9.1", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.1.2.1",
                       modality="SEG", number_of_frames=7, is_image=False)
    sr = InstanceInfo("1.2.3", "1.2.3.8", "1.2.3.8.1", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.1.2.1",
                      modality="SR", is_image=False)
    receive(tracker, [seg, sr])
    handoffs = tracker.session_ended("a", clean=True, now=1)
    assert sorted((h.ready.series_uid, h.ready.modality, h.ready.is_image, h.ready.reason) for h in handoffs) == [
        ("1.2.3.8", "SR", False, "complete"), ("1.2.3.9", "SEG", False, "complete")]


def test_the_clock_runs_from_the_last_instance(tracker: CompletionTracker) -> None:
    receive(tracker, stack(3, skip={1}), now=0)
    receive(tracker, stack(5, start=4), session="a", now=50)
    assert tracker.poll(now=100) == []
    assert len(tracker.poll(now=110)) == 1


def test_forgotten_series_are_dropped_after_a_while() -> None:
    tracker = CompletionTracker(quiet_seconds=60, forget_seconds=600)
    receive(tracker, stack(3))
    tracker.session_ended("a", clean=True, now=1)
    tracker.poll(now=599)
    assert tracker.knows("1.2.3.4")
    tracker.poll(now=600)
    assert not tracker.knows("1.2.3.4")


def test_loaded_series_complete_by_quiet_from_the_restart(tracker: CompletionTracker) -> None:
    infos = stack(4)
    tracker.load([(infos[0], 1, SENDER)] + [(i, 0, SENDER) for i in infos[1:]], now=1000)
    state = tracker.state("1.2.3.4", 1000)
    assert (state.generation, state.pending, state.interrupted) == (1, 3, True)
    assert tracker.poll(now=1059) == []
    [handoff] = tracker.poll(now=1060)
    assert (handoff.ready.generation, handoff.ready.instance_count, handoff.sop_instance_uids) == (
        2, 4, tuple(i.sop_instance_uid for i in infos[1:]))


# --- geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "infos, complete, why",
    [
        (stack(5), True, ""),
        (stack(1), True, ""),
        (list(reversed(stack(5))), True, ""),
        (stack(5, orientation=tuple(np.array(oblique_direction(25))[:, :2].T.ravel())), True, ""),
        (stack(5, skip={2}), False, "1 slice(s) missing"),
        (stack(5, hint=6), False, "ImagesInAcquisition"),
        (stack(5, acquisition=1) + stack(5, acquisition=2), True, ""),
        (stack(5, acquisition=1, hint=5) + stack(5, acquisition=2, hint=5), True, ""),
        (stack(5, acquisition=1) + stack(4, acquisition=2), False, "differ in count"),
        (stack(3) + [InstanceInfo(**{**i.__dict__, "sop_instance_uid": i.sop_instance_uid + ".9"}) for i in stack(3)],
         False, "share a position"),
        (stack(3) + stack(6, start=3, orientation=(1.0, 0, 0, 0, 0.9999, 0.01)), False, "orientations"),
        ([], False, "no instances"),
    ],
)
def test_geometry_complete(infos, complete, why) -> None:
    result = geometry_complete(infos)
    assert result[0] is complete
    assert why in result[1]


def test_uneven_spacing_and_no_geometry_are_not_complete() -> None:
    infos = stack(4)
    uneven = infos[:3] + [InstanceInfo(**{**infos[3].__dict__, "position": (-100.0, -120.0, 30 + 3 * 2.5 + 1.0)})]
    complete, why = geometry_complete(uneven)
    assert not complete and "not uniform" in why
    bare = [InstanceInfo(**{**i.__dict__, "position": None}) for i in infos]
    assert geometry_complete(bare)[0] is False
    multiframe = [InstanceInfo(**{**infos[0].__dict__, "position": None, "number_of_frames": 40})]
    assert geometry_complete(multiframe) == (True, "")


# --- the receiver: spool + tracker + callback, still without a network -------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def part10(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_receiver(data: Path, clock: Clock, ready: list) -> Receiver:
    receiver = Receiver(Spool(data, fsync=False), ready.append, quiet_seconds=60, clock=clock)
    receiver.start(timer=False)
    return receiver


def test_receiver_hands_on_remembers_and_resumes(tmp_path: Path) -> None:
    clock, ready = Clock(), []
    series = series_datasets(ramp_volume(shape=(5, 6, 6)), SeriesInfo(uid_seed="recv"))
    receiver = make_receiver(tmp_path, clock, ready)
    with receiver.session("test") as session:
        for ds in series[:4]:
            assert receiver.store(part10(ds), SENDER, session=session).ok
    assert ready == []  # ImagesInAcquisition = 5
    receiver.close()

    # Restart: the pending series completes by quiet, counted from the restart.
    clock.now = 1000
    receiver = make_receiver(tmp_path, clock, ready)
    clock.now = 1059
    assert receiver.poll() == []
    clock.now = 1060
    [first] = receiver.poll()
    assert (first.reason, first.generation, first.instance_count) == ("quiet", 1, 4)
    assert ready == [first]
    assert receiver.spool.series_uids(pending_only=True) == []
    receiver.close()

    # Another restart: the late fifth slice is generation 2 over the whole folder.
    receiver = make_receiver(tmp_path, clock, ready)
    with receiver.session("test") as session:
        receiver.store(part10(series[4]), SENDER, session=session)
    late = ready[-1]
    assert (late.reason, late.generation, late.instance_count, late.folder) == ("complete", 2, 5, first.folder)
    assert sorted(p.name for p in late.folder.iterdir()) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in series)
    receiver.close()


def test_a_failing_callback_does_not_stop_ingest(tmp_path: Path) -> None:
    def broken(ready) -> None:
        raise RuntimeError("router bug")

    receiver = Receiver(Spool(tmp_path, fsync=False), broken, clock=Clock())
    receiver.start(timer=False)
    series = series_datasets(ramp_volume(shape=(2, 4, 4)), SeriesInfo(uid_seed="cb"))
    with receiver.session() as session:
        for ds in series:
            receiver.store(part10(ds), SENDER, session=session)
    assert receiver.spool.series_uids(pending_only=True) == []  # handed on, the error only logged
    receiver.close()
