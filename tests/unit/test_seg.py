"""DICOM-SEG: the writer (fast path against highdicom's plain use), the one reader, the pipeline's
``seg`` output and ``segnode seg``; on the phantom and on public SEGs from dcmqi and highdicom.

Sample data: ../shared/data (see its README): dcmqi (BSD-3), highdicom (MIT), pydicom (MIT).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node import __version__
from node.classes import Code, LabelClass, LabelVolume
from node.dicom.codes import DERIVED_CODES, GENERIC_STRUCTURE, rgb_to_cielab, segment_codes
from node.dicom.seg import (
    SegError,
    SegOptions,
    build_seg,
    describe_seg,
    parse_seg,
    place_frames,
    read_seg,
    read_seg_masks,
    seg_grid,
    source_grid,
    write_seg,
)
from node.dicom.series import read_series
from node.nifti import read_nifti, write_nifti
from node.phantom import TINY, write_phantom
from node.pipeline import PipelineRequest, run_pipeline
from node.rules import OWN_MANUFACTURER
from node.segment import SegmentRequest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not here")
#: Attributes that differ between two runs of highdicom itself (creation times, a fresh UID).
VOLATILE = {"InstanceCreationTime", "ContributionDateTime", "DimensionOrganizationUID", "PixelData"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_phantom(TINY, tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def run(phantom, tmp_path_factory):
    """The pipeline on the phantom: the labelmap engine gives the exact ground truth, then ``seg``."""
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]),
                              outputs=("seg",))
    result = run_pipeline(phantom["dicom"], tmp_path_factory.mktemp("run"), request)
    assert result.ok, result.error
    return result


@pytest.fixture(scope="module")
def ct(phantom):
    return read_series(phantom["dicom"])


def with_source(result) -> LabelVolume:
    """A run's labels with the identity of its CT (as the output stage gives them to the writer)."""
    return LabelVolume(result.labels.array, result.labels.geometry, source=result.ct.source,
                       classes=result.labels.classes)


def label_lut(seg_path: Path) -> np.ndarray:
    """Segment number -> label id, from the SEG's own table."""
    lut = np.zeros(65536, np.uint16)
    for s in parse_seg(seg_path).segments.values():
        lut[s.number] = s.label_id
    return lut


def highdicom_labels(seg_path: Path, uids: list[str]) -> np.ndarray:
    """highdicom's own decoding, per source instance, as label ids."""
    seg = hd.seg.segread(seg_path)
    numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    return label_lut(seg_path)[numbers]


def differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Attribute paths where two datasets differ (recursing into sequences), volatile ones aside."""
    out = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        if tag not in a or tag not in b:
            out.append(f"{path}{tag} only in {'b' if tag not in a else 'a'}")
            continue
        x, y = a[tag], b[tag]
        if x.keyword in VOLATILE:
            continue
        if x.VR == "SQ":
            if len(x.value) != len(y.value):
                out.append(f"{path}{x.keyword}: {len(x.value)} vs {len(y.value)} items")
                continue
            for n, (i, j) in enumerate(zip(x.value, y.value)):
                out.extend(differences(i, j, f"{path}{x.keyword}[{n}]."))
        elif x.value != y.value or x.VR != y.VR:
            out.append(f"{path}{x.keyword}: {x.value!r:.60} vs {y.value!r:.60}")
    return out


def assert_same_as_highdicom(labels: LabelVolume, source, tmp_path: Path, **options) -> pydicom.Dataset:
    """The fast path and highdicom's plain use write the same object (same UIDs and dates given)."""
    fixed = {"series_uid": "1.2.826.0.1.3680043.8.498.1", "sop_uid": "1.2.826.0.1.3680043.8.498.2",
             "content_date": "20260101", "content_time": "120000"}
    fast = write_seg(labels, source, tmp_path / "fast.dcm", options=SegOptions(**fixed, **options))
    plain = write_seg(labels, source, tmp_path / "plain.dcm",
                      options=SegOptions(**fixed, **options, fast=False))
    a, b = pydicom.dcmread(fast), pydicom.dcmread(plain)
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    assert differences(a, b) == []
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    if not a.file_meta.TransferSyntaxUID.is_encapsulated:  # bytes beyond the last frame's bits are padding
        used = int(a.NumberOfFrames) * int(a.Rows) * int(a.Columns) * int(a.BitsAllocated) // 8
        assert a.PixelData[:used] == b.PixelData[:used] and len(a.PixelData) == len(b.PixelData)
    return a


# --- the pipeline's SEG on the phantom ---------------------------------------------------------


def test_pipeline_writes_a_binary_seg_that_reads_back_exactly(run, ct, phantom) -> None:
    seg_path = run.paths["seg"]
    assert seg_path == run.outdir / "seg.dcm" and run.report["outputs"]["seg"] == "seg.dcm"
    qc = run.report["qc"]["seg"]
    labels = run.labels
    assert (qc["type"], qc["segments"], qc["version"], qc["series_number"]) == ("BINARY", 21, 1, 1001)
    ours = read_seg(seg_path, phantom["dicom"])
    np.testing.assert_array_equal(ours.array, labels.array)
    assert ours.geometry.same_grid(labels.geometry)
    assert ours.notes == ["413 frame(s) placed by referenced SOP instance"]
    assert {i: (c.name, c.color) for i, c in ours.classes.items()} == {
        i: (c.name, c.color) for i, c in labels.classes.items()}
    np.testing.assert_array_equal(read_seg(seg_path, ct).array, labels.array)  # a Volume as the source
    np.testing.assert_array_equal(highdicom_labels(seg_path, list(ct.source.instance_uids)), labels.array)
    # Frame count: one per segment and slice it is on; none empty.
    per_segment = sum(int((labels.array == i).any(axis=(1, 2)).sum()) for i in labels.classes)
    assert qc["frames"] == per_segment == 413


def test_seg_attributes_references_and_marker(run, ct) -> None:
    ds = pydicom.dcmread(run.paths["seg"])
    source = ct.source
    assert (ds.Modality, ds.SOPClassUID, ds.SegmentationType) == (
        "SEG", "1.2.840.10008.5.1.4.1.1.66.4", "BINARY")
    assert ds.Manufacturer == OWN_MANUFACTURER and "DERIVED" in ds.ImageType
    assert ds["ContentCreatorName"].value in ("", None)  # type 2: present, empty (nobody corrected it)
    assert ds.FrameOfReferenceUID == source.frame_of_reference_uid
    assert ds.StudyInstanceUID == source.study_uid and ds.SeriesInstanceUID != source.series_uid
    assert (ds.Rows, ds.Columns) == (64, 64)  # full size, never cropped
    assert (ds.SeriesNumber, ds.SeriesDescription) == (1001, "segnode SEG v1 Phantom CT portal venous")
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.series_uid
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence) == sorted(
        source.instance_uids)
    k_of = {uid: k for k, uid in enumerate(source.instance_uids)}
    for item in ds.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   ct.geometry.slice_origin(k_of[uid]), atol=1e-4)
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("segnode", __version__)
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


def test_segment_codes_and_colours(run) -> None:
    ds = pydicom.dcmread(run.paths["seg"])
    by_name = {s.SegmentLabel: s for s in ds.SegmentSequence}
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == list(range(1, 22))

    def codes(item):
        t = item.SegmentedPropertyTypeCodeSequence[0]
        modifier = t.get("SegmentedPropertyTypeModifierCodeSequence")
        return (item.SegmentedPropertyCategoryCodeSequence[0].CodeValue, t.CodeValue,
                modifier[0].CodeValue if modifier else None,
                item.AnatomicRegionSequence[0].CodeValue if "AnatomicRegionSequence" in item else None)

    assert codes(by_name["liver"]) == ("123037004", "10200004", None, None)
    assert codes(by_name["kidney_left"]) == ("123037004", "64033007", "7771000", None)  # Kidney, Left
    assert codes(by_name["portal_vein_branches"]) == ("123037004", "32764006", None, "10200004")
    assert codes(by_name["hepatic_veins"]) == ("123037004", "8993003", None, "10200004")
    assert list(by_name["hepatic_veins"].RecommendedDisplayCIELabValue) == list(rgb_to_cielab((0, 190, 225)))
    assert int(by_name["hepatic_veins"][0x0063, 0x1001].value) == 202  # the label id, private
    assert by_name["hepatic_veins"][0x0063, 0x0010].value == "segnode"


def test_codes_for_derived_and_unknown_classes() -> None:
    assert segment_codes(LabelClass(201, "portal_vein_branches")).type.value == "32764006"
    assert segment_codes(LabelClass(7, "enhanced_vessels")).type.value == "59820001"
    assert DERIVED_CODES["hepatic_veins"].type.value == "8993003"
    unknown = segment_codes(LabelClass(9, "label_9"))
    assert (unknown.category.value, unknown.type) == ("123037004", GENERIC_STRUCTURE)
    assert segment_codes(LabelClass(9, "odd_vessel", category="Vessel")).type.value == "59820001"
    own = segment_codes(LabelClass(9, "kidney_left", property_type=Code("64033007", "SCT", "Kidney")))
    assert own.type_modifier.value == "7771000"  # the mapping's modifier, as the types agree


# --- fast path == highdicom's plain use -------------------------------------------------------


def test_fast_path_writes_what_highdicom_writes(run, phantom, tmp_path) -> None:
    labels = with_source(run)
    assert_same_as_highdicom(labels, phantom["dicom"], tmp_path)
    single = LabelVolume(np.where(labels.array == 5, 5, 0).astype(np.uint8), labels.geometry,
                         source=labels.source, classes=labels.classes)
    ds = assert_same_as_highdicom(single, phantom["dicom"], tmp_path)  # one segment: shared identification
    assert ds.DimensionOrganizationType == "3D"
    lm = assert_same_as_highdicom(labels, phantom["dicom"], tmp_path, segmentation_type="LABELMAP")
    assert lm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and int(lm.NumberOfFrames) == 40
    rle = assert_same_as_highdicom(labels, phantom["dicom"], tmp_path, segmentation_type="LABELMAP",
                                   compression="RLE")
    assert rle.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    for path in ("fast.dcm",):
        np.testing.assert_array_equal(read_seg(tmp_path / path, phantom["dicom"]).array, labels.array)


def test_labelmap_numbers_segments_1_to_n_and_describes_its_background_last(run, phantom) -> None:
    """Pixel value n is the n-th SegmentSequence item's segment n (OHIF's adapter reads the items by
    position); the background, pixel value 0 (Pixel Padding Value), is described by the last item."""
    labels = with_source(run)
    ds = build_seg(labels, phantom["dicom"], options=SegOptions(segmentation_type="LABELMAP"))
    ids = labels.present_ids()
    assert (ds.SegmentationType, ds.PixelPaddingValue, ds.BitsAllocated) == ("LABELMAP", 0, 8)
    items = list(ds.SegmentSequence)
    assert [int(s.SegmentNumber) for s in items] == [*range(1, len(ids) + 1), 0]
    assert [int(s[0x0063, 0x1001].value) for s in items[:-1]] == ids  # ascending label id
    background = items[-1]
    assert (background.SegmentLabel, background.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
        "Background", "125040")  # DCM Background
    numbers = np.zeros(max(ids) + 1, np.uint8)
    numbers[ids] = range(1, len(ids) + 1)
    k_of = {uid: k for k, uid in enumerate(labels.source.instance_uids)}
    ks = [k_of[i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
          for i in ds.PerFrameFunctionalGroupsSequence]
    assert sorted(ks) == list(range(labels.array.shape[0]))  # every slice holds a label
    np.testing.assert_array_equal(ds.pixel_array, numbers[labels.array[ks]])
    back = read_seg(ds, phantom["dicom"])
    np.testing.assert_array_equal(back.array, labels.array)
    assert {i: c.name for i, c in back.classes.items()} == {i: labels.classes[i].name for i in ids}


def odd_grid_labels(rows: int, cols: int, n_classes: int, tmp_path: Path) -> tuple[LabelVolume, Path]:
    """A CT series of ``rows`` x ``cols`` x 4 and labels with ``n_classes`` stripes on every slice."""
    from node.dicom.writer import SeriesInfo, write_series
    from node.volume import Geometry, Volume

    ct = Volume(np.zeros((4, rows, cols), np.int16),
                Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0)))
    folder = tmp_path / f"ct-{rows}x{cols}"
    write_series(ct, folder, SeriesInfo(uid_seed=f"odd grid {rows}x{cols}"))
    ct = read_series(folder)
    array = np.zeros(ct.array.shape, np.uint8)
    for n in range(n_classes):
        array[:, :, n * cols // n_classes: (n + 1) * cols // n_classes] = n + 1
    array[:, :2] = 0
    classes = {n: LabelClass(n, f"structure_{n}") for n in range(1, n_classes + 1)}
    return LabelVolume(array, ct.geometry, source=ct.source, classes=classes), folder


@pytest.mark.parametrize(("rows", "cols", "n_classes", "kind"), [
    (64, 64, 3, "BINARY"),      # whole-byte frames, few segments per plane
    (13, 7, 3, "LABELMAP"),     # 91 pixels: BINARY frames would start inside a byte
    (127, 127, 3, "LABELMAP"),
    (16, 40, 20, "LABELMAP"),   # 20 segments on every plane: LABELMAP is 8/20 of BINARY's pixel data
    (16, 40, 15, "BINARY"),     # 15: LABELMAP would be 8/15 of BINARY, over half
])
def test_auto_takes_labelmap_for_unaligned_frames_and_many_segments(rows, cols, n_classes, kind,
                                                                    tmp_path) -> None:
    labels, folder = odd_grid_labels(rows, cols, n_classes, tmp_path)
    ds = build_seg(labels, folder)
    assert ds.SegmentationType == kind
    np.testing.assert_array_equal(read_seg(ds, folder).array, labels.array)
    forced = build_seg(labels, folder, options=SegOptions(segmentation_type="BINARY"))  # asked: as asked
    assert forced.SegmentationType == "BINARY"


@needs_data
@pytest.mark.parametrize("source", ["image", "multiframe"])
def test_fast_path_odd_sizes_and_multiframe_sources(source, tmp_path) -> None:
    """23 x 38 frames (not whole bytes: BINARY frames run on across byte boundaries) on single-frame
    and enhanced multi-frame sources."""
    import SimpleITK as sitk

    folder = DATA / "dcmqi" / "synthetic_23x38x3"
    ct = read_series(folder / source)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nrrd" / "label.nrrd"))).astype(np.uint8)
    array[:, :5, :7] = 3
    array[1, 10:12, 3:9] = 7
    classes = {1: LabelClass(1, "liver"), 3: LabelClass(3, "spleen"), 7: LabelClass(7, "lesion")}
    labels = LabelVolume(array, ct.geometry, source=ct.source, classes=classes)
    datasets = [pydicom.dcmread(p) for p in sorted((folder / source).iterdir())]
    before = copy.deepcopy(datasets)
    for kind in ("BINARY", "LABELMAP"):
        ds = assert_same_as_highdicom(labels, datasets, tmp_path, segmentation_type=kind)
        back = read_seg(ds, ct)
        np.testing.assert_array_equal(back.array, array)
        if source == "multiframe":
            numbers = {int(i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                       for i in ds.PerFrameFunctionalGroupsSequence}
            assert numbers == {1, 2, 3}
    assert [d == b for d, b in zip(datasets, before)] == [True] * len(datasets)  # sources left alone


def test_writer_refuses_what_it_cannot_write(run, phantom, tmp_path) -> None:
    labels = run.labels
    empty = LabelVolume(np.zeros_like(labels.array), labels.geometry, source=run.ct.source)
    with pytest.raises(SegError, match="nothing to write") as info:
        write_seg(empty, phantom["dicom"], tmp_path / "x.dcm")
    assert info.value.code == "empty"
    from dataclasses import replace

    moved = replace(labels.geometry, origin=(0.0, 0.0, 0.0))
    shifted = LabelVolume(labels.array, moved, classes=labels.classes)
    with pytest.raises(SegError, match="is not a slice of the labels' grid") as info:
        write_seg(shifted, phantom["dicom"], tmp_path / "x.dcm")
    assert info.value.code == "source_mismatch" and not (tmp_path / "x.dcm").exists()
    with pytest.raises(SegError, match="unknown SEG option"):
        SegOptions.from_mapping({"tpye": "BINARY"})
    with pytest.raises(SegError, match="RLE is offered for LABELMAP only"):
        SegOptions(segmentation_type="BINARY", compression="rle")
    assert SegOptions.from_mapping({"type": "labelmap", "compression": "rle"}).segmentation_type == "LABELMAP"
    assert SegOptions(compression="rle").segmentation_type == "LABELMAP"  # AUTO with RLE: LABELMAP
    with pytest.raises(SegError, match="must be AUTO, BINARY or LABELMAP"):
        SegOptions(segmentation_type="FRACTIONAL")


def test_superseding_version_is_a_new_series(run, phantom, tmp_path) -> None:
    labels = with_source(run)
    first = build_seg(labels, phantom["dicom"])
    second = build_seg(labels, phantom["dicom"], options=SegOptions(version=2, algorithm_type="SEMIAUTOMATIC",
                                                                      content_creator="Doe^Jane"))
    assert (first.SeriesNumber, second.SeriesNumber) == (1001, 2001)
    assert second.SeriesDescription == "segnode SEG v2 Phantom CT portal venous"
    assert second.SeriesInstanceUID != first.SeriesInstanceUID
    assert second.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert second.ContentCreatorName == "Doe^Jane"
    given = build_seg(labels, phantom["dicom"],
                      options=SegOptions(series_number=77, series_description="edit"))
    assert (given.SeriesNumber, given.SeriesDescription) == (77, "edit")


# --- the reader on the phantom's SEG, changed the ways vendor SEGs differ ------------------------


def reencode(ds: Dataset, order: list[int] | None = None) -> Dataset:
    """``ds`` with its frames in ``order`` (pixels and per-frame groups together), BINARY re-packed."""
    ds = copy.deepcopy(ds)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    order = list(range(len(frames))) if order is None else order
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    ds.PixelData = pydicom.pixels.utils.pack_bits(frames[order].ravel())
    return ds


def test_reader_tolerates_shuffled_frames_missing_codes_and_another_frame_of_reference(run, ct,
                                                                                      phantom) -> None:
    original = pydicom.dcmread(run.paths["seg"])
    expected = run.labels.array
    order = list(np.random.default_rng(0).permutation(int(original.NumberOfFrames)))
    shuffled = reencode(original, order)
    np.testing.assert_array_equal(read_seg(shuffled, ct).array, expected)

    vendor = copy.deepcopy(original)
    for item in vendor.SegmentSequence:
        del item.SegmentedPropertyCategoryCodeSequence
    back = read_seg(vendor, phantom["dicom"])
    np.testing.assert_array_equal(back.array, expected)
    assert "segment(s) [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21] lack " \
           "SegmentedPropertyCategoryCodeSequence" in back.notes
    assert back.classes[5].property_category is None and back.classes[5].property_type.value == "10200004"

    other = copy.deepcopy(original)
    other.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.99"
    back = read_seg(other, ct)
    np.testing.assert_array_equal(back.array, expected)
    assert back.notes[0].startswith("the SEG's FrameOfReferenceUID 1.2.826.0.1.3680043.8.498.99 differs")
    assert "413 frame(s) placed by referenced SOP instance" in back.notes
    for item in other.PerFrameFunctionalGroupsSequence:  # no references either: positions alone
        del item.DerivationImageSequence
    back = read_seg(other, ct)
    np.testing.assert_array_equal(back.array, expected)
    assert "413 frame(s) placed by ImagePositionPatient projected on the grid's slice normal" in back.notes


def test_reader_places_cropped_frames_and_undescribed_segments(run, ct, phantom, tmp_path) -> None:
    """Frames cropped in-plane (pydicom-seg's ``inplane_cropping``) go where their positions say; a SEG
    without SegmentSequence still gives its segments (numbers as ids); a folder with another series
    beside the source picks the series the SEG references."""
    original = pydicom.dcmread(run.paths["seg"])
    j0, i0, rows, cols = 10, 5, 40, 50
    cropped = copy.deepcopy(original)
    frames = original.pixel_array.reshape(-1, 64, 64)[:, j0:j0 + rows, i0:i0 + cols]
    d, spacing = ct.geometry.direction_matrix, ct.geometry.spacing
    shift = i0 * spacing[0] * d[:, 0] + j0 * spacing[1] * d[:, 1]
    for item in cropped.PerFrameFunctionalGroupsSequence:
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]) + shift
        item.PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6f}" for v in position]
    cropped.Rows, cropped.Columns = rows, cols
    cropped.PixelData = pydicom.pixels.utils.pack_bits(frames.ravel())
    expected = np.zeros_like(run.labels.array)
    expected[:, j0:j0 + rows, i0:i0 + cols] = run.labels.array[:, j0:j0 + rows, i0:i0 + cols]
    np.testing.assert_array_equal(read_seg(cropped, ct).array, expected)

    bare = copy.deepcopy(original)
    del bare.SegmentSequence
    back = read_seg(bare, ct)
    lut = label_lut(run.paths["seg"])
    numbers = np.zeros(256, np.uint8)
    numbers[lut[1:22]] = np.arange(1, 22)
    np.testing.assert_array_equal(back.array, numbers[run.labels.array])
    assert back.classes[4].name == "segment_4"
    assert "segment 4 has frames but no description in the SegmentSequence" in back.notes

    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(phantom["dicom"], mixed / "ct")
    other = read_series(phantom["dicom"])
    from node.dicom.writer import SeriesInfo, write_series

    write_series(other, mixed / "other", SeriesInfo(uid_seed="another", series_number=7))
    np.testing.assert_array_equal(read_seg(original, mixed).array, run.labels.array)


def test_label_ids_survive_an_implicit_vr_c_store(run, ct) -> None:
    """A C-STORE on Implicit VR Little Endian (as pynetdicom encodes it) keeps the private label ids,
    read as US with segnode's dictionary entry, or as UN bytes (another reader's copy) all the same."""
    import io

    from pynetdicom.dsutils import encode

    data = encode(build_seg(with_source(run), ct_source_folder(run)), True, True)
    stored = pydicom.dcmread(io.BytesIO(data), force=True)
    stored.file_meta = pydicom.dataset.FileMetaDataset()
    stored.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    assert stored.SegmentSequence[-1][0x0063, 0x1001].VR == "US"
    np.testing.assert_array_equal(read_seg(stored, ct).array, run.labels.array)
    for item in stored.SegmentSequence:
        elem = item[0x0063, 0x1001]
        item[0x0063, 0x1001] = pydicom.DataElement(elem.tag, "UN", int(elem.value).to_bytes(2, "little"))
    np.testing.assert_array_equal(read_seg(stored, ct).array, run.labels.array)


def ct_source_folder(result) -> Path:
    return Path(result.report["input"]["path"])


def test_reader_without_source_uses_the_seg_planes(run, ct) -> None:
    parsed = parse_seg(run.paths["seg"])
    grid = seg_grid(parsed)
    assert grid.same_grid(ct.geometry)
    own = read_seg(run.paths["seg"])
    np.testing.assert_array_equal(own.array, run.labels.array)
    assert own.notes[0] == "no source: the grid is the SEG's own plane positions"
    assert own.source.series_uid == ct.source.series_uid


def test_place_frames_by_reference_and_by_position(run, ct) -> None:
    parsed = parse_seg(run.paths["seg"])
    shape = ct.array.shape
    by_ref = place_frames(parsed.frames, ct.geometry, shape, ct.source)
    by_pos = place_frames(parsed.frames, ct.geometry, shape, None)
    assert by_ref.method == "reference" and by_pos.method == "position"
    np.testing.assert_array_equal(by_ref.k, by_pos.k)
    assert (by_ref.k >= 0).all() and not by_ref.j0.any() and not by_ref.i0.any()
    from dataclasses import replace

    moved = [replace(f, position=tuple(np.add(f.position, (0.0, 0.0, 3.0)))) for f in parsed.frames]
    off = place_frames(moved, ct.geometry, shape, None)  # half a slice off: on no slice
    assert (off.k == -1).all()
    assert off.notes == ["413 frame(s) lie outside the grid or between its slices: left out"]
    with pytest.raises(SegError, match="orientation"):
        place_frames(parsed.frames, ct.geometry, shape, orientation=np.array([0, 1, 0, 1, 0, 0.0]))


def test_segment_masks_keep_overlaps(run, ct) -> None:
    masks = read_seg_masks(run.paths["seg"], ct)
    assert sorted(masks.masks) == sorted(run.labels.classes)
    for label, mask in masks.masks.items():
        np.testing.assert_array_equal(mask, run.labels.array == label)


# --- public SEGs: dcmqi and highdicom ------------------------------------------------------------


@needs_data
def test_dcmqi_liver_onto_its_ct_equals_the_nrrd() -> None:
    import SimpleITK as sitk

    labels = read_seg(DATA / "dcmqi" / "liver.dcm", DATA / "dcmqi" / "ct-3slice")
    nrrd = sitk.ReadImage(str(DATA / "dcmqi" / "liver_seg.nrrd"))
    np.testing.assert_array_equal(labels.array, sitk.GetArrayFromImage(nrrd))
    np.testing.assert_allclose(labels.geometry.origin, nrrd.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.geometry.spacing, nrrd.GetSpacing(), atol=1e-5)
    assert {i: c.name for i, c in labels.classes.items()} == {1: "Liver"}
    assert labels.classes[1].property_type.meaning == "Liver"
    assert labels.notes == ["3 frame(s) placed by referenced SOP instance"]


@needs_data
@pytest.mark.parametrize("name", ["seg_image_ct_binary.dcm", "seg_image_ct_binary_overlap.dcm"])
def test_highdicom_segs_onto_ct2_series_with_its_gap(name) -> None:
    """CT2_series has 4 slices with a 202.5 mm gap (161 missing slices at 1.25 mm): read_series refuses
    it; the reader builds the grid with the gap (missing slices empty) and places each frame on the
    instance it references, checked against highdicom's own decoding per instance."""
    folder = DATA / "pydicom" / "CT2_series"
    source = source_grid(folder)
    assert source.array.shape == (165, 16, 16)
    assert source.notes[0].startswith("source has 161 missing slice(s) in 1 gap(s)")
    uids = [uid for uid in source.source.instance_uids if uid]
    ks = [k for k, uid in enumerate(source.source.instance_uids) if uid]
    assert ks == [0, 162, 163, 164]
    seg_path = DATA / "highdicom" / name
    masks = hd.seg.segread(seg_path).get_pixels_by_source_instance(uids, combine_segments=False)
    labels = read_seg(seg_path, folder)
    expected = np.zeros((4, 16, 16), np.uint8)
    for n in range(masks.shape[-1]):  # later segment wins
        expected[masks[..., n] > 0] = n + 1
    np.testing.assert_array_equal(labels.array[ks], expected)
    assert not np.delete(labels.array, ks, axis=0).any()
    frames = int(pydicom.dcmread(seg_path).NumberOfFrames)
    assert (frames, f"{frames} frame(s) placed by referenced SOP instance" in labels.notes) == (
        {"seg_image_ct_binary.dcm": 3}.get(name, 8), True)
    overlap = [n for n in labels.notes if n.startswith("segments overlap")]
    if "overlap" in name:
        assert overlap == [("segments overlap (16 voxel(s); earlier/later label: voxels 1/2: 16); "
                            "the later segment wins")]
        kept = read_seg_masks(seg_path, folder)
        for n in range(2):
            np.testing.assert_array_equal(kept.masks[n + 1][ks], masks[..., n] > 0)
    else:
        assert overlap == []
    names = {i: c.name for i, c in labels.classes.items()}
    assert names == ({1: "first segment", 2: "second segment"} if "overlap" in name else {1: names[1]})


def test_not_a_seg_is_refused(phantom) -> None:
    with pytest.raises(SegError, match="not a DICOM Segmentation") as info:
        parse_seg(next(phantom["dicom"].iterdir()))
    assert info.value.code == "not_seg"


# --- the pipeline stage and the CLI ---------------------------------------------------------------


def test_seg_output_is_skipped_without_dicom_or_structures(phantom, tmp_path) -> None:
    nifti = run_pipeline(phantom["ct"], tmp_path / "nifti", PipelineRequest(
        segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]), outputs=("seg",)))
    assert nifti.ok and "seg" not in nifti.paths
    stage = nifti.report["stages"][2]  # the delivered outputs come before the standard files
    assert (stage["name"], stage["state"]) == ("seg", "skipped")
    assert stage["message"] == "the input has no DICOM source (NIfTI or in-memory input): no DICOM-SEG"
    labels = read_nifti(phantom["labels"])
    empty = write_nifti(labels.with_array(np.zeros_like(labels.array)), tmp_path / "empty.nii.gz")
    none = run_pipeline(phantom["dicom"], tmp_path / "none", PipelineRequest(
        segment=SegmentRequest(engine="labelmap", labels_path=empty), outputs=("seg",)))
    assert none.ok and none.report["stages"][2]["message"] == "no structure was found: no DICOM-SEG"


def test_seg_output_options_from_the_request(phantom, tmp_path) -> None:
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]),
                              outputs=("seg",), stage_options={"seg": {"type": "LABELMAP", "version": 3}})
    result = run_pipeline(phantom["dicom"], tmp_path / "lm", request)
    assert result.ok, result.error
    ds = pydicom.dcmread(result.paths["seg"])
    assert (ds.SOPClassUID, ds.SeriesNumber, int(ds.NumberOfFrames)) == (
        "1.2.840.10008.5.1.4.1.1.66.7", 3001, 40)
    np.testing.assert_array_equal(read_seg(ds, result.ct).array, result.labels.array)
    parameters = ds.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert parameters == "engine=labelmap,task=total"
    bad = run_pipeline(phantom["dicom"], tmp_path / "bad", PipelineRequest(
        segment=SegmentRequest(engine="labelmap", labels_path=phantom["labels"]), outputs=("seg",),
        stage_options={"seg": {"type": "FRACTIONAL"}}))
    assert (bad.state, bad.error) == ("done", None)  # the labels stand; the SEG alone failed
    assert bad.failed_outputs["seg"].code == "seg_bad_option" and "labels" in bad.paths


def segnode(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # a wide table
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, check=False)


def test_cli_seg_info_and_to_nifti(run, phantom, tmp_path) -> None:
    info = segnode("seg", "info", "--json", str(run.paths["seg"]))
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data == json.loads(json.dumps(describe_seg(run.paths["seg"]), default=str))
    assert (data["segmentation_type"], data["frames"], data["manufacturer"]) == ("BINARY", 413, "segnode")
    liver = next(s for s in data["segments"] if s["label"] == "liver")
    assert (liver["number"], liver["label_id"], liver["frames"], liver["type"]["value"]) == (
        4, 5, 20, "10200004")
    table = segnode("seg", "info", str(run.paths["seg"]))
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if "portal_vein_branches" in line)
    assert row.split("│")[1:-1] and [c.strip() for c in row.split("│")[1:-1]] == [
        "20", "201", "portal_vein_branches", "Portal vein (SCT 32764006)",
        "Anatomical Structure (SCT 123037004)",
        "#325ae6", str(int((run.labels.array == 201).any(axis=(1, 2)).sum())), "AUTOMATIC"]
    out = tmp_path / "labels.nii.gz"
    done = segnode("seg", "to-nifti", str(run.paths["seg"]), str(out), "--source", str(phantom["dicom"]))
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_nifti(out).array, run.labels.array)
    classes = json.loads((tmp_path / "labels.classes.json").read_text())
    assert [c["id"] for c in classes] == sorted(run.labels.classes)
    bad = segnode("seg", "info", str(next(phantom["dicom"].iterdir())))
    assert bad.returncode == 1 and "not a DICOM Segmentation" in bad.stderr
