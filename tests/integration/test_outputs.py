"""The outputs beside the SEG, checked with real tools on one pipeline run of the TINY phantom:

* RTSTRUCT: dciodvfy finds no error; read back by segnode's rasteriser and by an independent one
  (skimage.draw.polygon, even-odd) it matches the labels (Dice >= 0.98 per structure over 1 mL, >= 0.9 for
  the smallest); every point lies on its CT slice's plane (0.01 mm); names, colours and codes are the SEG's.
* Measurements SR: dciodvfy finds no error; highdicom reads it back; every volume equals stats.csv
  (0.1 %), every reference resolves to a segment of the run's SEG with that structure's label.
* Review sheet: dciodvfy finds no error in the Encapsulated PDF, which holds review.pdf; each view of
  review.png shows, pixel for pixel, the labels of the slice it names, in their colours over the CT.
* DICOM meshes: dciodvfy finds no error; each instance holds its STL byte for byte, watertight, in the
  CT's frame of reference, named after its structure.
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
from node.pipeline import PipelineResult
from tests.phantom_seg import phantom_seg

pytestmark = pytest.mark.integration

ALL_OUTPUTS = ("seg", "rtstruct", "sr", "review", "dicom_mesh")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> PipelineResult:
    _, result = phantom_seg(tmp_path_factory.mktemp("outputs"), outputs=ALL_OUTPUTS)  # the viewer's tests use it too
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
        assert dice(ours[c.name], truth) >= 0.995, c.name  # the even-odd pixel-centre rule: nearly exact


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
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
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


def test_review_pdf_instance_is_valid_and_holds_the_pdf(run: PipelineResult) -> None:
    errors, _ = dciodvfy_errors(run.paths["review"])
    assert errors == []
    ds = pydicom.dcmread(run.paths["review"])
    pdf = (run.outdir / "review.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == run.ct.source.study_uid


def test_review_png_shows_the_labels_of_the_slices_it_names(run: PipelineResult) -> None:
    import json

    from PIL import Image

    png = np.asarray(Image.open(run.outdir / "review.png").convert("RGB")).astype(int)
    index = json.loads((run.outdir / "review.json").read_text())
    labels, ct = run.labels.array, run.ct.array
    colours = np.zeros((256, 3))
    for i, c in run.labels.classes.items():
        colours[i] = c.color
    centre = [int(round(float(np.nonzero(labels)[a].mean()))) for a in range(3)]
    level, width = index["window"][0], index["window"][1]
    views = {v["name"]: v for v in index["views"]}
    assert set(views) == {"axial", "coronal", "sagittal", "vessels"}
    for name, axis, take in (("axial", 0, lambda a, n: a[n]), ("coronal", 1, lambda a, n: a[:, n, :][::-1]),
                             ("sagittal", 2, lambda a, n: a[:, :, n][::-1])):
        view = views[name]
        assert view["index"] == centre[axis], name  # through the centre of the labelled voxels
        x0, y0, x1, y1 = view["box"]
        size = (x1 - x0, y1 - y0)
        def nearest(a: np.ndarray) -> np.ndarray:  # the pixel under each output pixel's centre
            r = [int((y + 0.5) * a.shape[0] // size[1]) for y in range(size[1])]
            c = [int((x + 0.5) * a.shape[1] // size[0]) for x in range(size[0])]
            return a[np.ix_(r, c)]

        plane = nearest(take(labels, view["index"]))
        hu = nearest(take(ct, view["index"]).astype(float))
        grey = np.clip((hu - (level - width / 2)) / width, 0, 1) * 255
        shown = png[y0:y1, x0:x1]
        expected = np.where(plane[..., None] > 0, 0.5 * grey[..., None] + 0.5 * colours[plane], grey[..., None])
        off = np.abs(shown - expected).max(axis=2) > 2
        assert plane.any() and off.mean() < 0.002, (name, off.mean())
        coloured = (shown.max(axis=2) - shown.min(axis=2)) > 2
        assert np.array_equal(coloured | (plane == 0), np.ones_like(coloured)), name  # every label pixel tinted
        assert not coloured[plane == 0].any(), name  # and nothing else


def test_dicom_meshes_hold_the_watertight_stl_files(run: PipelineResult) -> None:
    import trimesh

    from node.artifacts.mesh_dicom import extracted_stl

    folder = run.outdir / "dicom_mesh"
    instances = sorted(folder.glob("*.dcm"))
    names = {c.name for c in run.labels.classes.values()}
    assert len(instances) == len(names)
    series, sops = set(), set()
    for path in instances:
        errors, _ = dciodvfy_errors(path)
        assert errors == [], (path.name, errors)
        ds = pydicom.dcmread(path)
        stl = path.with_suffix(".stl")
        assert extracted_stl(path) == stl.read_bytes()
        mesh = trimesh.load(stl, file_type="stl")
        assert mesh.is_watertight and mesh.volume > 0, path.name
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.3" and ds.MIMETypeOfEncapsulatedDocument == "model/stl"
        assert ds.FrameOfReferenceUID == run.ct.source.frame_of_reference_uid
        assert ds.DocumentTitle == path.stem and ds.DocumentTitle in names
        series.add(ds.SeriesInstanceUID)
        sops.add(ds.SOPInstanceUID)
    assert len(series) == 1 and len(sops) == len(instances)


def _sop_classes(orthanc) -> dict[str, int]:
    """Instances stored in ``orthanc`` by SOP Class UID."""
    from collections import Counter

    instances = orthanc.rest_get("/instances")
    return dict(Counter(orthanc.request("GET", f"/instances/{i}/metadata/SopClassUid")[1].decode()
                        for i in instances))


def test_every_output_reaches_the_archive_once_and_the_planning_system_only_the_rtstruct(
    run: PipelineResult, orthanc_factory, tmp_path: Path
) -> None:
    """A job with every output, two real Orthancs: the archive (STOW-RS, takes everything) and a
    treatment-planning system (C-STORE, ``accepts = ["rtstruct"]``). Each output is queued as the
    worker's on_output hook does, as soon as written, and again by the job's end hook, then once more
    after a restart: each instance arrives exactly once, the TPS gets the RTSTRUCT alone."""
    from types import SimpleNamespace

    from node.config import Destination, OutboxSection
    from node.export.outbox import Outbox

    archive, tps = orthanc_factory(), orthanc_factory(aet="TPS")
    destinations = [Destination(name="archive", kind="stowrs", url=archive.dicomweb_url),
                    Destination(name="tps", kind="cstore", host="127.0.0.1", port=tps.dicom_port,
                                ae_title="TPS", accepts=["rtstruct"])]
    job = SimpleNamespace(id="job-all", destinations={"archive": {}, "tps": {}}, series_uid=run.ct.source.series_uid,
                          study_uid=run.ct.source.study_uid)
    outbox = Outbox(tmp_path, destinations, OutboxSection())
    seg_only = outbox.enqueue_output(job, "seg", run.paths["seg"])  # the SEG first, as the worker does
    assert seg_only["tps"]["state"] == "skipped" and "accepts only rtstruct" in seg_only["tps"]["last_error"]
    for name, path in run.paths.items():
        outbox.enqueue_output(job, name, path)
    outbox.enqueue_results(job, run.outdir)
    meshes = len(list((run.outdir / "dicom_mesh").glob("*.dcm")))
    assert outbox.run_once() == 4 + meshes + 1
    states = outbox.job_destinations("job-all")
    assert states["archive"]["state"] == states["tps"]["state"] == "delivered"
    assert (states["archive"]["instances"], states["tps"]["instances"]) == (4 + meshes, 1)
    outbox.close()
    again = Outbox(tmp_path, destinations, OutboxSection())
    again.enqueue_results(job, run.outdir)
    assert again.run_once() == 0
    again.close()
    assert _sop_classes(archive) == {
        "1.2.840.10008.5.1.4.1.1.66.4": 1, "1.2.840.10008.5.1.4.1.1.481.3": 1, "1.2.840.10008.5.1.4.1.1.88.34": 1,
        "1.2.840.10008.5.1.4.1.1.104.1": 1, "1.2.840.10008.5.1.4.1.1.104.3": meshes}
    assert _sop_classes(tps) == {"1.2.840.10008.5.1.4.1.1.481.3": 1}


def test_an_sr_without_its_seg_and_outputs_without_a_dicom_source_are_skipped_with_the_reason(tmp_path: Path) -> None:
    from node.phantom import TINY, make_phantom
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest

    phantom = make_phantom(TINY)
    (tmp_path / "in").mkdir()
    from node.nifti import write_nifti
    from node.segment.labelmap import write_class_table

    write_nifti(phantom.labels, tmp_path / "in" / "labels.nii.gz")
    write_class_table(phantom.labels.classes, tmp_path / "in" / "classes.json")
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=tmp_path / "in" / "labels.nii.gz"),
                              outputs=("sr", "rtstruct", "dicom_mesh", "review"))
    result = run_pipeline(phantom.ct, tmp_path / "out", request)  # in memory: no DICOM source
    assert result.ok, result.error
    stages = {s["name"]: (s["state"], s.get("message", "")) for s in result.report["stages"]}
    assert stages["sr"] == ("skipped", "the measurements SR cites the DICOM-SEG: ask for the seg output too")
    assert stages["rtstruct"][0] == stages["dicom_mesh"][0] == "skipped"
    assert "no DICOM source" in stages["rtstruct"][1]
    assert stages["review"][0] == "done"  # the sheet is made; only its DICOM instance needs a source
    assert (tmp_path / "out" / "review.png").is_file() and not (tmp_path / "out" / "review.dcm").exists()


def test_the_fast_measurement_groups_are_highdicom_s_byte_for_byte(run: PipelineResult) -> None:
    """The SR's groups are built as plain datasets and encoded by segnode for speed: each is, byte for
    byte, what pydicom writes for highdicom's VolumetricROIMeasurementsAndQualitativeEvaluations."""
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    from node import __version__
    from node.dicom.codes import segment_codes
    from node.dicom.sr import _encode_element, _segment_numbers, build_sr, volumetric_group

    seg = pydicom.dcmread(run.paths["seg"], stop_before_pixels=True)
    numbers = _segment_numbers(seg)
    rows = run.report["structures"][:4]
    reference = build_sr(seg, rows, segment_numbers=numbers, classes=run.labels.classes)
    theirs = list(reference[0].ContentSequence[-1].ContentSequence)
    assert len(theirs) == len(rows)
    for row, group in zip(rows, theirs):
        tracking_uid = group.ContentSequence[1].UID  # highdicom's own, given to ours
        ours = volumetric_group(row, numbers[row["id"]], segment_codes(run.labels.classes[row["id"]]), seg,
                                tracking_uid, ("segnode", __version__))
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, DataElement(0x0040A730, "SQ", [pydicom.Dataset(group)]))
        assert _encode_element(0x0040A730, "SQ", [ours]) == fp.getvalue(), row["name"]
