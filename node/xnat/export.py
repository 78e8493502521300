"""XNAT segmentations to NIfTI on the series' grid (``segnode xnat export``) and back to DICOM-SEG
(``segnode xnat to-seg``).

For each selected SEG of a case (see :mod:`node.xnat.select`):

* the referenced series (found in ``StudySeries_info.json`` by SeriesInstanceUID) is read once and
  written as ``Curated_Output/{series}.nii.gz`` (``{series}`` is the SCANS folder, e.g. ``2``);
* every segment becomes ``Curated_Output/{series}_ON_{object}_FN_{segfolder}.nii.gz``: a 0/1 uint8
  mask on exactly the series' grid. Frames are placed by :mod:`node.dicom.seg` (referenced SOP
  instance when it resolves, else ImagePositionPatient projected on the slice normal); the method
  used is reported per SEG;
* ``--merge NEW=A+B+C`` adds (or replaces) object NEW: the union of A, B and C in that SEG. A part
  that the SEG does not have is reported; a merge with no part present is not written.

``Export_info.json`` (per case) says, per SEG, what was written or skipped and why; problems
(no matching series, frames that match no slice, unreadable files) are recorded there and the
other SEGs and cases go on. Outputs that exist with the series' shape are skipped unless
``overwrite``. Nothing is written into the input folders.

:func:`seg_masks` and :func:`write_seg_file` are the only places that call the SEG reader and
writer (:mod:`node.dicom.seg`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.uid import generate_uid

from node.classes import Code, LabelClass, LabelVolume
from node.nifti import write_nifti
from node.volume import Volume
from node.xnat.inventory import (
    CASES_INFO,
    CaseInventory,
    XnatError,
    check_output,
    find_cases,
    inventory_case,
    problem,
    write_inventory,
    write_json,
)
from node.xnat.select import Selection, match

log = logging.getLogger(__name__)

CURATED = "Curated_Output"
SEG_FOLDER = "SEG"
EXPORT_INFO = "Export_info.json"
TO_SEG_INFO = "ToSeg_info.json"
#: Threads that compress NIfTI files while the next mask is built.
WRITERS = max(1, min(4, os.cpu_count() or 1))


class ExportError(ValueError):
    """A SEG that cannot be exported; ``code`` is stable for programs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Merge:
    """``name = parts[0] + parts[1] + ...`` (union of the parts' masks)."""

    name: str
    parts: tuple[str, ...]


def parse_merge(text: str) -> Merge:
    """``"pancreas=pancreas+mass+duct"`` -> Merge("pancreas", ("pancreas", "mass", "duct"))."""
    name, sep, rest = text.partition("=")
    parts = tuple(p.strip() for p in rest.split("+"))
    if not sep or not name.strip() or not parts or any(not p for p in parts):
        raise ExportError("bad_merge", f"a merge is NEW=A+B+C, got {text!r}")
    return Merge(name.strip(), parts)


@dataclass(frozen=True)
class ExportOptions:
    selection: Selection = field(default_factory=Selection)
    merges: tuple[Merge, ...] = ()
    overwrite: bool = False


# --- names -------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A name usable in a file name on every system: runs of other characters become ``_``."""
    return re.sub(r"[^\w.\-]+", "_", str(text)).strip("._") or "unnamed"


def series_file(series_folder: str) -> str:
    return f"{safe_name(series_folder)}.nii.gz"


def object_file(series_folder: str, obj: str, seg_folder: str) -> str:
    """``{series}_ON_{object}_FN_{segfolder}.nii.gz``, the names researchers already use."""
    return f"{safe_name(series_folder)}_ON_{safe_name(obj)}_FN_{safe_name(seg_folder)}.nii.gz"


def seg_file(series_folder: str, seg_folder: str) -> str:
    return f"{safe_name(series_folder)}_SEG_FN_{safe_name(seg_folder)}.dcm"


# --- objects and merges ------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedObject:
    """One output object: the segment numbers whose union it is."""

    name: str
    segments: tuple[int, ...]
    rgb: tuple[int, int, int] | None = None
    merged_from: tuple[str, ...] = ()


def plan_objects(segments: list[dict], merges: Iterable[Merge] = ()) -> tuple[list[PlannedObject], list[dict],
                                                                             list[dict]]:
    """(objects, merge reports, warnings) for a SEG's segments (as in ``Segmentations_info.json``).

    One object per segment, named by its label (a label used twice gets ``_<number>``); then each
    merge in order, its parts looked up by name without regard to case among the objects so far.
    """
    objects: dict[str, PlannedObject] = {}
    warnings = []
    labels = [s["label"].casefold() for s in segments]
    for s in segments:
        name = s["label"]
        if labels.count(name.casefold()) > 1:
            name = f"{name}_{s['number']}"
            warnings.append(problem("duplicate_label", f"label {s['label']!r} is used by several segments; "
                                                       f"segment {s['number']} is written as {name!r}"))
        rgb = tuple(s["color_rgb"]) if s.get("color_rgb") else None
        objects[name.casefold()] = PlannedObject(name, (int(s["number"]),), rgb)  # type: ignore[arg-type]
    reports = []
    for merge in merges:
        found = [objects[p.casefold()] for p in merge.parts if p.casefold() in objects]
        missing = [p for p in merge.parts if p.casefold() not in objects]
        report = {"object": merge.name, "parts": list(merge.parts), "merged": [o.name for o in found],
                  "missing": missing, "written": bool(found)}
        reports.append(report)
        if not found:
            warnings.append(problem("merge_empty", f"merge {merge.name}: none of {', '.join(merge.parts)} "
                                                   "is in this SEG; not written"))
            continue
        if missing:
            warnings.append(problem("merge_partial", f"merge {merge.name}: {', '.join(missing)} not in this SEG; "
                                                     f"merged {', '.join(o.name for o in found)}"))
        numbers = tuple(sorted({n for o in found for n in o.segments}))
        previous = objects.get(merge.name.casefold())
        objects[merge.name.casefold()] = PlannedObject(
            merge.name, numbers, previous.rgb if previous else found[0].rgb, tuple(o.name for o in found))
    return list(objects.values()), reports, warnings


# --- the adapters to node.dicom.seg ------------------------------------------------------------


@dataclass
class SegMasks:
    """A SEG's frames placed on a series' grid by :func:`node.dicom.seg.place_frames`."""

    parsed: Any  # node.dicom.seg.ParsedSeg
    placement: Any  # node.dicom.seg.Placement
    pixels: Callable[[int], np.ndarray]  # frame index -> (rows, columns) stored values
    shape: tuple[int, int, int]  # the series' [k, j, i]
    frame_masks: Callable[..., Iterable[tuple[int, np.ndarray]]]  # (parsed, values, frame) -> (segment, mask)
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """``reference`` (SOP instance), ``position`` (ImagePositionPatient) or ``reference+position``."""
        return str(self.placement.method)

    def union(self, segments: Iterable[int]) -> np.ndarray:
        """The union of ``segments`` (numbers) as a [k, j, i] bool mask on the series' grid."""
        wanted = set(segments)
        out = np.zeros(self.shape, dtype=bool)
        nj, ni = self.shape[1:]
        labelmap = self.parsed.segmentation_type == "LABELMAP"
        for n, frame in enumerate(self.parsed.frames):
            k = int(self.placement.k[n])
            if k < 0 or not (labelmap or frame.segment in wanted):
                continue
            j0, i0 = int(self.placement.j0[n]), int(self.placement.i0[n])
            for number, mask in self.frame_masks(self.parsed, self.pixels(n), frame):
                if number not in wanted:
                    continue
                rows, cols = mask.shape
                js, je, is_, ie = max(j0, 0), min(j0 + rows, nj), max(i0, 0), min(i0 + cols, ni)
                out[k, js:je, is_:ie] |= mask[js - j0: je - j0, is_ - i0: ie - i0]
        return out


def seg_masks(seg_path: Path, volume: Volume) -> SegMasks:
    """ADAPTER to :mod:`node.dicom.seg`, the project's one SEG reader: parse the SEG, place its frames on
    ``volume``'s grid (by referenced SOP instance, else by ImagePositionPatient on the slice normal) and
    give its frames' pixels. A frame that lies on no slice fails the SEG: ``frames_unmatched``.

    Uses the reader's public ``parse_seg``, ``place_frames`` and ``frame_pixels``, and its frame value ->
    segment masks rule (``seg_read._masks_of``, to become public as ``frame_masks``).
    """
    from node.dicom.seg import SegError, frame_pixels, parse_seg, place_frames
    from node.dicom.seg_read import _masks_of as frame_masks

    try:
        parsed = parse_seg(seg_path)
        placement = place_frames(parsed.frames, volume.geometry, volume.array.shape, volume.source,
                                 frame_size=(parsed.rows, parsed.columns), orientation=parsed.orientation,
                                 pixel_spacing=parsed.pixel_spacing)
        pixels = frame_pixels(parsed.dataset, parsed.rows, parsed.columns, len(parsed.frames))
    except SegError as exc:
        raise ExportError(exc.code, exc.message) from None
    notes = list(parsed.notes) + list(placement.notes)
    source = volume.source
    if source is not None and parsed.frame_of_reference_uid and source.frame_of_reference_uid \
            and parsed.frame_of_reference_uid != source.frame_of_reference_uid:
        notes.append(f"the SEG's FrameOfReferenceUID {parsed.frame_of_reference_uid} differs from the "
                     f"series' {source.frame_of_reference_uid}")
    unplaced = int(np.count_nonzero(placement.k < 0))
    if unplaced:
        raise ExportError("frames_unmatched", f"{unplaced} of {len(parsed.frames)} frame(s) match no slice of "
                                              f"the series: {'; '.join(placement.notes)}")
    return SegMasks(parsed, placement, pixels, tuple(volume.array.shape), frame_masks, notes)  # type: ignore[arg-type]


def write_seg_file(labels: LabelVolume, source_dir: Path, out_path: Path, options: dict) -> Path:
    """ADAPTER to :func:`node.dicom.seg.write_seg`, the project's one SEG writer (``labels.source``
    picks the series in ``source_dir``)."""
    from node.dicom.seg import SegError, SegOptions, write_seg

    try:
        return write_seg(labels, source_dir, out_path, options=SegOptions(**options))
    except SegError as exc:
        raise ExportError(f"seg_{exc.code}", exc.message) from None


# --- one case ----------------------------------------------------------------------------------


def _shape_matches(path: Path, shape_ijk: tuple[int, int, int]) -> bool:
    try:
        return tuple(nib.load(str(path)).shape[:3]) == tuple(shape_ijk)
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: not a usable output
        return False


def _write_nifti(volume: Volume, path: Path) -> None:
    """Write through a temporary name, so that an interrupted write never looks finished."""
    tmp = path.with_name(f".partial-{path.name}")
    try:
        write_nifti(volume, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def selected_assessors(inventory: CaseInventory, selection: Selection) -> tuple[list[str], list[str]]:
    """(assessor folders to use, names asked for that match none). Without names: every assessor that
    is not some other kind of object (RTSTRUCT, ...)."""
    segs = inventory.segmentations["segmentations"]
    names = selection.names_for(inventory.case)
    if not names:
        return [f for f, s in segs.items() if (s.get("error") or {}).get("code") != "not_seg"], []
    return match(segs, names)


class _Case:
    """Series volumes of one case, each read once."""

    def __init__(self, inventory: CaseInventory, out_dir: Path) -> None:
        self.inventory = inventory
        self.out_dir = out_dir
        self.volumes: dict[str, Volume | ExportError] = {}

    def series_for(self, seg: dict) -> dict:
        uid = seg.get("referenced_series_uid")
        series = self.inventory.series_folder(uid) if uid else None
        if series is None:
            raise ExportError("series_not_found", f"no SCANS folder holds the referenced series {uid}")
        return series

    def volume(self, series: dict, uid: str) -> Volume:
        from node.dicom.series import VolumeError, read_series

        key = series["folder"]
        if key not in self.volumes:
            try:
                self.volumes[key] = read_series(Path(series["path"]), uid)
            except VolumeError as exc:
                self.volumes[key] = ExportError(
                    "series_unreadable", f"SCANS/{key}: {exc.message} [{exc.code}]")
        found = self.volumes[key]
        if isinstance(found, ExportError):
            raise found
        return found


def _seg_report(folder: str, seg: dict) -> dict:
    return {
        "folder": folder, "name": seg.get("name"), "author": seg.get("author"), "created": seg.get("created"),
        "file": seg.get("file"), "series_folder": None, "series_uid": seg.get("referenced_series_uid"),
        "placement": None, "objects": [], "merges": [], "warnings": list(seg.get("warnings") or []),
        "error": seg.get("error"),
    }


def _export_seg(case: _Case, folder: str, seg: dict, options: ExportOptions, written: dict) -> dict:
    report = _seg_report(folder, seg)
    if report["error"]:
        return report
    # NIfTI files are compressed in a few threads (zlib and numpy copies release the GIL) while the
    # next object's mask is built; at most WRITERS masks wait in memory.
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        try:
            series = case.series_for(seg)
            report["series_folder"] = series["folder"]
            volume = case.volume(series, seg["referenced_series_uid"])
            curated = case.out_dir / CURATED
            curated.mkdir(parents=True, exist_ok=True)
            series_path = curated / series_file(series["folder"])
            report["series_nifti"] = series_path.relative_to(case.out_dir).as_posix()
            if series["folder"] not in written:
                if not options.overwrite and _shape_matches(series_path, volume.shape_ijk):
                    written[series["folder"]] = "skipped_existing"
                else:
                    pending.append(pool.submit(_write_nifti, volume, series_path))
                    written[series["folder"]] = "written"
            report["series_status"] = written[series["folder"]]
            objects, report["merges"], warnings = plan_objects(seg.get("segments") or [], options.merges)
            report["warnings"] += warnings
            masks = seg_masks(Path(seg["file"]), volume)
            report["placement"] = {"method": masks.method, "notes": masks.notes}
            for obj in objects:
                path = curated / object_file(series["folder"], obj.name, folder)
                mask = masks.union(obj.segments)
                entry = {"object": obj.name, "segments": list(obj.segments),
                         "merged_from": list(obj.merged_from), "file": path.relative_to(case.out_dir).as_posix(),
                         "voxels": int(np.count_nonzero(mask))}
                if not options.overwrite and _shape_matches(path, volume.shape_ijk):
                    entry["status"] = "skipped_existing"
                else:
                    mask_volume = Volume(mask.view(np.uint8), volume.geometry, source=volume.source)
                    pending.append(pool.submit(_write_nifti, mask_volume, path))
                    entry["status"] = "written"
                    while len(pending) > WRITERS:
                        pending.popleft().result()
                report["objects"].append(entry)
            while pending:
                pending.popleft().result()
        except ExportError as exc:
            report["error"] = problem(exc.code, exc.message)
        except OSError as exc:  # a full or unwritable output disk
            report["error"] = problem("io_error", str(exc))
    return report


def _to_seg(case: _Case, folder: str, seg: dict, options: ExportOptions,
            deliver: Callable[[Path, dict], None] | None) -> dict:
    report = _seg_report(folder, seg)
    if report["error"]:
        return report
    try:
        series = case.series_for(seg)
        report["series_folder"] = series["folder"]
        volume = case.volume(series, seg["referenced_series_uid"])
        objects, report["merges"], warnings = plan_objects(seg.get("segments") or [], options.merges)
        report["warnings"] += warnings
        out_path = case.out_dir / SEG_FOLDER / seg_file(series["folder"], folder)
        report["seg"] = out_path.relative_to(case.out_dir).as_posix()
        masks = seg_masks(Path(seg["file"]), volume)
        report["placement"] = {"method": masks.method, "notes": masks.notes}
        labels = np.zeros(volume.array.shape, dtype=np.uint16)
        classes: dict[int, LabelClass] = {}
        codes = {s["number"]: s for s in seg.get("segments") or []}
        for number, obj in enumerate(objects, 1):
            mask = masks.union(obj.segments)
            overlap = int(np.count_nonzero(labels[mask]))
            if overlap:
                report["warnings"].append(problem(
                    "overlap", f"{obj.name} overlaps earlier objects in {overlap} voxel(s); a label map keeps "
                               f"one object per voxel, so they are {obj.name}'s in the SEG"))
            labels[mask] = number
            first = codes.get(obj.segments[0], {})
            classes[number] = LabelClass(
                number, obj.name, tuple(obj.rgb or (128, 128, 128)),  # type: ignore[arg-type]
                property_category=_code(first.get("category_code")) if not obj.merged_from else None,
                property_type=_code(first.get("type_code")) if not obj.merged_from else None)
            report["objects"].append({"object": obj.name, "segment": number, "source_segments": list(obj.segments),
                                      "merged_from": list(obj.merged_from), "voxels": int(np.count_nonzero(mask))})
        if not options.overwrite and out_path.exists():
            report["status"] = "skipped_existing"
        else:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            entropy = [str(seg.get("sop_instance_uid")), *(f"{m.name}={'+'.join(m.parts)}" for m in options.merges)]
            write_seg_file(
                LabelVolume(labels, volume.geometry, source=volume.source, classes=classes),
                Path(series["path"]), out_path,
                {"series_description": seg.get("name") or folder, "algorithm_type": "MANUAL",
                 "algorithm_name": "XNAT", "content_creator": _person_name(seg.get("author")),
                 "series_uid": generate_uid(entropy_srcs=["xnat-to-seg-series", *entropy]),
                 "sop_uid": generate_uid(entropy_srcs=["xnat-to-seg-instance", *entropy])})
            report["status"] = "written"
        if deliver is not None:
            deliver(out_path, report)
    except ExportError as exc:
        report["error"] = problem(exc.code, exc.message)
    return report


def _person_name(name: object) -> str | None:
    """An XNAT user name as a DICOM person name: one component is written ``name^`` (PS3.5 6.2.1.2)."""
    if not name:
        return None
    text = str(name)
    return text if "^" in text else f"{text}^"


def _code(value: object) -> Code | None:
    if isinstance(value, dict) and value.get("value") and value.get("scheme"):
        return Code(value["value"], value["scheme"], value.get("meaning") or value["value"])
    return None


def process_case(
    case_dir: Path, out_case_dir: Path, options: ExportOptions = ExportOptions(), *, mode: str = "export",
    deliver: Callable[[Path, dict], None] | None = None,
) -> dict:
    """Inventory ``case_dir`` into ``out_case_dir``, then export (``mode="export"``) or write DICOM-SEG
    (``mode="to-seg"``) for its selected SEGs; returns (and writes) the case's report."""
    inventory = inventory_case(case_dir)
    write_inventory(inventory, out_case_dir)
    folders, unmatched = selected_assessors(inventory, options.selection)
    case = _Case(inventory, Path(out_case_dir))
    written: dict[str, str] = {}
    segs = inventory.segmentations["segmentations"]
    results = {}
    for folder in folders:
        try:
            if mode == "export":
                results[folder] = _export_seg(case, folder, segs[folder], options, written)
            else:
                results[folder] = _to_seg(case, folder, segs[folder], options, deliver)
        except Exception as exc:
            log.exception("XNAT %s of %s/%s failed", mode, inventory.case, folder)
            results[folder] = {**_seg_report(folder, segs[folder]),
                               "error": problem("internal_error", f"{type(exc).__name__}: {exc}")}
    report = {
        "case": inventory.case, "path": str(Path(case_dir).resolve()), "mode": mode,
        "selection": {**options.selection.describe(), "asked": list(options.selection.names_for(inventory.case)),
                      "selected": folders, "unmatched": unmatched},
        "merges": [{"object": m.name, "parts": list(m.parts)} for m in options.merges],
        "series_nifti": written if mode == "export" else None,
        "segmentations": results,
        "problems": list(inventory.series["problems"]),
    }
    if unmatched:
        report["problems"].append(problem("name_not_found", f"no segmentation named {', '.join(unmatched)} "
                                                            f"in case {inventory.case}"))
    if not folders:
        report["problems"].append(problem("nothing_selected", "no segmentation selected in this case"))
    write_json(Path(out_case_dir) / (EXPORT_INFO if mode == "export" else TO_SEG_INFO), report)
    return report


def run(
    path: Path, out: Path, options: ExportOptions = ExportOptions(), *, mode: str = "export",
    progress: Callable[[int, int, str], None] | None = None, deliver: Callable[[Path, dict], None] | None = None,
) -> list[dict]:
    """:func:`process_case` for every case under ``path`` (one case folder or a parent of several)
    into ``out/<case>/``, cases left out by a selection sheet excepted; a summary in
    ``out/Cases_info.json``. Returns the case reports.

    ``deliver(seg_path, report)`` (to-seg only) is called for each DICOM-SEG written or already there:
    the hook for the outbox (:mod:`node.export`), e.g. ``Outbox.enqueue(job_id, [destination], [seg_path])``;
    the instance UIDs are derived from the XNAT SEG and the merges, so a second run sends nothing new.
    """
    if mode not in ("export", "to-seg"):
        raise ValueError(f"mode must be export or to-seg, got {mode!r}")
    cases = find_cases(path)
    check_output(out, Path(path), cases)
    chosen = [c for c in cases if options.selection.selects_case(c.name)]
    missing: list[str] = []
    if options.selection.sheet is not None:
        missing = sorted(set(options.selection.sheet) - {c.name for c in cases})
        if not chosen:
            raise XnatError("no_selected_cases", f"none of the sheet's cases is under {path}: {missing[:10]}")
    reports, summaries = [], []
    for n, case_dir in enumerate(chosen):
        if progress:
            progress(n, len(chosen), case_dir.name)
        out_case = Path(out) / case_dir.name
        try:
            report = process_case(case_dir, out_case, options, mode=mode, deliver=deliver)
        except OSError as exc:  # a disk error on one case must not stop the others
            report = {"case": case_dir.name, "path": str(case_dir), "mode": mode, "segmentations": {},
                      "problems": [problem("io_error", str(exc))]}
        reports.append(report)
        summaries.append(summarize(report, out_case))
    if progress:
        progress(len(chosen), len(chosen), "")
    not_selected = [c.name for c in cases if c not in chosen]
    write_json(Path(out) / CASES_INFO, {"input": str(Path(path).resolve()), "mode": mode, "cases": summaries,
                                        "not_selected": not_selected, "sheet_cases_not_found": missing})
    return reports


def summarize(report: dict, out_case: Path) -> dict:
    """One line per case for ``Cases_info.json`` and the command's table."""
    segs = report.get("segmentations", {}).values()
    return {
        "case": report["case"], "output": str(Path(out_case).resolve()),
        "selected": len(report.get("segmentations", {})),
        "ok": sum(1 for s in segs if not s.get("error")),
        "failed": [{"folder": s["folder"], **s["error"]} for s in segs if s.get("error")],
        "problems": report.get("problems", []),
    }


def failed(reports: list[dict]) -> bool:
    """True when a selected SEG or a case could not be done (the command's exit status)."""
    return any(s.get("error") for r in reports for s in r.get("segmentations", {}).values()) or any(
        r.get("problems") for r in reports)


__all__ = [
    "CURATED", "EXPORT_INFO", "TO_SEG_INFO", "ExportError", "ExportOptions", "Merge", "PlannedObject", "SegMasks",
    "failed", "object_file", "parse_merge", "plan_objects", "process_case", "run", "safe_name",
    "seg_file", "seg_masks", "series_file", "summarize", "write_seg_file",
]
