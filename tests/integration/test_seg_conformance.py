"""DICOM-SEG conformance of what the node writes: dicom3tools' dciodvfy finds no error, dcmjs (the library
OHIF builds on) maps every frame to a source slice and decodes the same label map, highdicom reads the
labels back exactly, and dcmqi's ``segimage2itkimage`` (DCMTK's dcmseg inside) converts BINARY and
LABELMAP SEGs to images that match the labels voxel for voxel on the source grid, with the segment
labels, codes and colours written.

dcmjs comes from ``tests/js`` (``npm ci --prefix tests/js``, done by ``scripts/setup.sh``); the dcmjs
checks are skipped only when ``node`` is missing. dcmqi is the PyPI wheel of the test extra (its
binaries live in the package); its check is skipped only when the binary cannot run on this machine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node.classes import LabelClass, LabelVolume
from node.dicom.codes import segment_codes
from node.dicom.modules import TYPE2
from node.dicom.seg import SegOptions, parse_seg, read_seg, write_seg
from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo, write_series
from node.phantom import TINY, make_phantom
from node.volume import Geometry, Volume
from tests.phantom_seg import phantom_seg
from tests.unit.test_series import oblique_direction

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CHECK_JS = REPO / "tests" / "js" / "check_seg.js"


@pytest.fixture(scope="module")
def segs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path, Path, LabelVolume]]:
    """(name, SEG, source folder, labels) for the SEGs checked: the pipeline's on the phantom, one
    segment, a superseding version, and one on a real CT (dcmqi's GE liver slices)."""
    tmp = tmp_path_factory.mktemp("seg")
    phantom, run = phantom_seg(tmp)
    labels = LabelVolume(run.labels.array, run.labels.geometry, source=run.ct.source,
                         classes=run.labels.classes)
    out = [("phantom", run.paths["seg"], phantom["dicom"], labels)]
    liver = LabelVolume((labels.array == 5).astype(np.uint8) * 5, labels.geometry, source=labels.source,
                        classes={5: labels.classes[5]})
    out.append(("one segment", write_seg(liver, phantom["dicom"], tmp / "one.dcm"), phantom["dicom"], liver))
    v2 = write_seg(labels, phantom["dicom"], tmp / "v2.dcm",
                   options=SegOptions(version=2, algorithm_type="SEMIAUTOMATIC", content_creator="Doe^Jane"))
    out.append(("version 2", v2, phantom["dicom"], labels))
    anonymised = tmp / "anonymised"  # no Type 2 patient/study attribute at all (issue 16)
    anonymised.mkdir()
    for source in sorted(Path(phantom["dicom"]).glob("*.dcm")):
        ds = pydicom.dcmread(source)
        for keyword in TYPE2:
            delattr(ds, keyword)
        ds.save_as(anonymised / source.name)
    out.append(("no Type 2", write_seg(labels, anonymised, tmp / "anonymised.dcm"), anonymised, labels))
    if (DATA / "dcmqi" / "ct-3slice").is_dir():
        ct = read_series(DATA / "dcmqi" / "ct-3slice")
        real = read_seg(DATA / "dcmqi" / "liver.dcm", ct)
        real = LabelVolume(real.array, real.geometry, source=ct.source, classes={1: LabelClass(1, "liver")})
        out.append(("real CT", write_seg(real, DATA / "dcmqi" / "ct-3slice", tmp / "real.dcm"),
                    DATA / "dcmqi" / "ct-3slice", real))
    return out


#: The one warning on what segnode itself writes: its private label id element, unknown to dciodvfy.
PRIVATE_TAG_WARNING = ("(0x0063,0x1xxx)  ?  - Warning - Unrecognized tag - assuming explicit value "
                       "representation OK")


def test_dciodvfy_finds_no_error(segs) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed: run scripts/setup.sh")
    warnings: dict[str, set[str]] = {}
    for name, path, _, _ in segs:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60,
                                check=False)
        lines = (result.stdout + result.stderr).splitlines()
        errors = [line for line in lines if re.search(r"\bError\b", line)]
        assert errors == [], f"{name}: {errors}"
        warnings[name] = {re.sub(r"\(0x0063,0x1[0-9a-f]{3}\)", "(0x0063,0x1xxx)", line)
                          for line in lines if "Warning" in line}
    for name in ("phantom", "one segment", "version 2"):
        assert warnings[name] == {PRIVATE_TAG_WARNING}, name
    # Empty Type 2 values are valid; dciodvfy only notes that a DICOMDIR could not index them.
    dicomdir = "Warning - Missing attribute or value that would be needed to build DICOMDIR - "
    assert warnings["no Type 2"] == {PRIVATE_TAG_WARNING} | {
        dicomdir + name for name in ("Patient ID", "Study ID", "Study Date", "Study Time")}
    if "real CT" in warnings:  # plus what the SEG copies from the source: its old-style patient name
        copied = ("Warning - Value dubious for this VR - (0x0010,0x0010) PN Patient's Name  PN [1] = "
                  "<JANCT000> - Retired Person Name form")
        assert warnings["real CT"] == {PRIVATE_TAG_WARNING, copied}


def test_dcmjs_maps_every_frame_to_a_source_slice_and_decodes_the_labels(segs, tmp_path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (REPO / "tests" / "js" / "node_modules" / "dcmjs").is_dir():
        pytest.fail("dcmjs is not installed: run scripts/setup.sh (npm ci --prefix tests/js)")
    for name, path, source, labels in segs:
        out = tmp_path / f"{path.stem}.labelmap"
        result = subprocess.run(["node", str(CHECK_JS), str(path), str(source), str(out)],
                                capture_output=True, text=True, timeout=120, check=False)
        summary = json.loads(result.stdout)
        assert (result.returncode, summary["ok"], summary["problems"]) == (0, True, []), name
        ds = pydicom.dcmread(path)
        referenced = {i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                      for i in ds.PerFrameFunctionalGroupsSequence}
        assert (summary["frames"], summary["referencedInstances"]) == (
            int(ds.NumberOfFrames), len(referenced))
        assert summary["adapterLabelmaps"] == 1  # no overlapping segments
        numbers = np.zeros(65536, np.uint16)
        for s in parse_seg(path).segments.values():
            numbers[s.label_id] = s.number
        decoded = np.fromfile(out, "<u2").reshape(labels.array.shape)  # slices sorted along the normal
        np.testing.assert_array_equal(decoded, numbers[labels.array], err_msg=name)


def test_highdicom_reads_the_labels_back_exactly(segs) -> None:
    for name, path, source, labels in segs:
        seg = hd.seg.segread(path)
        numbers = seg.get_pixels_by_source_instance(list(labels.source.instance_uids), combine_segments=True)
        ids = np.zeros(65536, np.uint16)
        for s in parse_seg(path).segments.values():
            ids[s.number] = s.label_id
        np.testing.assert_array_equal(ids[numbers], labels.array, err_msg=name)
        np.testing.assert_array_equal(read_seg(path, source).array, labels.array, err_msg=name)


# --- dcmqi ------------------------------------------------------------------------------------------

#: How far dcmqi's image grid may lie from the source's (mm; unitless for the direction cosines).
DCMQI_TOLERANCE_MM = 1e-4


@pytest.fixture(scope="module")
def segimage2itkimage() -> Path:
    """dcmqi's converter from the PyPI wheel (``dcmqi/bin`` inside the package)."""
    try:
        import dcmqi
    except ImportError:
        pytest.fail("dcmqi is not installed: pip install -e '.[test]' (scripts/setup.sh)")
    binary = Path(dcmqi.__file__).parent / "bin" / "segimage2itkimage"
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                                check=False)
    except OSError as exc:
        pytest.skip(f"dcmqi's segimage2itkimage cannot run on this machine: {exc}")
    if result.returncode != 0:
        pytest.skip(f"dcmqi's segimage2itkimage cannot run on this machine (exit {result.returncode}): "
                    f"{(result.stdout + result.stderr).strip()[-300:]}")
    return binary


@pytest.fixture(scope="module")
def oblique_segs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path, Path, LabelVolume, str]]:
    """(name, SEG, source folder, labels, segmentation type): the phantom on an oblique grid, its labels
    with empty first and last slices (dcmqi's image then starts further in), a structure missing on one
    slice, and a class that labels no voxel (its segment is left out): BINARY, LABELMAP, LABELMAP RLE."""
    tmp = tmp_path_factory.mktemp("dcmqi")
    phantom = make_phantom(TINY)
    g = phantom.ct.geometry
    geometry = Geometry(origin=g.origin, spacing=g.spacing, direction=oblique_direction(25))
    folder = tmp / "oblique"
    write_series(Volume(phantom.ct.array, geometry), folder, SeriesInfo(uid_seed="dcmqi-oblique"))
    ct = read_series(folder)
    array = phantom.labels.array.copy()
    array[:3] = 0
    array[-2:] = 0
    array[10][array[10] == 5] = 0
    classes = {**phantom.labels.classes, 300: LabelClass(300, "lesion", (255, 64, 0), "Other")}
    labels = LabelVolume(array, ct.geometry, source=ct.source, classes=classes)
    out = []
    for name, options in (("oblique BINARY", SegOptions()),
                          ("oblique LABELMAP", SegOptions(segmentation_type="LABELMAP")),
                          ("oblique LABELMAP RLE", SegOptions(segmentation_type="LABELMAP", compression="RLE",
                                                             content_creator="Doe^Jane"))):
        path = write_seg(labels, folder, tmp / f"{name.replace(' ', '-')}.dcm", options=options)
        kind = str(pydicom.dcmread(path, stop_before_pixels=True).SegmentationType)
        assert kind == name.split()[1], name  # AUTO: BINARY for these whole-byte frames, 21 segments
        out.append((name, path, folder, labels, kind))
    return out


def _coded(code) -> dict[str, str]:
    return {"CodeValue": code.value, "CodingSchemeDesignator": code.scheme, "CodeMeaning": code.meaning}


def _attributes(number: int, label_class: LabelClass, algorithm_type: str) -> dict[str, object]:
    """dcmqi's meta JSON entry for a segment as the node means to write it."""
    codes = segment_codes(label_class)
    out: dict[str, object] = {
        "labelID": number, "SegmentLabel": label_class.name[:64], "SegmentDescription": "",
        "SegmentAlgorithmType": algorithm_type, "SegmentAlgorithmName": "segnode",
        "SegmentedPropertyCategoryCodeSequence": _coded(codes.category),
        "SegmentedPropertyTypeCodeSequence": _coded(codes.type),
        "recommendedDisplayRGBValue": list(label_class.color)}
    if codes.type_modifier is not None:
        out["SegmentedPropertyTypeModifierCodeSequence"] = _coded(codes.type_modifier)
    if codes.anatomic_region is not None:
        out["AnatomicRegionSequence"] = _coded(codes.anatomic_region)
        if codes.anatomic_region_modifier is not None:
            out["AnatomicRegionModifierSequence"] = _coded(codes.anatomic_region_modifier)
    return out


def _on_source_grid(image: sitk.Image, geometry: Geometry, shape: tuple[int, int, int], name: str) -> np.ndarray:
    """dcmqi's image placed on the source grid: its spacing and direction the source's, its origin the
    centre of a source voxel (0, 0, k0); zeros outside the slices it covers."""
    np.testing.assert_allclose(image.GetSpacing(), geometry.spacing, atol=DCMQI_TOLERANCE_MM, err_msg=name)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), geometry.direction_matrix,
                               atol=DCMQI_TOLERANCE_MM, err_msg=name)
    index = np.linalg.solve(geometry.affine[:3, :3], np.asarray(image.GetOrigin()) - geometry.affine[:3, 3])
    k0 = round(float(index[2]))
    np.testing.assert_allclose(image.GetOrigin(), (geometry.affine @ [0, 0, k0, 1])[:3],
                               atol=DCMQI_TOLERANCE_MM, err_msg=f"{name}: origin off the source grid")
    array = sitk.GetArrayFromImage(image)
    assert array.shape[1:] == shape[1:] and 0 <= k0 and k0 + array.shape[0] <= shape[0], (name, k0, array.shape)
    full = np.zeros(shape, array.dtype)
    full[k0:k0 + array.shape[0]] = array
    return full


def test_dcmqi_segimage2itkimage_agrees(segs, oblique_segs, segimage2itkimage: Path, tmp_path: Path) -> None:
    cases = [(*case, "BINARY") for case in segs] + oblique_segs
    for name, path, _source, labels, kind in cases:
        out = tmp_path / path.stem
        out.mkdir()
        result = subprocess.run([str(segimage2itkimage), "--inputDICOM", str(path), "--outputDirectory", str(out)],
                                capture_output=True, text=True, timeout=120, check=False)
        lines = (result.stdout + result.stderr).splitlines()
        assert result.returncode == 0, f"{name}: {lines[-20:]}"
        assert [line for line in lines if line.startswith("E:")] == [], name
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # Not even a warning (type 2 ContentCreatorName is written empty when nobody corrected the SEG).
        assert [line for line in lines if line.startswith("W:")] == [], name

        meta = json.loads((out / "meta.json").read_text())
        present = labels.present_ids()
        # Segments 1..N in ascending label id, LABELMAP too (no Background item: dcmqi lists none).
        numbers = dict(zip(present, range(1, len(present) + 1)))
        attributes = [a for group in meta["segmentAttributes"] for a in group]
        assert sorted(a["labelID"] for a in attributes) == sorted(numbers.values()), name
        algorithm_type = str(ds.SegmentSequence[0].SegmentAlgorithmType)
        by_number = {a["labelID"]: a for a in attributes}
        for label_id, number in numbers.items():
            assert by_number[number] == _attributes(number, labels.classes[label_id], algorithm_type), (name, label_id)
        assert (meta["SeriesDescription"], meta["SeriesNumber"], meta["ContentCreatorName"]) == (
            ds.SeriesDescription, str(ds.SeriesNumber), str(ds.get("ContentCreatorName") or "")), name

        images = sorted(out.glob("*.nrrd"))
        if kind == "BINARY":  # no overlaps, no --mergeSegments: one image per segment, valued its number
            assert sorted(int(p.stem) for p in images) == sorted(numbers.values()), name
            for label_id, number in numbers.items():
                full = _on_source_grid(sitk.ReadImage(str(out / f"{number}.nrrd")), labels.geometry,
                                       labels.array.shape, name)
                np.testing.assert_array_equal(full, np.where(labels.array == label_id, number, 0),
                                              err_msg=f"{name}: label {label_id}")
        else:  # one image with every segment number
            assert [p.name for p in images] == ["1.nrrd"], name
            full = _on_source_grid(sitk.ReadImage(str(images[0])), labels.geometry, labels.array.shape, name)
            lut = np.zeros(int(labels.array.max()) + 1, np.uint16)
            lut[list(numbers)] = list(numbers.values())
            np.testing.assert_array_equal(full, lut[labels.array], err_msg=name)
