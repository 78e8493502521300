"""The outputs beside the SEG, checked with real tools on one pipeline run of the TINY phantom:

* RTSTRUCT: dciodvfy finds no error; read back by segnode's rasteriser and by an independent one
  (skimage.draw.polygon, even-odd) it matches the labels (Dice >= 0.98 per structure over 1 mL, >= 0.9 for
  the smallest); every point lies on its CT slice's plane (0.01 mm); names, colours and codes are the SEG's.
* Measurements SR: dciodvfy finds no error; highdicom reads it back; every volume equals stats.csv
  (0.1 %), every reference resolves to a segment of the run's SEG with that structure's label.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.dicom.seg import parse_seg
from node.pipeline import PipelineRequest, PipelineResult, run_pipeline
from node.phantom import TINY, write_phantom
from node.segment import SegmentRequest

pytestmark = pytest.mark.integration

ALL_OUTPUTS = ("seg", "rtstruct", "sr")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> PipelineResult:
    tmp = tmp_path_factory.mktemp("outputs")
    phantom = write_phantom(TINY, tmp / "phantom")
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]),
                              outputs=ALL_OUTPUTS)
    result = run_pipeline(phantom["dicom"], tmp / "run", request)
    assert result.ok, result.error
    return result


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed: run scripts/setup.sh")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return [x for x in lines if re.search(r"\bError\b", x)], [x for x in lines if "Warning" in x]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_rtstruct_is_valid(run: PipelineResult) -> None:
    errors, warnings = dciodvfy_errors(run.paths["rtstruct"])
    assert errors == [] and warnings == []


def _skimage_masks(path: Path, ct) -> dict[str, np.ndarray]:
    """The independent reader: pydicom + skimage.draw.polygon per contour, combined by XOR."""
    from skimage.draw import polygon

    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    k_of = {uid: k for k, uid in enumerate(ct.source.instance_uids)}
    inverse = np.linalg.inv(ct.geometry.affine)
    out = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(ct.array.shape, bool)
        for c in roi.ContourSequence:
            xyz = np.asarray(c.ContourData, float).reshape(-1, 3)
            ijk = np.column_stack([xyz, np.ones(len(xyz))]) @ inverse.T
            k = k_of[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
            rr, cc = polygon(ijk[:, 1], ijk[:, 0], mask.shape[1:])
            one = np.zeros(mask.shape[1:], bool)
            one[rr, cc] = True
            mask[k] ^= one
        out[names[int(roi.ReferencedROINumber)]] = mask
    return out


def test_rtstruct_reads_back_as_the_labels(run: PipelineResult) -> None:
    from node.dicom.rtstruct import read_rtstruct

    labels, ct = run.labels, run.ct
    voxel_ml = float(np.prod(labels.geometry.spacing)) / 1000
    ours, theirs = read_rtstruct(run.paths["rtstruct"], ct), _skimage_masks(run.paths["rtstruct"], ct)
    assert set(ours) == set(theirs) == {c.name for c in labels.classes.values()}
    sizes = {c.name: int((labels.array == i).sum()) for i, c in labels.classes.items()}
    smallest = min(sizes, key=sizes.get)
    for i, c in labels.classes.items():
        truth = labels.array == i
        for reader, masks in (("segnode", ours), ("skimage", theirs)):
            d = dice(masks[c.name], truth)
            if sizes[c.name] * voxel_ml > 1:
                assert d >= 0.98, (reader, c.name, d)
            if c.name == smallest:
                assert d >= 0.9, (reader, c.name, d)
        assert dice(ours[c.name], truth) >= 0.999, c.name  # the even-odd pixel-centre rule: (nearly) exact


def test_rtstruct_contours_lie_on_their_slices_and_carry_the_seg_s_names_and_colours(run: PipelineResult) -> None:
    ds = pydicom.dcmread(run.paths["rtstruct"])
    geometry, identity = run.ct.geometry, run.ct.source
    normal = geometry.affine[:3, 2] / np.linalg.norm(geometry.affine[:3, 2])
    plane = {uid: geometry.affine[:3, 3] + geometry.affine[:3, 2] * k for k, uid in enumerate(identity.instance_uids)}
    seen = set()
    for roi in ds.ROIContourSequence:
        for c in roi.ContourSequence:
            ref = c.ContourImageSequence[0]
            assert ref.ReferencedSOPClassUID == identity.sop_class_uid
            xyz = np.asarray(c.ContourData, float).reshape(-1, 3)
            assert np.abs((xyz - plane[ref.ReferencedSOPInstanceUID]) @ normal).max() <= 0.01
            seen.add(ref.ReferencedSOPInstanceUID)
    assert seen <= set(identity.instance_uids) and len(seen) > 1
    segments = parse_seg(run.paths["seg"]).segments
    by_name = {s.label: s for s in segments.values()}
    rois = {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence}
    for roi in ds.ROIContourSequence:
        name = rois[int(roi.ReferencedROINumber)]
        assert tuple(roi.ROIDisplayColor) == tuple(run.labels.classes[by_name[name].label_id].color)
    for obs in ds.RTROIObservationsSequence:
        name = rois[int(obs.ReferencedROINumber)]
        assert obs.RTROIInterpretedType == "ORGAN"
        code = obs.RTROIIdentificationCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == (by_name[name].type.value, by_name[name].type.scheme)
    assert ds.StudyInstanceUID == identity.study_uid
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == identity.frame_of_reference_uid


def test_sr_is_valid_and_its_measurements_are_the_stats_citing_the_seg(run: PipelineResult) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    errors, _ = dciodvfy_errors(run.paths["sr"])
    assert errors == []
    sr = hd.sr.srread(run.paths["sr"])
    assert sr.SOPClassUID == hd.sr.Comprehensive3DSR.__init__.__globals__.get("Comprehensive3DSRStorage",
                                                                              "1.2.840.10008.5.1.4.1.1.88.34")
    seg = pydicom.dcmread(run.paths["seg"], stop_before_pixels=True)
    segments = parse_seg(run.paths["seg"]).segments
    with open(run.paths["stats"], newline="") as f:
        stats = {r["name"]: r for r in csv.DictReader(f)}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(stats)
    for group in groups:
        name = str(group.tracking_identifier)
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        assert segments[number].label == name
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "mL"
        assert volume.value == pytest.approx(float(stats[name]["volume_ml"]), rel=1e-3)
        hu = {m.derivation.meaning: m.value for m in group.get_measurements(name=codes.DCM.AttenuationCoefficient)}
        assert hu == {"Mean": pytest.approx(float(stats[name]["mean_hu"])),
                      "Standard Deviation": pytest.approx(float(stats[name]["std_hu"]))}
    assert sr.StudyInstanceUID == seg.StudyInstanceUID


def test_sr_carries_the_split_qc(run: PipelineResult, tmp_path: Path) -> None:
    import highdicom as hd

    from node.dicom.sr import write_sr

    qc = {"portal_voxels": 437, "hepatic_voxels": 492, "unassigned_voxels": 3, "total_vessel_voxels": 932,
          "portal_fraction": 0.468884, "hepatic_fraction": 0.527897, "unassigned_fraction": 0.003219,
          "warnings": []}
    path = write_sr(run.paths["seg"], run.report["structures"], run.labels.classes, tmp_path / "sr.dcm", split_qc=qc)
    assert dciodvfy_errors(path)[0] == []
    (group,) = hd.sr.srread(path).content.get_image_measurement_groups()
    figures = {m.name.value: m.value for m in group.get_measurements()}
    assert figures == {k: pytest.approx(v) for k, v in qc.items() if k != "warnings"}
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.value == "passed"
