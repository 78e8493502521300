"""The one pipeline (load -> engine -> stages -> outputs) and `segnode run` on the phantom."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.classes import LabelClass
from node.nifti import read_nifti, write_nifti
from node.phantom import CLASSES, TINY, write_phantom
from node.pipeline import (
    STAGES, PipelineContext, PipelineRequest, ProgressEvent, StageSkipped, request_from_settings, run_pipeline,
)
from node.segment import SegmentationError, SegmentRequest
from node.segment.labelmap import write_class_table
from node.segment.registry import get_engine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_phantom(TINY, tmp_path_factory.mktemp("phantom"))


def request(engine: str = "threshold", **kwargs) -> PipelineRequest:
    post = kwargs.pop("post", ())
    outputs = kwargs.pop("outputs", ())
    return PipelineRequest(segment=SegmentRequest(engine=engine, **kwargs), post=post, outputs=outputs)


def test_threshold_run_writes_labels_on_the_series_grid_and_a_report(phantom, tmp_path) -> None:
    events: list[ProgressEvent] = []
    result = run_pipeline(phantom["dicom"], tmp_path / "out", request(), progress=events.append)
    assert result.ok, result.error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "classes.json", "labels.nii.gz", "report.json", "stats.csv"]
    labels = read_nifti(tmp_path / "out" / "labels.nii.gz")
    ct = read_nifti(phantom["ct"])
    assert labels.array.shape == ct.array.shape and labels.array.dtype == np.uint8
    np.testing.assert_allclose(labels.geometry.affine, ct.geometry.affine, atol=1e-4)
    np.testing.assert_array_equal(labels.array, result.labels.array)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report, default=str))
    assert (report["state"], report["error"]) == ("done", None)
    assert [(s["name"], s["state"]) for s in report["stages"]] == [
        ("load", "done"), ("segment", "done"), ("write", "done")]
    assert set(report["timings_s"]) == {"load", "segment", "write", "total"}
    assert report["input"]["kind"] == "dicom" and report["input"]["modality"] == "CT"
    assert report["input"]["shape_ijk"] == [64, 64, 40] and report["input"]["spacing_mm"] == [3.2, 3.2, 6.0]
    assert report["input"]["instances"] == 40
    assert report["engine"]["name"] == "threshold" and report["engine"]["task"] == "total"
    assert {"segnode", "python", "numpy", "pydicom"} <= set(report["versions"])
    names = [s["name"] for s in report["structures"]]
    assert names == ["body", "bone", "fat", "enhanced_vessels", "soft_tissue"]
    counts = np.bincount(labels.array.ravel())
    hu = ct.array.astype(float)
    for s in report["structures"]:
        assert s["voxels"] == counts[s["id"]]
        assert s["volume_ml"] == s["voxels"] * (3.2 * 3.2 * 6.0) / 1000.0
        assert s["mean_hu"] == round(float(hu[labels.array == s["id"]].mean()), 2)
    # No patient name or ID (the phantom's are Phantompatient^Nobody and SEGNODE-PHANTOM) in the report.
    text = (tmp_path / "out" / "report.json").read_text()
    assert "Phantompatient" not in text and "SEGNODE-PHANTOM" not in text

    rows = list(csv.DictReader((tmp_path / "out" / "stats.csv").open()))
    assert [r["name"] for r in rows] == names
    assert [int(r["voxels"]) for r in rows] == [s["voxels"] for s in report["structures"]]
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert [(c["id"], c["name"], c["property_type"]["value"]) for c in classes][:2] == [
        (1, "body", "38266002"), (2, "bone", "272673000")]

    assert (events[0].stage, events[0].status) == ("load", "started")
    assert [e.done for e in events if e.status == "progress"] == list(range(1, 41))
    assert [(e.stage, e.status) for e in events if e.status != "progress"] == [
        ("load", "started"), ("load", "done"), ("segment", "started"), ("segment", "done"),
        ("write", "started"), ("write", "done")]


def test_labelmap_run_reproduces_the_ground_truth(phantom, tmp_path) -> None:
    result = run_pipeline(phantom["dicom"], tmp_path, request("labelmap", labels_path=phantom["labels"]))
    assert result.ok, result.error
    truth = read_nifti(phantom["labels"]).array
    np.testing.assert_array_equal(read_nifti(tmp_path / "labels.nii.gz").array, truth)
    by_id = {s["id"]: s for s in result.report["structures"]}
    assert {i: s["name"] for i, s in by_id.items()} == {i: c.name for i, c in CLASSES.items()}
    for i, s in by_id.items():
        assert s["voxels"] == int((truth == i).sum())
        assert s["volume_ml"] == s["voxels"] * (3.2 * 3.2 * 6.0) / 1000.0
    assert by_id[52]["touches_border"] and not by_id[1]["touches_border"]


def test_nifti_input_and_roi_subset(phantom, tmp_path) -> None:
    result = run_pipeline(phantom["ct"], tmp_path, request("labelmap", labels_path=phantom["labels"],
                                                           roi_subset=("liver", "aorta", "not_there")))
    assert result.ok, result.error
    assert result.report["input"]["kind"] == "nifti" and "modality" not in result.report["input"]
    assert [s["name"] for s in result.report["structures"]] == ["liver", "aorta"]
    assert "roi_subset: not in the result: not_there" in result.report["notes"]
    truth = read_nifti(phantom["labels"]).array
    np.testing.assert_array_equal(read_nifti(tmp_path / "labels.nii.gz").array,
                                  np.where(np.isin(truth, (5, 52)), truth, 0))
    bad = run_pipeline(phantom["ct"], tmp_path, request(roi_subset=("liver",)))
    assert (bad.state, bad.error.code) == ("failed", "roi_not_found")
    assert "it has: body, bone, fat, enhanced_vessels, soft_tissue" in bad.error.message


def test_stages_paint_record_skip_and_fail(phantom, tmp_path) -> None:
    ct = read_nifti(phantom["ct"])
    truth = read_nifti(phantom["labels"]).array

    def hepatic_core(ctx: PipelineContext) -> None:
        veins = ctx.mask("enhanced_vessels") & (truth == 202)
        ctx.paint(veins, LabelClass(300, "hepatic_core", (0, 190, 225), "Vessel"))
        ctx.record(voxels=int(veins.sum()), options=ctx.options)
        ctx.write_nifti("hepatic_core.nii.gz", ctx.labels.with_array(veins.astype(np.uint8)))

    def needs_liver(ctx: PipelineContext) -> None:
        if not ctx.ids("liver"):
            raise StageSkipped("no liver in the labels")

    req = PipelineRequest(segment=SegmentRequest(), post=(hepatic_core, needs_liver),
                          stage_options={"hepatic_core": {"min_component_size": 5}})
    result = run_pipeline(ct, tmp_path / "ok", req)
    assert result.ok, result.error
    assert [(s["name"], s["state"]) for s in result.report["stages"]] == [
        ("load", "done"), ("segment", "done"), ("hepatic_core", "done"), ("needs_liver", "skipped"),
        ("write", "done")]
    assert result.report["stages"][3]["message"] == "no liver in the labels"
    painted = int((result.labels.array == 300).sum())
    assert painted > 0 and result.labels.array.dtype == np.uint16  # id 300 needs 16 bits
    assert result.report["qc"]["hepatic_core"] == {"voxels": painted, "options": {"min_component_size": 5}}
    assert result.report["outputs"]["hepatic_core.nii.gz"] == "hepatic_core.nii.gz"
    assert result.report["structures"][-1]["name"] == "hepatic_core"
    assert read_nifti(tmp_path / "ok" / "labels.nii.gz").array.dtype == np.uint16

    def refuses(ctx: PipelineContext) -> None:
        raise SegmentationError("no_liver", "no liver, and --no_fallback_full_liver was given")

    def crashes(ctx: PipelineContext) -> None:
        raise ZeroDivisionError("division by zero")

    for stage, code, message in ((refuses, "no_liver", "no liver, and --no_fallback_full_liver was given"),
                                 (crashes, "internal_error",
                                  "internal error in stage crashes: ZeroDivisionError: division by zero"),
                                 ("nonsense", "unknown_stage", None)):
        failed = run_pipeline(ct, tmp_path / "ok", PipelineRequest(post=(stage,)))
        assert (failed.state, failed.error.code) == ("failed", code)
        assert message is None or failed.error.message == message
        report = json.loads((tmp_path / "ok" / "report.json").read_text())
        assert report["error"]["code"] == code and report["stages"][-1]["state"] == "failed"
        # The earlier run's outputs are gone: they must not pass for this run's.
        assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["hepatic_core.nii.gz", "report.json"]


def test_bad_input_fails_with_a_code_not_a_traceback(phantom, tmp_path, monkeypatch) -> None:
    cases = [
        (tmp_path / "nothing", request(), "not_found", "load"),
        (tmp_path / "nothing.nii.gz", request(), "not_found", "load"),
        (phantom["classes"], request(), "not_dicom", "load"),
        (phantom["dicom"], request("nonsense"), "unknown_engine", "segment"),
        (phantom["dicom"], request("labelmap"), "no_labels", "segment"),
    ]
    for source, req, code, stage in cases:
        result = run_pipeline(source, tmp_path / "out", req)
        assert (result.state, result.error.code, result.error.stage) == ("failed", code, stage), source
        assert result.paths == {"report": tmp_path / "out" / "report.json"}
        assert json.loads(result.paths["report"].read_text())["error"]["code"] == code
    monkeypatch.setitem(STAGES, "broken", "node.no_such_module:stage")
    result = run_pipeline(phantom["ct"], tmp_path / "out", PipelineRequest(post=("broken",)))
    assert result.error.code == "stage_unavailable"


def test_totalsegmentator_missing_is_a_segmentation_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "node.segment.totalseg", None)  # import raises ImportError
    with pytest.raises(SegmentationError) as exc:
        get_engine("totalsegmentator")
    assert exc.value.code == "engine_unavailable"
    assert type(get_engine("threshold")).__name__ == "ThresholdEngine"
    assert type(get_engine("labelmap")).__name__ == "LabelmapEngine"


def segnode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True)


def test_segnode_run_threshold_and_mask_folder(phantom, tmp_path) -> None:
    done = segnode("run", str(phantom["dicom"]), str(tmp_path / "thr"))
    assert done.returncode == 0, done.stderr
    assert "enhanced_vessels" in done.stdout
    stages = [line.split(" (")[0] for line in done.stderr.splitlines()]
    assert stages == ["load: done", "segment: done", "write: done"]

    # A TotalSegmentator-style folder of masks, derived from the ground truth, with its classes.json.
    truth = read_nifti(phantom["labels"])
    masks = tmp_path / "masks"
    masks.mkdir()
    for c in CLASSES.values():
        write_nifti(truth.with_array((truth.array == c.id).astype(np.uint8)), masks / f"{c.name}.nii.gz")
    write_class_table(CLASSES, masks / "classes.json")
    done = segnode("run", str(phantom["dicom"]), str(tmp_path / "lm"), "--engine", "labelmap",
                   "--labels", str(masks), "--roi_subset", "liver", "aorta", "hepatic_veins")
    assert done.returncode == 0, done.stderr
    labels = read_nifti(tmp_path / "lm" / "labels.nii.gz").array
    np.testing.assert_array_equal(labels, np.where(np.isin(truth.array, (5, 52, 202)), truth.array, 0))
    report = json.loads((tmp_path / "lm" / "report.json").read_text())
    assert report["engine"]["roi_subset"] == ["liver", "aorta", "hepatic_veins"]

    failed = segnode("run", str(phantom["dicom"]), str(tmp_path / "bad"), "--engine", "labelmap",
                     "--labels", str(tmp_path / "none.nii.gz"))
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'none.nii.gz'} does not exist [labels_not_found] "
        f"(report: {tmp_path / 'bad' / 'report.json'})")
    usage = segnode("run", str(phantom["dicom"]), str(tmp_path / "bad"), "--device", "tpu")
    assert usage.returncode == 2 and "--device must be cpu, gpu, gpu:N or mps" in usage.stderr


def test_request_from_settings_takes_config_defaults_and_given_values_win() -> None:
    from node.config import Settings

    config = Settings(segmentation={"engine": "labelmap", "task": "total", "fast": True, "device": "gpu"},
                      node={"data_dir": "/data"})
    req = request_from_settings(config)
    assert (req.segment.engine, req.segment.fast, req.segment.fastest, req.segment.device) == (
        "labelmap", True, False, "gpu")
    assert req.segment.weights_dir == Path("/data/totalsegmentator")
    assert req.spacing_tolerance == config.volume.spacing_tolerance
    req = request_from_settings(config, engine="threshold", fastest=True, roi_subset=["liver"], post=["x"])
    assert (req.segment.engine, req.segment.fast, req.segment.fastest) == ("threshold", False, True)
    assert req.segment.roi_subset == ("liver",) and req.post == ("x",)


def write_marker_output(ctx) -> None:
    """An output stage for the test below: one file beside the standard outputs."""
    path = ctx.outdir / "marker.txt"
    path.write_text(f"{ctx.source_path.name} {len(ctx.labels.classes)}")
    ctx.artifacts["marker"] = path


def test_output_stages_run_after_the_labels_and_unknown_ones_fail(phantom, tmp_path, monkeypatch) -> None:
    import node.pipeline as pipeline

    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "marker", "tests.unit.test_pipeline:write_marker_output")
    result = run_pipeline(phantom["dicom"], tmp_path / "a", request(outputs=("marker",)))
    assert result.ok
    assert result.report["outputs"]["marker"] == "marker.txt"
    assert (tmp_path / "a" / "marker.txt").read_text() == f"dicom {len(result.labels.classes)}"
    assert [s["name"] for s in result.report["stages"]] == ["load", "segment", "write", "marker"]
    failed = run_pipeline(phantom["dicom"], tmp_path / "b", request(outputs=("nope",)))
    assert failed.state == "failed"
    assert failed.error.code == "unknown_stage"
    assert failed.error.message.startswith("no output called 'nope'")
    assert [s["name"] for s in failed.report["stages"]] == []  # refused before any work


def broken_output(ctx) -> None:
    """An output stage that writes a file, then fails with a coded error (as a SEG the source refuses)."""
    (ctx.outdir / "half.txt").write_text("half")
    raise SegmentationError("seg_source_mismatch", "DICOM-SEG: the source cannot carry these labels")


def crashing_output(ctx) -> None:
    raise RuntimeError("a bug in an output")


def test_a_failed_output_keeps_the_labels_and_is_recorded_on_its_own(phantom, tmp_path, monkeypatch) -> None:
    """Issue 16 item 5: labels, classes and stats are written whenever segmentation succeeded; each failed
    output is listed with its code, the run is done, and the outputs after it still run."""
    import node.pipeline as pipeline

    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "broken", "tests.unit.test_pipeline:broken_output")
    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "crashing", "tests.unit.test_pipeline:crashing_output")
    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "marker", "tests.unit.test_pipeline:write_marker_output")
    out = tmp_path / "out"
    result = run_pipeline(phantom["dicom"], out, request(outputs=("broken", "crashing", "marker")))
    assert (result.state, result.error) == ("done", None)
    assert {name: (e.code, e.stage) for name, e in result.failed_outputs.items()} == {
        "broken": ("seg_source_mismatch", "broken"), "crashing": ("internal_error", "crashing")}
    report = json.loads((out / "report.json").read_text())
    assert (report["state"], report["error"]) == ("done", None)
    assert report["failed_outputs"]["broken"] == {
        "code": "seg_source_mismatch", "message": "DICOM-SEG: the source cannot carry these labels",
        "stage": "broken"}
    assert report["failed_outputs"]["crashing"]["message"] == (
        "internal error in stage crashing: RuntimeError: a bug in an output")
    assert {"labels", "classes", "stats", "marker"} <= set(result.paths)
    assert {p.name for p in out.iterdir()} >= {"labels.nii.gz", "classes.json", "stats.csv", "marker.txt"}
    assert [(s["name"], s["state"]) for s in report["stages"]] == [
        ("load", "done"), ("segment", "done"), ("write", "done"), ("broken", "failed"), ("crashing", "failed"),
        ("marker", "done")]


def test_delivered_outputs_come_first_and_are_announced_as_soon_as_written(phantom, tmp_path, monkeypatch) -> None:
    """The SEG is written right after the labels are final, before the standard files and the other
    outputs (even those asked for before it), and announced (status ``output``) at once, before its stage
    ends (``ctx.add_output``); a stage that only fills ``ctx.artifacts`` is announced when it ends; the series is
    read once (the SEG references the headers the load stage kept)."""
    from node import pipeline
    from node.dicom import series

    monkeypatch.setitem(pipeline.OUTPUT_STAGES, "marker", "tests.unit.test_pipeline:write_marker_output")
    reads = []
    real_read = series.read_datasets
    monkeypatch.setattr(series, "read_datasets", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    out = tmp_path / "out"
    log: list[tuple[str, str]] = []
    seen: dict[str, list[str]] = {}

    def progress(event: ProgressEvent) -> None:
        if event.status != "progress":
            log.append((event.stage, event.status))
        if event.status == "output":
            assert event.path is not None and event.path.is_file()
            seen[event.message] = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))

    result = run_pipeline(phantom["dicom"], out, request(outputs=("marker", "seg")), progress=progress)
    assert result.ok, result.error
    assert log == [
        ("load", "started"), ("load", "done"), ("segment", "started"), ("segment", "done"),
        ("seg", "started"), ("seg", "output"), ("seg", "done"),  # announced by add_output, at once
        ("write", "started"), ("write", "done"),
        ("marker", "started"), ("marker", "done"), ("marker", "output"),
    ]
    assert seen == {  # what the output folder held when each output was announced
        "seg": ["seg.dcm"],
        "marker": ["classes.json", "labels.nii.gz", "marker.txt", "seg.dcm", "stats.csv"],
    }
    assert [s["name"] for s in result.report["stages"]] == ["load", "segment", "seg", "write", "marker"]
    assert set(result.report["timings_s"]) == {"load", "segment", "seg", "write", "marker", "total"}
    assert result.report["outputs"]["seg"] == "seg.dcm" and result.report["qc"]["seg"]["frames"] > 0
    assert reads == [phantom["dicom"]]
