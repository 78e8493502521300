"""The patient and study modules of derived objects (PS3.3 C.7.1.1, C.7.2.1): Type 2 attributes present,
empty where the source has none; what the source has copied; SEGs of anonymised series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.classes import LabelClass, LabelVolume
from node.dicom.modules import TYPE2, node_equipment, patient_study, with_patient_study
from node.dicom.seg import SegOptions, build_seg
from node.dicom.series import load_series
from node.dicom.writer import SeriesInfo, series_datasets
from node.volume import Geometry, Volume

#: What anonymisers and research exports commonly leave out (all Type 2 in the Patient / General Study modules).
STRIPPED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
            "StudyDate", "StudyTime", "ReferringPhysicianName")


def _series(tmp_path: Path, edit) -> Path:
    ct = Volume(np.full((4, 16, 16), 40, np.int16), Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0)))
    folder = tmp_path / "ct"
    folder.mkdir()
    for k, ds in enumerate(series_datasets(ct, SeriesInfo(uid_seed="modules"))):
        edit(ds)
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    return folder


def _strip(ds: pydicom.Dataset) -> None:
    for keyword in STRIPPED:
        delattr(ds, keyword)


def test_type2_set_is_the_standards() -> None:
    assert set(TYPE2) == set(STRIPPED)


def test_patient_study_adds_missing_type2_empty_and_copies_what_is_there() -> None:
    source = pydicom.Dataset()
    source.StudyInstanceUID = "1.2.3"
    source.PatientAge = "042Y"  # Patient Study module, Type 3
    source.StudyDescription = "abdomen"
    source.PatientSex = "MALE"  # not an enumerated value: written empty
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        source.StudyDate = "2026-13-45"  # no date
    source.SeriesDescription = "not a patient/study attribute"
    source.add_new("AccessionNumber", "SH", "A" * 20)  # SH holds 16: Type 2, written empty
    source.add_new("StudyID", "SH", "7")
    source.add_new("PatientWeight", "LO", "71.5")  # sent with another VR: written with the dictionary's
    source.add_new("MedicalAlerts", "LO", "x" * 80)  # LO holds 64: Type 3, left out
    out = patient_study(source)
    assert {k: out[k].value for k in TYPE2} == dict.fromkeys(TYPE2, "") | {"StudyID": "7"}
    assert (out["PatientWeight"].VR, out.PatientWeight, "MedicalAlerts" in out) == ("DS", 71.5, False)
    assert (out.StudyInstanceUID, out.PatientAge, out.StudyDescription) == ("1.2.3", "042Y", "abdomen")
    assert "SeriesDescription" not in out
    stand_in = with_patient_study(source)
    assert stand_in.SeriesDescription == "not a patient/study attribute" and stand_in.PatientBirthDate == ""
    assert "PatientBirthDate" not in source and source.PatientSex == "MALE"  # the source is unchanged
    assert node_equipment().Manufacturer == "segnode"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_seg_of_a_series_without_type2_attributes(tmp_path: Path, fast: bool) -> None:
    """The anonymised series of issue 16 item 1: highdicom read ``PatientBirthDate`` and failed."""
    volume, headers = load_series(_series(tmp_path, _strip))
    array = np.zeros(volume.array.shape, np.uint8)
    array[1:3, 4:10, 4:10] = 1
    labels = LabelVolume(array, volume.geometry, source=volume.source, classes={1: LabelClass(1, "liver")})
    seg = build_seg(labels, headers, options=SegOptions(fast=fast))
    assert {k: seg[k].value for k in TYPE2} == dict.fromkeys(TYPE2, "")
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert int(seg.NumberOfFrames) == 2
    assert all("PatientBirthDate" not in ds for ds in headers)


def test_seg_copies_the_sources_patient_and_study(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset) -> None:
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "19700102", "F", "ACC42"
        ds.PatientAge, ds.PatientWeight = "056Y", "71"

    volume, headers = load_series(_series(tmp_path, edit))
    array = np.zeros(volume.array.shape, np.uint8)
    array[2, 3:6, 3:6] = 1
    seg = build_seg(LabelVolume(array, volume.geometry, source=volume.source), headers)
    assert (seg.PatientName, seg.PatientID, seg.PatientBirthDate, seg.PatientSex) == (
        "Phantompatient^Nobody", "SEGNODE-PHANTOM", "19700102", "F")
    assert (seg.AccessionNumber, seg.StudyID, seg.PatientAge, seg.PatientWeight) == ("ACC42", "1", "056Y", 71)
