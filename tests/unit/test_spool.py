"""The spool and the per-instance checks: what is stored, where, with which status, and recovery."""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo, series_datasets
from node.ingest import Sender
from node.ingest import journal as journal_module
from node.ingest.instance import Status, encode_instance, file_meta, is_image, split_part10, valid_uid
from node.ingest.spool import Spool, purge_older_than
from tests.unit.test_series import ramp_volume

SENDER = Sender("dimse", "MODALITY", "10.0.0.7")


def datasets(slices: int = 4, seed: str = "spool") -> list[Dataset]:
    return series_datasets(ramp_volume(shape=(slices, 8, 10)), SeriesInfo(uid_seed=seed))


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def bare(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset as a C-STORE carries it: no preamble, no file meta."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    write_dataset(out, ds)
    return out.getvalue()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "data", fsync=True, journal_mb=8)
    yield spool
    spool.close()


def spool_files(spool: Spool) -> list[Path]:
    return sorted(p for p in spool.root.rglob("*") if p.is_file() and not p.name.startswith("index.sqlite"))


# --- UIDs and kinds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid, ok",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.03.4", True),  # leading zero: not conformant, seen in the field, harmless as a path
        ("1.2.3.", False),
        (".1.2", False),
        ("1..2", False),
        ("1", False),
        ("1.2.3a", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1." + "2" * 63, False),  # 65 characters
        ("", False),
        (None, False),
    ],
)
def test_valid_uid(uid, ok) -> None:
    assert valid_uid(uid) is ok


@pytest.mark.parametrize(
    "sop_class, modality, pixels, expected",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "CT", True, True),
        ("1.2.840.10008.5.1.4.1.1.4.1", "MR", True, True),
        ("1.2.840.10008.5.1.4.1.1.66.4", "SEG", True, False),
        ("1.2.840.10008.5.1.4.1.1.88.22", "SR", False, False),
        ("1.2.840.10008.5.1.4.1.1.88.59", "KO", False, False),
        ("1.2.840.10008.5.1.4.1.1.11.1", "PR", False, False),
        ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", False, False),
        ("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE", True, False),
        ("1.2.840.10008.5.1.4.1.1.2", "SEG", True, False),  # the modality alone says so
    ],
)
def test_is_image(sop_class, modality, pixels, expected) -> None:
    assert is_image(sop_class, modality, pixels) is expected


def test_file_meta_is_what_pydicom_reads() -> None:
    encoded = file_meta("1.2.3", "1.2.3.4", ExplicitVRLittleEndian, "AET1")
    meta = pydicom.dcmread(io.BytesIO(encoded)).file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (
        "1.2.3", "1.2.3.4", ExplicitVRLittleEndian)
    assert meta.SourceApplicationEntityTitle == "AET1"
    assert meta.FileMetaInformationGroupLength == len(encoded) - 144  # preamble, DICM, the length element


# --- storing ------------------------------------------------------------------------------------


def test_part10_is_stored_under_its_uids_and_reads_back_as_the_volume(spool: Spool) -> None:
    series = datasets()
    results = [spool.store(part10(ds), SENDER, session="s1") for ds in series]
    assert [r.status for r in results] == [0, 0, 0, 0]
    first = series[0]
    folder = spool.root / first.StudyInstanceUID / first.SeriesInstanceUID
    assert [r.path for r in results] == [folder / f"{ds.SOPInstanceUID}.dcm" for ds in series]
    assert spool_files(spool) == sorted(r.path for r in results)
    volume = read_series(folder)
    np.testing.assert_array_equal(volume.array, ramp_volume(shape=(4, 8, 10)).array)
    stored = pydicom.dcmread(results[0].path)
    assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY"
    # The dataset bytes are the ones received, untouched.
    assert results[0].path.read_bytes().endswith(split_part10(part10(first))[1])


def test_index_row_has_the_geometry_and_the_sender(spool: Spool) -> None:
    ds = datasets()[2]
    spool.store(part10(ds), SENDER, session="s1")
    row = spool.instance(ds.SOPInstanceUID)
    assert row is not None
    assert row.info.position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert row.info.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert (row.info.instance_number, row.info.images_in_acquisition, row.info.number_of_frames) == (3, 4, 1)
    assert (row.info.modality, row.info.sop_class_uid, row.info.is_image) == ("CT", ds.SOPClassUID, True)
    assert (row.sender, row.session, row.generation) == (SENDER, "s1", 0)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_bare_dataset_in_its_transfer_syntax(spool: Spool, syntax: str) -> None:
    ds = datasets()[0]
    result = spool.store(bare(ds, syntax), SENDER, transfer_syntax=syntax, session="s")
    assert result.ok
    stored = pydicom.dcmread(result.path)
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.PixelData == ds.PixelData


def test_deflated_and_compressed_are_stored_as_they_came(spool: Spool) -> None:
    deflated, compressed = datasets(2)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressed.compress(RLELossless)
    for ds in (deflated, compressed):
        data = part10(ds)
        result = spool.store(data, SENDER, session="s")
        assert result.ok, result.reason
        assert result.path.read_bytes().endswith(split_part10(data)[1])
        assert result.info.transfer_syntax == ds.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(pydicom.dcmread(result.path).pixel_array, compressed.pixel_array)


def test_undefined_length_sequences_are_walked(spool: Spool) -> None:
    ds = datasets(1)[0]
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    nested = Dataset()
    nested.CodeValue = "T-D0050"
    item.ConceptNameCodeSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([item])
    ds.ReferencedImageSequence.is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    assert spool.store(part10(ds), SENDER, session="s").ok


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*VR UI")
@pytest.mark.parametrize(
    "keyword, value",
    [
        ("SOPInstanceUID", "1.2.3.abc"),
        ("SeriesInstanceUID", "../../../../tmp/evil"),
        ("StudyInstanceUID", "1.2." + "3" * 70),
        ("SeriesInstanceUID", None),
    ],
)
def test_invalid_uid_is_refused_and_never_a_path(spool: Spool, keyword: str, value) -> None:
    ds = datasets(1)[0]
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    result = spool.store(bare(ds), SENDER, transfer_syntax=ExplicitVRLittleEndian, session="s")
    assert (result.status, result.ok) == (Status.INVALID_UID, False)
    assert keyword in result.reason
    assert spool_files(spool) == []
    assert not (spool.root.parent / "tmp" / "evil").exists()


def test_truncated_anywhere_is_refused_with_cannot_understand(spool: Spool) -> None:
    data = bare(datasets(1)[0])
    pixel_at = data.index(b"\xe0\x7f\x10\x00")
    for cut in (len(data) - 1, pixel_at + 60, pixel_at + 5, 300, 7):
        result = spool.store(data[:cut], SENDER, transfer_syntax=ExplicitVRLittleEndian, session="s")
        assert result.status == Status.CANNOT_UNDERSTAND, (cut, result)
        assert "truncated" in result.reason
    assert spool_files(spool) == []


def test_image_cut_before_its_pixel_data_does_not_match_its_class(spool: Spool) -> None:
    data = bare(datasets(1)[0])
    cut = data[: data.index(b"\xe0\x7f\x10\x00")]
    result = spool.store(cut, SENDER, transfer_syntax=ExplicitVRLittleEndian, session="s")
    assert result.status == Status.DOES_NOT_MATCH
    assert "no pixel data" in result.reason


def test_encapsulated_pixel_data_without_its_delimiter_is_truncated(spool: Spool) -> None:
    ds = datasets(1)[0]
    ds.compress(RLELossless)
    data = part10(ds)
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    result = spool.store(data[:-8], SENDER, session="s")
    assert result.status == Status.CANNOT_UNDERSTAND


def test_short_pixel_data_does_not_match(spool: Spool) -> None:
    ds = datasets(1)[0]
    ds.PixelData = ds.PixelData[:-20]
    result = spool.store(part10(ds), SENDER, session="s")
    assert result.status == Status.DOES_NOT_MATCH
    assert "pixel data holds 140 bytes" in result.reason


def test_announced_class_or_instance_must_match(spool: Spool) -> None:
    ds = datasets(1)[0]
    data = bare(ds)
    def store(**announced):
        return spool.store(data, SENDER, transfer_syntax=ExplicitVRLittleEndian, session="s", **announced).status

    assert store(sop_class_uid="1.2.840.10008.5.1.4.1.1.4") == Status.DOES_NOT_MATCH
    assert store(sop_instance_uid="1.2.3") == Status.DOES_NOT_MATCH
    assert store(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID) == Status.SUCCESS


def test_not_part10_and_garbage(spool: Spool) -> None:
    assert spool.store(b"hello", SENDER, session="s").status == Status.CANNOT_UNDERSTAND
    assert spool.store(b"\0" * 128 + b"DICM" + b"\x02\x00", SENDER, session="s").status == Status.CANNOT_UNDERSTAND
    result = spool.store(os.urandom(4000), SENDER, transfer_syntax=ExplicitVRLittleEndian, session="s")
    assert result.status in (Status.CANNOT_UNDERSTAND, Status.INVALID_UID)


def test_full_disk_is_out_of_resources(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data", min_free_mb=10**9, journal_mb=8)
    result = spool.store(part10(datasets(1)[0]), SENDER, session="s")
    assert result.status == Status.OUT_OF_RESOURCES
    assert spool_files(spool) == []


def test_write_error_is_out_of_resources_and_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path / "data", journal_mb=0)  # with a journal: see test_journal.py

    def full(fd, buffers):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    result = spool.store(part10(datasets(1)[0]), SENDER, session="s")
    assert result.status == Status.OUT_OF_RESOURCES
    assert "No space left" in result.reason
    assert spool_files(spool) == []


# --- duplicates, index, recovery -----------------------------------------------------------------


def test_duplicates_are_idempotent(spool: Spool) -> None:
    ds = datasets(1)[0]
    first = spool.store(part10(ds), SENDER, session="a")
    second = spool.store(part10(ds), SENDER, session="b")
    assert (first.ok, first.duplicate, second.ok, second.duplicate) == (True, False, True, True)
    assert spool_files(spool) == [first.path]
    assert len(spool.instances(ds.SeriesInstanceUID)) == 1


def test_an_instance_moved_to_another_series_keeps_one_copy(spool: Spool) -> None:
    ds = datasets(1)[0]
    old = spool.store(part10(ds), SENDER, session="a")
    ds.SeriesInstanceUID = "1.2.3.4.5"
    new = spool.store(part10(ds), SENDER, session="b")
    assert new.duplicate and spool_files(spool) == [new.path] and new.path != old.path


def test_handed_on_is_remembered(spool: Spool) -> None:
    series = datasets(3)
    for ds in series:
        spool.store(part10(ds), SENDER, session="a")
    uid = series[0].SeriesInstanceUID
    assert spool.series_uids(pending_only=True) == [uid]
    spool.mark_handed(uid, 1, [ds.SOPInstanceUID for ds in series[:2]])
    assert [r.generation for r in spool.instances(uid)] == [1, 1, 0]
    spool.mark_handed(uid, 1, [series[2].SOPInstanceUID])
    assert spool.series_uids(pending_only=True) == []


def test_reconcile_rebuilds_the_index_from_the_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data", journal_mb=8)
    series = datasets(3)
    paths = [spool.store(part10(ds), SENDER, session="a").path for ds in series]
    spool.mark_handed(series[0].SeriesInstanceUID, 1, [series[0].SOPInstanceUID])
    spool.close()
    # A crash: one file written but never indexed, one temporary file, one row whose file is gone.
    db = sqlite3.connect(spool.root / "index.sqlite")
    db.execute("DELETE FROM instances WHERE sop_uid = ?", (series[1].SOPInstanceUID,))
    db.commit()
    db.close()
    paths[2].unlink()
    temp = paths[0].parent / f".{series[2].SOPInstanceUID}.123.4.tmp"
    temp.write_bytes(b"half a file")
    spool = Spool(tmp_path / "data", journal_mb=8)
    assert spool.reconcile() == {"added": 1, "dropped": 1, "temp_removed": 1, "unreadable": 0}
    assert not temp.exists()
    rows = {r.info.sop_instance_uid: r for r in spool.instances(series[0].SeriesInstanceUID)}
    assert sorted(rows) == sorted(ds.SOPInstanceUID for ds in series[:2])
    assert rows[series[0].SOPInstanceUID].generation == 1
    adopted = rows[series[1].SOPInstanceUID]
    assert (adopted.generation, adopted.session, adopted.sender.via) == (0, "recovered", "file")
    assert adopted.info.position == tuple(float(v) for v in series[1].ImagePositionPatient)
    assert spool.reconcile() == {"added": 0, "dropped": 0, "temp_removed": 0, "unreadable": 0}
    spool.close()


def test_a_damaged_index_is_rebuilt(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data", journal_mb=8)
    ds = datasets(1)[0]
    spool.store(part10(ds), SENDER, session="a")
    spool.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{spool.root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    (spool.root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    spool = Spool(tmp_path / "data", journal_mb=8)
    assert spool.reconcile()["added"] == 1
    assert spool.instance(ds.SOPInstanceUID) is not None
    spool.close()


def test_retention_removes_old_handed_on_series_only(spool: Spool) -> None:
    old, fresh, pending = datasets(2, "old"), datasets(2, "fresh"), datasets(2, "pending")
    for ds in old + fresh + pending:
        spool.store(part10(ds), SENDER, session="a")
    for group in (old, fresh):
        spool.mark_handed(group[0].SeriesInstanceUID, 1, [ds.SOPInstanceUID for ds in group])
    now = spool.instances(old[0].SeriesInstanceUID)[0].received
    with spool._lock:  # age one series by ten days
        spool._db.execute("UPDATE instances SET received = received - 864000 WHERE series_uid IN (?, ?)",
                          (old[0].SeriesInstanceUID, pending[0].SeriesInstanceUID))
    assert purge_older_than(spool, 7, now=now + 1) == [old[0].SeriesInstanceUID]
    assert not (spool.root / old[0].StudyInstanceUID).exists()
    assert spool.instances(old[0].SeriesInstanceUID) == []
    assert len(spool.instances(pending[0].SeriesInstanceUID)) == 2
    assert purge_older_than(spool, 7, now=now + 1, handed_only=False) == [pending[0].SeriesInstanceUID]
    assert len(spool_files(spool)) == 2


def test_remove_series_then_store_again(spool: Spool) -> None:
    ds = datasets(1)[0]
    spool.store(part10(ds), SENDER, session="a")
    assert spool.remove_series(ds.SeriesInstanceUID) == 1
    assert spool_files(spool) == []
    assert spool.store(part10(ds), SENDER, session="b").ok  # the cached folder is made again
    assert len(spool_files(spool)) == 1


# --- the C-STORE SCP's hooks: a file made ahead, the answer before the index ---------------------


def test_a_reserved_file_is_used_in_its_series_and_deleted_elsewhere(spool: Spool) -> None:
    first, second = datasets(2)
    other = datasets(1, seed="other")[0]
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    reserved = spool.reserve(study, series)
    assert [p.name for p in spool_files(spool)] == [reserved.name]  # an empty temporary file
    kwargs = {"transfer_syntax": ExplicitVRLittleEndian, "session": "s"}
    stored = spool.store(memoryview(bytearray(bare(first))), SENDER, reserved=spool.reserve(study, series), **kwargs)
    assert stored.ok
    assert spool_files(spool) == sorted([stored.path, spool.root / study / series / reserved.name])
    elsewhere = spool.store(bare(other), SENDER, reserved=reserved, **kwargs)  # another series: deleted
    assert elsewhere.ok and spool_files(spool) == sorted([stored.path, elsewhere.path])
    refused = spool.store(bare(first)[:-100], SENDER, reserved=spool.reserve(study, series), **kwargs)
    assert refused.status == Status.CANNOT_UNDERSTAND
    assert spool_files(spool) == sorted([stored.path, elsewhere.path])
    reserved = spool.reserve(study, series)
    assert spool.remove_series(series) == 1  # retention removes the folder under the reserved file
    again = spool.store(bare(second), SENDER, reserved=reserved, **kwargs)
    assert again.ok and spool_files(spool) == sorted([elsewhere.path, again.path])
    assert pydicom.dcmread(again.path).PixelData == second.PixelData
    assert spool.reserve("../../etc", series) is None


def test_the_buffer_is_not_kept(spool: Spool) -> None:
    ds = datasets(1)[0]
    buffer = bytearray(bare(ds))
    result = spool.store(memoryview(buffer), SENDER, transfer_syntax=ExplicitVRLittleEndian, session="s")
    buffer[:] = bytes(len(buffer))  # the listener reuses its buffer for the next instance
    assert result.ok and result.path.read_bytes().endswith(bare(ds))


@pytest.mark.parametrize(
    "journal_mb, flushes",
    [(0, ["fsync", "fsync"]), (8, ["fdatasync"])],  # file + folder after the rename, or one journal flush
    ids=["no-journal", "journal"],
)
def test_on_durable_comes_after_the_flushes_and_before_the_index(
    tmp_path: Path, monkeypatch, journal_mb: int, flushes: list[str]
) -> None:
    spool = Spool(tmp_path / "data", journal_mb=journal_mb)
    first, second = datasets(2)
    assert spool.store(part10(first), SENDER, session="s").ok  # the folders exist from here on
    events: list[str] = []

    def counted(name: str, call):
        def flush(fd: int) -> None:
            events.append(name)
            call(fd)

        return flush

    def durable(result) -> None:
        events.append("durable")
        assert result.ok and result.path.read_bytes().endswith(split_part10(part10(second))[1])
        assert spool.instance(second.SOPInstanceUID) is None  # not indexed yet

    monkeypatch.setattr(os, "fsync", counted("fsync", os.fsync))
    monkeypatch.setattr(journal_module, "_fdatasync", counted("fdatasync", journal_module._fdatasync))
    result = spool.store(part10(second), SENDER, session="s", on_durable=durable)
    assert events == [*flushes, "durable"]
    assert result.ok and not result.duplicate and spool.instance(second.SOPInstanceUID) is not None
    calls: list[object] = []
    assert not spool.store(b"not DICOM", SENDER, session="s", on_durable=calls.append).ok
    assert calls == []
    spool.close()


def test_encode_instance_summary_of_a_multiframe_header() -> None:
    ds = datasets(1)[0]
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    info = encode_instance(part10(ds)).info
    assert info.number_of_frames == 2
