"""One pipeline for the CLI (``segnode run``), the node's worker and the tests.

``run_pipeline(input, outdir, request, progress)``:

1. **load**: a DICOM folder/zip/file (:func:`~node.dicom.series.read_series`), a NIfTI file
   (:func:`~node.nifti.read_nifti`), or a :class:`~node.volume.Volume` already built;
2. **segment**: the engine named in ``request.segment.engine`` (:mod:`node.segment.registry`), its
   output checked (same grid as the input, a class for every id), ``roi_subset`` applied;
3. **post-processing stages**, in order (``request.post``): each is a callable taking the
   :class:`PipelineContext`, by object or by name (:data:`STAGES`);
4. **outputs**, delivered ones first: the outputs the outbox sends (:data:`DELIVERED_OUTPUTS`: the
   DICOM-SEG, RTSTRUCT, measurements SR, review sheet, meshes as DICOM, in that order), each announced by a ``ProgressEvent`` of status ``output`` as soon as it is written
   (the worker hands it to the outbox then, while the run goes on); then **write**:
   ``labels.nii.gz`` (multilabel, on the input grid), ``classes.json``, ``stats.csv``; then the other
   outputs in the order asked (meshes, slices, Blender: :data:`OUTPUT_STAGES`); ``report.json``, with
   every stage and its time, last.

Bad input never raises: a :class:`~node.dicom.series.VolumeError` or
:class:`~node.segment.SegmentationError` ends the run with ``state: failed`` and the error's code
and message in ``report.json`` and in the returned :class:`PipelineResult`. So does a bug
(code ``internal_error``; its traceback goes to the log, not to the report).

An output that fails (a SEG the source cannot carry, a mesh writer's error) does not throw the
segmentation away: once the labels are final, ``labels.nii.gz``, ``classes.json`` and ``stats.csv`` are
written whatever the outputs do, the run ends ``done``, and each failed output is listed on its own in
``report.json``'s ``failed_outputs`` and :attr:`PipelineResult.failed_outputs` (code, message, stage).

Writing a post-processing stage (the contract is :mod:`node.stages`; a stage imports from there, never
from here)::

    from node.stages import PipelineContext, StageSkipped

    def liver_vessels(ctx: PipelineContext) -> None:
        liver = ctx.mask("liver")                     # union of the named classes
        if not liver.any():
            raise StageSkipped("no liver in the labels")  # recorded, the run goes on
        opts = ctx.options                            # request.stage_options["liver_vessels"]
        ...
        ctx.paint(portal, LabelClass(201, "portal_vein_branches", ..., category="Vessel"))
        ctx.record(portal_voxels=int(portal.sum()))   # -> report.json "qc": {"liver_vessels": {...}}
        ctx.write_nifti("liver_vessels_labeled.nii.gz", volume)  # extra artifact, listed in the report

A stage raising ``SegmentationError`` fails the run (e.g. ``--no_fallback_full_liver`` and no liver).
"""

from __future__ import annotations

import csv
import importlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from node import __version__
from node.classes import LabelVolume
from node.errors import NodeError
from node.segment import SegmentationError, SegmentRequest
from node.stages import (  # the stage contract; re-exported for callers of the pipeline
    PipelineContext,
    PipelineRequest,
    ProgressCallback,
    ProgressEvent,
    Stage,
    StageSkipped,
)
from node.volume import Volume

log = logging.getLogger(__name__)

REPORT_VERSION = 1
#: The files a run writes in its output folder (a failed run writes only the report).
OUTPUTS = {
    "labels": "labels.nii.gz", "classes": "classes.json", "stats": "stats.csv", "report": "report.json",
}
#: Distributions whose versions go into the report (absent ones are left out; none is imported).
VERSIONED = ("numpy", "scipy", "pydicom", "nibabel", "torch", "TotalSegmentator", "nnunetv2", "highdicom")

#: Stages by the names rules and the CLI use ("module:attribute", imported when first used).
STAGES: dict[str, str] = {
    "liver_vessels": "node.segment.vessels:liver_vessels_stage",
}

#: Outputs a rule or ``--output`` can ask for beyond the standard files (always written: labels NIfTI,
#: classes, stats, report). Each is a stage run after the labels are final; it adds ``ctx.artifacts``.
OUTPUT_STAGES: dict[str, str] = {
    "seg": "node.dicom.seg:seg_output",
    "rtstruct": "node.dicom.rtstruct:rtstruct_output",
    "sr": "node.dicom.sr:sr_output",
    "review": "node.artifacts.review:review_output",
    "dicom_mesh": "node.artifacts.mesh_dicom:dicom_mesh_output",
    "meshes": "node.artifacts.mesh:meshes_stage",
    "slices": "node.artifacts.slices:slices_stage",
    "blender": "node.artifacts.blender:blender_stage",
}
#: Output names that are always written and need no stage.
STANDARD_OUTPUTS = ("labels", "nifti", "classes", "stats", "report")
#: Outputs the outbox delivers (DICOM for the archive, what the radiologist waits for): they are
#: written right after the labels are final, in this order whatever order was asked (the SR cites the
#: SEG), before the standard files and the other outputs (meshes, slices, Blender), and each is
#: announced (a ``ProgressEvent`` of status ``output``) as soon as it exists, so that the worker hands
#: it to the outbox while the run goes on.
DELIVERED_OUTPUTS = ("seg", "rtstruct", "sr", "review", "dicom_mesh")


def request_from_settings(
    settings: Any,
    *,
    engine: str | None = None,
    task: str | None = None,
    fast: bool | None = None,
    fastest: bool | None = None,
    roi_subset: tuple[str, ...] | list[str] | None = None,
    robust_crop: bool | None = None,
    device: str | None = None,
    labels_path: Path | None = None,
    options: dict[str, Any] | None = None,
    post: tuple[str | Stage, ...] | list[str | Stage] = (),
    stage_options: dict[str, dict[str, Any]] | None = None,
    series_uid: str | None = None,
    outputs: tuple[str, ...] | list[str] = (),
) -> PipelineRequest:
    """A request from the node's settings (``[segmentation]``, ``[volume]``); what is given wins.

    The CLI and the worker (with a rule's ``[rule.pipeline]``) build their requests here. Of fast and
    fastest, what is given wins over the config, and fast wins when both are set.
    """
    seg = settings.segmentation
    if fast is None and fastest is None:
        fast, fastest = seg.fast, bool(getattr(seg, "fastest", False)) and not seg.fast
    else:
        fast, fastest = bool(fast), bool(fastest) and not fast
    weights_dir = seg.weights_dir or Path(settings.node.data_dir) / "totalsegmentator"
    return PipelineRequest(
        segment=SegmentRequest(
            engine=(engine or seg.engine).lower(), task=task or seg.task, fast=fast, fastest=fastest,
            roi_subset=tuple(roi_subset or getattr(seg, "roi_subset", ()) or ()),
            robust_crop=bool(getattr(seg, "robust_crop", False) if robust_crop is None else robust_crop),
            device=device or seg.device, threads=seg.threads, weights_dir=weights_dir,
            resident=bool(getattr(seg, "resident", True)), envelope_mm=float(getattr(seg, "envelope_mm", 20.0)),
            compile=bool(getattr(seg, "compile", False)),
            labels_path=labels_path, options=dict(options or {}),
        ),
        series_uid=series_uid,
        spacing_tolerance=settings.volume.spacing_tolerance,
        post=tuple(post),
        stage_options=dict(stage_options or {}),
        outputs=tuple(o for o in outputs if o not in STANDARD_OUTPUTS),
    )


@dataclass(frozen=True)
class PipelineError:
    code: str
    message: str
    stage: str


@dataclass
class PipelineResult:
    state: Literal["done", "failed"]
    outdir: Path
    report: dict[str, Any]
    #: Output name (labels, classes, stats, report, artifacts) -> path; only files that were written.
    paths: dict[str, Path]
    ct: Volume | None = None
    labels: LabelVolume | None = None
    error: PipelineError | None = None
    #: Outputs that failed while the run itself succeeded: name -> error (their stage is the output's).
    failed_outputs: dict[str, PipelineError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "done"


# --- the run ------------------------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, error: PipelineError) -> None:
        super().__init__(error.message)
        self.error = error


class _Run:
    """Bookkeeping of one run: per-stage state and timing, progress events."""

    def __init__(self, progress: ProgressCallback | None) -> None:
        self.progress = progress
        self.stages: list[dict[str, Any]] = []

    def emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            try:
                self.progress(event)
            except Exception:  # a broken display must not fail the run
                log.exception("progress callback failed")

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"name": name, "state": "running"}
        self.stages.append(entry)
        self.emit(ProgressEvent(name, "started"))
        start = time.perf_counter()

        def finish(state: Any, message: str = "") -> None:
            entry["state"] = state
            entry["seconds"] = round(time.perf_counter() - start, 4)
            if message:
                entry["message"] = message
            self.emit(ProgressEvent(name, state, seconds=entry["seconds"], message=message))

        try:
            yield entry
        except StageSkipped as exc:
            finish("skipped", str(exc))
            return
        except NodeError as exc:  # bad input or a refusal: its own code, never retried as a crash
            finish("failed", str(exc))
            raise _Failure(PipelineError(exc.code, str(exc), name)) from None
        except OSError as exc:
            finish("failed", str(exc))
            raise _Failure(PipelineError("io_error", f"{type(exc).__name__}: {exc}", name)) from None
        except _Failure:
            finish("failed")
            raise
        except Exception as exc:
            log.exception("pipeline stage %s failed", name)
            message = f"internal error in stage {name}: {type(exc).__name__}: {exc}"
            finish("failed", message)
            raise _Failure(PipelineError("internal_error", message, name)) from None
        finish("done")


def run_pipeline(
    input: Path | str | Volume,
    outdir: Path | str,
    request: PipelineRequest = PipelineRequest(),
    progress: ProgressCallback | None = None,
) -> PipelineResult:
    """Segment ``input`` into ``outdir``; never raises for bad input (see the module docstring)."""
    started = time.perf_counter()
    outdir = Path(outdir)
    run = _Run(progress)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "state": "running",
        "error": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": _describe_input(input),
        "engine": _describe_engine(request.segment),
        "post": [_stage_name(s) for s in request.post],
        "stages": run.stages,
        "failed_outputs": {},
    }
    paths: dict[str, Path] = {}
    ct: Volume | None = None
    headers: list[Any] | None = None
    ctx: PipelineContext | None = None
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS.values():  # an earlier run's result in this folder must not pass for this one
            (outdir / name).unlink(missing_ok=True)
    except OSError as exc:
        error = PipelineError("io_error", f"cannot use output folder {outdir}: {exc}", "setup")
        report.update(state="failed", error=_error_dict(error))
        return PipelineResult("failed", outdir, report, {}, error=error)
    try:
        unknown = [name for name in request.outputs if isinstance(name, str) and name not in OUTPUT_STAGES]
        if unknown:  # a mistake in the request, found before any work (outputs fail one by one later)
            raise _Failure(PipelineError("unknown_stage", f"no output called {unknown[0]!r}; known: "
                                         f"{', '.join(OUTPUT_STAGES)}", "setup"))
        with run.stage("load"):
            ct, headers = _load(input, request, run)
            report["input"].update(_describe_volume(ct))
        with run.stage("segment"):
            from node.segment.registry import get_engine

            engine = get_engine(request.segment.engine)
            labels = engine.segment(ct, request.segment)
            labels = _checked(labels, ct, request.segment)
            if getattr(labels, "inference", None) is not None:
                report["inference"] = labels.inference
        source_path = None if isinstance(input, Volume) or str(input).endswith((".nii", ".nii.gz")) else Path(input)
        ctx = PipelineContext(ct=ct, labels=labels, request=request, outdir=outdir, source_path=source_path,
                              source_headers=headers, stages_run=run.stages)
        ctx.notes.extend(labels.notes)
        for stage in request.post:
            name = _stage_name(stage)
            with run.stage(name):
                ctx.stage = name
                _resolve(stage, STAGES, "post-processing stage")(ctx)
                _check_stage_output(ctx, name)
            ctx.stage = ""
        # What is delivered first, announced as soon as written; then the files for people and tools.
        delivered = [name for name in DELIVERED_OUTPUTS if name in request.outputs]  # the SR cites the SEG
        for name in delivered:
            _output(name, ctx, run, report["failed_outputs"])
        with run.stage("write"):
            report["structures"] = ctx.structures()
            paths.update(_write_outputs(ctx, report["structures"]))
        for name in request.outputs:
            if name not in delivered:
                _output(name, ctx, run, report["failed_outputs"])
        paths.update(ctx.artifacts)
        report["state"] = "done"
    except _Failure as failure:
        report["state"] = "failed"
        report["error"] = _error_dict(failure.error)
        for key in ("labels", "classes", "stats"):  # a write that failed half-way leaves nothing behind
            paths.pop(key, None)
            (outdir / OUTPUTS[key]).unlink(missing_ok=True)
    finally:
        report["timings_s"] = {s["name"]: s.get("seconds") for s in run.stages}
        report["timings_s"]["total"] = round(time.perf_counter() - started, 4)
        if ctx is not None:
            report["qc"] = ctx.qc
            report["notes"] = list(ct.notes if ct else []) + ctx.notes
        elif ct is not None:
            report["notes"] = list(ct.notes)
        report["outputs"] = {k: str(p.relative_to(outdir)) if p.is_relative_to(outdir) else str(p)
                             for k, p in paths.items()}
        report["versions"] = _versions()
    try:
        text = json.dumps(report, indent=1, default=str) + "\n"
        paths["report"] = _atomic_text(outdir / OUTPUTS["report"], text)
    except OSError as exc:
        log.error("cannot write %s: %s", outdir / OUTPUTS["report"], exc)
    error = None if report["error"] is None else PipelineError(**report["error"])
    failed = {name: PipelineError(**e) for name, e in report["failed_outputs"].items()}
    return PipelineResult(
        report["state"], outdir, report, paths, ct=ct, labels=ctx.labels if ctx else None, error=error,
        failed_outputs=failed,
    )


# --- stages -------------------------------------------------------------------------------------


def _output(name: str, ctx: PipelineContext, run: _Run, failed: dict[str, dict[str, str]]) -> None:
    """Output stage ``name``; each artifact it adds is announced (status ``output``) once written: at
    once through :meth:`PipelineContext.add_output`, else when the stage ends. A failure is recorded in
    ``failed`` (name -> error) and the run goes on: the labels stand without this output."""
    before = dict(ctx.artifacts)
    announced: set[str] = set()

    def announce(stage: str, key: str, path: Path) -> None:
        announced.add(key)
        run.emit(ProgressEvent(stage or name, "output", message=key, path=path))

    ctx.announce = announce
    try:
        with run.stage(name):
            ctx.stage = name
            _resolve(name, OUTPUT_STAGES, "output")(ctx)
    except _Failure as failure:
        failed[name] = _error_dict(failure.error)
        log.warning("output %s failed: [%s] %s", name, failure.error.code, failure.error.message)
    finally:
        ctx.stage, ctx.announce = "", None
    for key, path in ctx.artifacts.items():
        if key not in announced and before.get(key) != path:
            run.emit(ProgressEvent(name, "output", message=key, path=path))


def _load(input: Path | str | Volume, request: PipelineRequest, run: _Run) -> tuple[Volume, list[Any] | None]:
    """The CT, and the headers of its DICOM instances (None for a NIfTI or a Volume)."""
    from node.dicom.series import VolumeError, load_series

    if isinstance(input, Volume):
        return input, None
    path = Path(input)
    if path.name.endswith((".nii", ".nii.gz")):
        from node.nifti import read_nifti

        if not path.is_file():
            raise VolumeError("not_found", f"{path} does not exist")
        try:
            volume = read_nifti(path)
        except Exception as exc:
            raise VolumeError("not_nifti", f"{path}: not a readable 3-D NIfTI image ({exc})") from None
        volume.notes.append("NIfTI input: no DICOM identity; values taken as HU")
        return volume, None

    def update(done: int, total: int) -> None:
        run.emit(ProgressEvent("load", "progress", done=done, total=total))

    return load_series(path, request.series_uid, spacing_tolerance=request.spacing_tolerance, progress=update)


def _checked(labels: LabelVolume, ct: Volume, request: SegmentRequest) -> LabelVolume:
    """The engine's labels, held to the Engine contract; ``roi_subset`` applied."""
    if not isinstance(labels, LabelVolume):
        raise SegmentationError("engine_output", f"the engine returned {type(labels).__name__}, not labels")
    if labels.array.shape != ct.array.shape or not labels.geometry.same_grid(ct.geometry):
        raise SegmentationError("engine_output", "the engine returned labels on another grid than the input")
    if not np.issubdtype(labels.array.dtype, np.integer):
        raise SegmentationError(
            "engine_output", f"the engine returned non-integer labels ({labels.array.dtype})"
        )
    present = labels.present_ids()
    missing = [i for i in present if i not in labels.classes]
    for i in missing:
        from node.segment.labelmap import make_class

        labels.classes[i] = make_class(i, f"label_{i}")
    if missing:
        labels.notes.append(f"the engine gave no class for id(s) {missing}: called label_<id>")
    labels.classes = {i: c for i, c in sorted(labels.classes.items()) if i in set(present)}
    if not present:
        labels.notes.append("the engine found no structure in this series")
    if request.roi_subset:
        wanted = set(request.roi_subset)
        keep = {i: c for i, c in labels.classes.items() if c.name in wanted}
        if not keep and labels.classes:  # something was found, none of it asked for: a typo?
            raise SegmentationError(
                "roi_not_found",
                f"none of --roi_subset {' '.join(request.roi_subset)} is in the result; it has: "
                + ", ".join(c.name for c in labels.classes.values()),
            )
        absent = sorted(wanted - {c.name for c in keep.values()})
        if absent:
            labels.notes.append(f"roi_subset: not in the result: {', '.join(absent)}")
        labels.array = np.where(np.isin(labels.array, list(keep)), labels.array, 0).astype(labels.array.dtype)
        labels.classes = keep
    return labels


def _stage_name(stage: str | Stage) -> str:
    if isinstance(stage, str):
        return stage
    return str(getattr(stage, "name", None) or getattr(stage, "__name__", type(stage).__name__))


def _resolve(stage: str | Stage, registry: dict[str, str], kind: str) -> Stage:
    if not isinstance(stage, str):
        return stage
    if stage not in registry:
        raise SegmentationError(
            "unknown_stage", f"no {kind} called {stage!r}; known: {', '.join(registry) or 'none yet'}"
        )
    module_name, _, attr = registry[stage].partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SegmentationError(
            "stage_unavailable", f"stage {stage!r} is not available ({type(exc).__name__}: {exc})"
        ) from None


def _check_stage_output(ctx: PipelineContext, name: str) -> None:
    labels = ctx.labels
    if labels.array.shape != ctx.ct.array.shape or not labels.geometry.same_grid(ctx.ct.geometry):
        raise SegmentationError("stage_output", f"stage {name} left labels on another grid than the input")
    present = labels.present_ids()
    missing = [i for i in present if i not in labels.classes]
    if missing:
        raise SegmentationError("stage_output", f"stage {name} left id(s) {missing} without a class")
    labels.classes = {i: c for i, c in sorted(labels.classes.items()) if i in set(present)}


# --- outputs ------------------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_outputs(ctx: PipelineContext, rows: list[dict[str, Any]]) -> dict[str, Path]:
    from node.nifti import write_nifti
    from node.segment.labelmap import write_class_table

    labels, outdir = ctx.labels, ctx.outdir
    paths: dict[str, Path] = {}
    array = labels.array
    dtype = np.uint8 if array.size == 0 or int(array.max()) < 256 else np.uint16
    tmp = outdir / ".labels.partial.nii.gz"
    write_nifti(replace(labels, array=array.astype(dtype, copy=False)), tmp)
    os.replace(tmp, outdir / OUTPUTS["labels"])
    paths["labels"] = outdir / OUTPUTS["labels"]
    tmp = outdir / ".classes.partial.json"
    write_class_table(labels.classes, tmp)
    os.replace(tmp, outdir / OUTPUTS["classes"])
    paths["classes"] = outdir / OUTPUTS["classes"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "name", "category", "voxels", "volume_ml", "mean_hu", "std_hu", "touches_border"])
    for r in rows:
        writer.writerow([r["id"], r["name"], r["category"], r["voxels"], f"{r['volume_ml']:.3f}",
                         r["mean_hu"], r["std_hu"], int(r["touches_border"])])
    paths["stats"] = _atomic_text(outdir / OUTPUTS["stats"], buffer.getvalue())
    return paths


# --- report parts -------------------------------------------------------------------------------


def _error_dict(error: PipelineError) -> dict[str, str]:
    return {"code": error.code, "message": error.message, "stage": error.stage}


def _describe_input(input: Path | str | Volume) -> dict[str, Any]:
    if isinstance(input, Volume):
        return {"kind": "volume"}
    path = Path(input)
    return {"kind": "nifti" if path.name.endswith((".nii", ".nii.gz")) else "dicom", "path": str(path)}


def _describe_volume(volume: Volume) -> dict[str, Any]:
    """Geometry and series identity; never patient name, ID or birth date (a Volume has none)."""
    g = volume.geometry
    info: dict[str, Any] = {
        "shape_ijk": list(volume.shape_ijk),
        "spacing_mm": list(g.spacing),
        "voxel_volume_mm3": g.spacing[0] * g.spacing[1] * g.spacing[2],
        "origin_lps": list(g.origin),
        "direction": [list(r) for r in g.direction],
        "dtype": str(volume.array.dtype),
    }
    s = volume.source
    if s is not None:
        info.update(
            modality=s.modality, study_uid=s.study_uid, series_uid=s.series_uid,
            frame_of_reference_uid=s.frame_of_reference_uid, series_number=s.series_number,
            instances=len(set(s.instance_uids)),
        )
    return info


def _describe_engine(request: SegmentRequest) -> dict[str, Any]:
    return {
        "name": request.engine, "task": request.task, "fast": request.fast, "fastest": request.fastest,
        "roi_subset": list(request.roi_subset), "robust_crop": request.robust_crop, "device": request.device,
        "threads": request.threads, "resident": request.resident, "envelope_mm": request.envelope_mm,
        "labels": None if request.labels_path is None else str(request.labels_path),
        "options": {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                    for k, v in request.options.items()},
    }


def _versions() -> dict[str, str]:
    versions = {"segnode": __version__, "python": platform.python_version()}
    for dist in VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
