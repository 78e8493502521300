"""Contours of label masks (node.dicom.contours) and the RTSTRUCT they make (node.dicom.rtstruct):
exact round trips through the even-odd rule, holes and islands, the simplification tolerance, and the
RT ROI Interpreted Type of TotalSegmentator's names."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from node.classes import Code, LabelClass, LabelVolume
from node.dicom.contours import rasterise, simplify, trace, trace_slice
from node.dicom.rtstruct import RtStructError, RtStructOptions, interpreted_type, read_rtstruct, write_rtstruct
from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo, write_series
from node.volume import Geometry, Volume


def rings() -> np.ndarray:
    """One slice: a ring (a hole) with an island in the hole, and a separate blob."""
    yy, xx = np.mgrid[:80, :90]
    d = np.hypot(yy - 40, xx - 40)
    return ((d < 30) & (d > 15)) | (d < 6) | (np.hypot(yy - 10, xx - 80) < 5)


def test_traced_contours_rasterise_back_exactly_without_simplification() -> None:
    rng = np.random.default_rng(3)
    for n in range(60):
        mask = rng.random((1, 24, 31)) > 0.5 if n % 2 else ndimage.binary_opening(rng.random((1, 40, 40)) > 0.4)
        polys = trace(mask, 0).get(0, [])
        assert np.array_equal(rasterise(polys, mask.shape[1:]), mask[0]), n


def test_holes_and_islands_are_separate_contours_combined_by_the_even_odd_rule() -> None:
    mask = rings()
    polys = trace_slice(mask)
    assert len(polys) == 4  # ring outside, ring inside (the hole), the island in the hole, the blob
    for tolerance in (0.0, 0.3, 0.4):
        simplified = trace(mask[None], tolerance)[0]
        assert len(simplified) == 4
        assert np.array_equal(rasterise(simplified, mask.shape), mask), tolerance
    # The hole alone is a hole: the outer ring without it fills the hole and its island.
    outer = max(polys, key=len)
    assert rasterise([outer], mask.shape).sum() > mask.sum()


def test_simplification_keeps_every_traced_point_within_the_tolerance() -> None:
    mask = rings()
    for tolerance in (0.25, 0.4, 0.5):
        for full, simple in zip(trace_slice(mask), simplify(trace_slice(mask), tolerance)):
            assert len(simple) < len(full)
            a, b = simple, np.roll(simple, -1, axis=0)
            ab = b - a
            ap = full[:, None, :] - a[None]
            t = np.clip((ap * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
            distance = np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(axis=1)
            assert distance.max() <= tolerance + 1e-9


def test_interpreted_types_by_name_with_overrides() -> None:
    def kind(name: str, **over: str) -> str:
        return interpreted_type(LabelClass(1, name), over)

    assert [kind(n) for n in ("liver", "spinal_cord", "body", "skin", "lung_tumor", "ptv_high", "ctv",
                              "gtv_primary", "table", "kidney_cyst_left")] == [
        "ORGAN", "ORGAN", "EXTERNAL", "EXTERNAL", "GTV", "PTV", "CTV", "GTV", "SUPPORT", "ORGAN"]
    assert kind("liver", liver="AVOIDANCE") == "AVOIDANCE"
    with pytest.raises(RtStructError, match="tolerance_px"):
        RtStructOptions(tolerance_px=0.8)
    with pytest.raises(RtStructError, match="Interpreted"):
        RtStructOptions(interpreted_types={"liver": "LIVER"})


def test_rtstruct_of_an_oblique_grid_round_trips_with_points_on_the_slice_planes(tmp_path) -> None:
    """Holes, islands and two structures on a grid tilted about two axes: read back exactly, every
    contour on its instance's plane (0.01 mm) and referencing it."""
    import pydicom

    from tests.unit.test_series import oblique_direction

    array = np.zeros((6, 80, 90), np.uint8)
    array[1:5][:, rings()] = 1
    array[2:4, 60:75, 5:20] = 2
    geometry = Geometry(origin=(-30.5, 12.25, 100.0), spacing=(0.7, 0.9, 2.5), direction=oblique_direction())
    write_series(Volume(np.zeros(array.shape, np.int16), geometry), tmp_path / "ct", SeriesInfo(uid_seed="rt"))
    ct = read_series(tmp_path / "ct")
    classes = {1: LabelClass(1, "liver", (221, 130, 101), "Abdominal", property_type=Code("10200004", "SCT", "Liver")),
               2: LabelClass(2, "lung_tumor", (200, 40, 40))}
    labels = LabelVolume(array, ct.geometry, source=ct.source, classes=classes)
    header = pydicom.dcmread(sorted((tmp_path / "ct").iterdir())[0], stop_before_pixels=True)
    path = write_rtstruct(labels, header, tmp_path / "rt.dcm", RtStructOptions(uid_seed="job-1"))
    masks = read_rtstruct(path, ct)
    assert np.array_equal(masks["liver"], array == 1) and np.array_equal(masks["lung_tumor"], array == 2)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert ds.SOPInstanceUID == pydicom.dcmread(write_rtstruct(labels, header, tmp_path / "again.dcm",
                                                               RtStructOptions(uid_seed="job-1"))).SOPInstanceUID
    planes = {}
    for k, uid in enumerate(ct.source.instance_uids):
        planes[uid] = (np.asarray(ct.geometry.affine[:3, :3] @ [0, 0, k] + ct.geometry.affine[:3, 3]),
                       ct.geometry.affine[:3, 2] / np.linalg.norm(ct.geometry.affine[:3, 2]))
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "lung_tumor"]
    assert [list(r.ROIDisplayColor) for r in ds.ROIContourSequence] == [[221, 130, 101], [200, 40, 40]]
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["ORGAN", "GTV"]
    code = ds.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("10200004", "SCT")
    counts = []
    for roi in ds.ROIContourSequence:
        counts.append(len(roi.ContourSequence))
        for c in roi.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            xyz = np.asarray(c.ContourData, float).reshape(-1, 3)
            assert len(xyz) == c.NumberOfContourPoints
            origin, normal = planes[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
            assert np.abs((xyz - origin) @ normal).max() < 0.01
    assert counts == [4 * 4, 2]  # 4 contours (outer, hole, island in it, blob) on 4 slices; 1 on 2
