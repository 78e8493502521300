"""Inventory of XNAT case folders: ``StudySeries_info.json`` and ``Segmentations_info.json``.

An XNAT session exported with its folder structure looks like::

    2072/
      SCANS/<n>/DICOM/*.dcm + scan_<n>_catalog.xml      one folder per series
      ASSESSORS/SEG_<date>_<time>_<ms>_S<n>/SEG/        one DICOM-SEG (all segments' frames stacked)
                                   SEG_<...>.dcm + SEG_catalog.xml (author, creation time)

Only headers are read here (two files per series, the SEG without pixels); nothing is ever
written into the case folders. Every problem is recorded on the series, the SEG or the case
(``{"code": ..., "message": ...}``) and the inventory goes on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.errors import NodeError
from node.xnat.catalog import CatalogError, find_catalog, read_catalog

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SERIES_INFO = "StudySeries_info.json"
SEGMENTATIONS_INFO = "Segmentations_info.json"
CASES_INFO = "Cases_info.json"

#: Header fields compared between the two files read per series.
SERIES_FIELDS = {
    "series_number": "SeriesNumber",
    "series_uid": "SeriesInstanceUID",
    "series_description": "SeriesDescription",
    "sop_class_uid": "SOPClassUID",
    "modality": "Modality",
}


class XnatError(NodeError, ValueError):
    """A problem with an XNAT folder as a whole; ``code`` is stable for programs."""


def problem(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def folder_key(name: str) -> tuple:
    """Sort key: numeric folder names in numeric order, then the rest by name."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _child(folder: Path, name: str) -> Path | None:
    """``folder/name``, matched without regard to case (``SCANS``, ``scans``)."""
    if not folder.is_dir():
        return None
    exact = folder / name
    if exact.is_dir():
        return exact
    return next((p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.upper() == name.upper()), None)


def is_case(folder: Path) -> bool:
    return _child(folder, "SCANS") is not None or _child(folder, "ASSESSORS") is not None


def find_cases(path: Path) -> list[Path]:
    """``path`` if it is a case folder (it has SCANS or ASSESSORS), else its sub-folders.

    In a parent of cases every visible sub-folder counts, so that a broken case is reported rather
    than skipped. :class:`XnatError` when ``path`` is missing or nothing in it looks like a case.
    """
    path = Path(path)
    if not path.is_dir():
        raise XnatError("not_found", f"{path} is not a folder")
    if is_case(path):
        return [path]
    children = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: folder_key(p.name))
    if not any(is_case(p) for p in children):
        raise XnatError("no_cases", f"{path} has no SCANS or ASSESSORS folder, nor any sub-folder with one")
    return children


def check_output(out: Path, root: Path, cases: list[Path]) -> None:
    """Refuse an output folder inside the input (``root`` or a case), or one whose ``<case>`` folder
    would be an input case folder itself: inputs are never written."""
    out = Path(out).resolve()
    for folder in [Path(root), *cases]:
        folder = folder.resolve()
        if out == folder or out.is_relative_to(folder):
            raise XnatError("output_in_input", f"output {out} is inside the input {folder}; choose another folder")
    for case in cases:
        if (out / case.name).resolve() == case.resolve():
            raise XnatError("output_in_input", f"output {out / case.name} would be the input case folder itself")


def write_json(path: Path, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _value(ds: Dataset, keyword: str) -> object:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword == "SeriesNumber":
        try:
            return int(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None when it is not one."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
        return None


def _files(folder: Path) -> list[Path]:
    """Files of a resource folder other than XML catalogs, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".xml"
                  and not p.name.startswith("."))


# --- SCANS -----------------------------------------------------------------------------------


def scan_folders(case_dir: Path) -> list[tuple[str, Path]]:
    """(folder name, files folder) per series: ``SCANS/<n>/DICOM`` if present, else ``SCANS/<n>``."""
    scans = _child(Path(case_dir), "SCANS")
    if scans is None:
        return []
    folders = sorted((p for p in scans.iterdir() if p.is_dir()), key=lambda p: folder_key(p.name))
    return [(p.name, _child(p, "DICOM") or p) for p in folders]


def describe_scan(name: str, folder: Path, case_dir: Path) -> dict:
    """One series folder: identity from two of its files (first and last), catalog, file count."""
    files = _files(folder)
    info: dict = {
        "folder": name, "path": str(folder.resolve()), "relative_path": folder.relative_to(case_dir).as_posix(),
        **{key: None for key in SERIES_FIELDS}, "files": len(files), "files_read": [],
        "catalog": None, "catalog_uid": None, "catalog_entries": None,
        "disagreements": {}, "warnings": [], "error": None,
    }
    catalog_path = find_catalog(folder)
    if catalog_path is None:
        info["warnings"].append(problem("no_catalog", "no catalog XML beside the files"))
    else:
        try:
            catalog = read_catalog(catalog_path)
            info.update(catalog=catalog_path.relative_to(case_dir).as_posix(), catalog_uid=catalog.uid,
                        catalog_entries=len(catalog.entries))
            if len(catalog.entries) != len(files):
                info["disagreements"]["catalog_entries"] = [len(catalog.entries), len(files)]
        except CatalogError as exc:
            info["warnings"].append(problem(exc.code, exc.message))
    if not files:
        info["error"] = problem("no_files", f"SCANS/{name} has no files")
        return info
    # Two files, one from each end; a file that is not DICOM is passed over.
    headers: list[tuple[Path, Dataset]] = []
    for candidates in (files, files[::-1]):
        for path in candidates:
            if headers and path == headers[0][0]:
                break
            ds = _header(path)
            if ds is not None:
                headers.append((path, ds))
                break
            info["warnings"].append(problem("not_dicom", f"{path.name} is not a DICOM file"))
    info["warnings"] = list({w["message"]: w for w in info["warnings"]}.values())
    if not headers:
        info["error"] = problem("no_dicom", f"none of the {len(files)} file(s) in SCANS/{name} is DICOM")
        return info
    info["files_read"] = [p.name for p, _ in headers]
    for key, keyword in SERIES_FIELDS.items():
        values = [_value(ds, keyword) for _, ds in headers]
        info[key] = values[0]
        if len(values) == 2 and values[0] != values[1]:
            info["disagreements"][key] = values
    if info["catalog_uid"] and info["series_uid"] and info["catalog_uid"] != info["series_uid"]:
        info["disagreements"]["catalog_uid"] = [info["catalog_uid"], info["series_uid"]]
    return info


# --- ASSESSORS -------------------------------------------------------------------------------


def assessor_folders(case_dir: Path) -> list[tuple[str, Path]]:
    """(assessor folder name, folder holding its files): ``ASSESSORS/<name>/SEG`` if present."""
    assessors = _child(Path(case_dir), "ASSESSORS")
    if assessors is None:
        return []
    out = []
    for p in sorted((p for p in assessors.iterdir() if p.is_dir()), key=lambda p: p.name):
        inner = _child(p, "SEG")
        if inner is None:
            subdirs = [d for d in sorted(p.iterdir()) if d.is_dir() and _files(d)]
            inner = subdirs[0] if len(subdirs) == 1 and not _files(p) else p
        out.append((p.name, inner))
    return out


def _first(ds: Dataset, sequence: str, keyword: str) -> object:
    """An attribute from the shared functional groups, else the first frame's, else the top level."""
    for groups_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_name)
        if groups and sequence in groups[0] and len(groups[0][sequence].value) and keyword in groups[0][sequence][0]:
            return groups[0][sequence][0][keyword].value
    return ds.get(keyword)


def _floats(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _code(code: object) -> dict | None:
    """A :class:`~node.classes.Code` as JSON."""
    if code is None:
        return None
    return {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}  # type: ignore[attr-defined]


def describe_seg_file(path: Path) -> dict:
    """What a DICOM-SEG says about itself: name, references, segments (frames per segment), geometry.

    Parsed by the node's one SEG reader (:func:`node.dicom.seg.parse_seg`); raises its ``SegError``.
    """
    from node.dicom.seg import parse_seg

    parsed = parse_seg(path)
    ds = parsed.dataset
    counts = parsed.frame_counts
    lab = {int(item.get("SegmentNumber", 0) or 0): item.get("RecommendedDisplayCIELabValue")
           for item in ds.get("SegmentSequence") or []}
    ref_series = list(parsed.referenced_series)
    ref_classes = sorted({
        str(inst.get("ReferencedSOPClassUID", ""))
        for item in ds.get("ReferencedSeriesSequence") or [] for inst in item.get("ReferencedInstanceSequence") or []
    } - {""})
    segments = []
    for seg in parsed.segments.values():
        segments.append({
            "number": seg.number, "label": seg.label,
            "category": seg.category.meaning if seg.category else None,
            "type": seg.type.meaning if seg.type else None,
            "category_code": _code(seg.category), "type_code": _code(seg.type),
            "algorithm_type": seg.algorithm_type or None,
            "color_cielab": [int(v) for v in lab[seg.number]] if lab.get(seg.number) else None,
            "color_rgb": list(seg.color) if seg.color else None,
            "frames": counts.get(seg.number, 0),
        })
    return {
        "name": _value(ds, "SeriesDescription"),
        "content_label": _value(ds, "ContentLabel"),
        "content_creator": _value(ds, "ContentCreatorName"),
        "content_date": _value(ds, "ContentDate"),
        "content_time": _value(ds, "ContentTime"),
        "sop_instance_uid": _value(ds, "SOPInstanceUID"),
        "series_uid": _value(ds, "SeriesInstanceUID"),
        "series_number": _value(ds, "SeriesNumber"),
        "frame_of_reference_uid": parsed.frame_of_reference_uid or None,
        "referenced_series_uid": ref_series[0] if ref_series else None,
        "referenced_series_uids": ref_series,
        "referenced_sop_class_uid": ref_classes[0] if ref_classes else None,
        "segmentation_type": parsed.segmentation_type,
        "rows": parsed.rows,
        "columns": parsed.columns,
        "frames": len(parsed.frames),
        "pixel_spacing": list(parsed.pixel_spacing) if parsed.pixel_spacing else None,
        "slice_thickness": _floats(_first(ds, "PixelMeasuresSequence", "SliceThickness")),
        "spacing_between_slices": parsed.spacing_between_slices,
        "image_orientation": [float(v) for v in parsed.orientation] if parsed.orientation is not None else None,
        "segments": segments,
        "notes": list(parsed.notes),
    }


def describe_assessor(name: str, folder: Path, case_dir: Path, series_by_uid: dict[str, list[str]]) -> dict:
    """One ASSESSORS folder: its SEG file, its catalog (author, time) and the SEG's own header."""
    info: dict = {
        "folder": name, "path": str(folder.resolve()), "relative_path": folder.relative_to(case_dir).as_posix(),
        "file": None, "catalog": None, "author": None, "created": None,
        "matched_series": None, "warnings": [], "error": None,
    }
    catalog_path = find_catalog(folder)
    if catalog_path is None:
        info["warnings"].append(problem("no_catalog", "no SEG_catalog.xml: author and creation time unknown"))
    else:
        try:
            catalog = read_catalog(catalog_path)
            info.update(catalog=catalog_path.relative_to(case_dir).as_posix(), author=catalog.created_by,
                        created=catalog.created_time)
        except CatalogError as exc:
            info["warnings"].append(problem(exc.code, exc.message))
    files = _files(folder) if folder.is_dir() else []
    headers = [(p, ds) for p in files if (ds := _header(p)) is not None]
    segs = [(p, ds) for p, ds in headers if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS]
    if not segs:
        kinds = sorted({str(getattr(ds.SOPClassUID, "name", ds.get("SOPClassUID"))) for _, ds in headers
                        if "SOPClassUID" in ds})
        if kinds:
            info["error"] = problem("not_seg", f"not a DICOM-SEG assessor ({', '.join(kinds)})")
        else:
            info["error"] = problem("no_seg_file", f"no DICOM file in {info['relative_path']}")
        return info
    if len(segs) > 1:
        info["error"] = problem(
            "several_seg_files", f"{len(segs)} SEG files in one assessor: {', '.join(p.name for p, _ in segs)}")
        return info
    path, _ = segs[0]
    info["file"] = str(path.resolve())
    from node.dicom.seg import SegError

    try:
        info.update(describe_seg_file(path))
    except SegError as exc:
        info["error"] = problem(exc.code, f"{path.name}: {exc.message}")
        return info
    if info["author"] is None and info.get("content_creator"):
        info["author"] = info["content_creator"]
    matched = series_by_uid.get(info["referenced_series_uid"] or "", [])
    if matched:
        info["matched_series"] = matched[0]
        if len(matched) > 1:
            info["warnings"].append(problem(
                "series_ambiguous", f"several SCANS folders hold the referenced series: {', '.join(matched)}"))
    else:
        info["warnings"].append(problem(
            "series_not_found", f"no SCANS folder holds the referenced series {info['referenced_series_uid']}"))
    return info


# --- a case ----------------------------------------------------------------------------------


@dataclass
class CaseInventory:
    """Both inventories of one case folder (the JSON documents as dicts)."""

    case: str
    path: Path
    series: dict
    segmentations: dict

    @property
    def problems(self) -> list[dict]:
        """Every problem of the case, its series and its SEGs (errors, not warnings), for summaries."""
        found = list(self.series["problems"])
        for doc, key in ((self.series, "series"), (self.segmentations, "segmentations")):
            found += [{"where": name, **info["error"]} for name, info in doc[key].items() if info.get("error")]
        return found

    def series_folder(self, uid: str) -> dict | None:
        """The series entry (first SCANS folder) whose SeriesInstanceUID is ``uid``."""
        return next((s for s in self.series["series"].values() if s["series_uid"] == uid), None)


def _unexpected(exc: Exception) -> dict[str, str]:
    if isinstance(exc, OSError):
        return problem("io_error", str(exc))
    return problem("unreadable", f"{type(exc).__name__}: {exc}")


def inventory_case(case_dir: Path) -> CaseInventory:
    """Both inventories of ``case_dir``; problems are recorded, never raised."""
    case_dir = Path(case_dir)
    base = {"case": case_dir.name, "path": str(case_dir.resolve())}
    problems: list[dict] = []
    if not case_dir.is_dir():
        problems.append(problem("not_found", f"{case_dir} is not a folder"))
    elif not is_case(case_dir):
        problems.append(problem("not_a_case", "neither a SCANS nor an ASSESSORS folder"))
    else:
        for sub in ("SCANS", "ASSESSORS"):
            if _child(case_dir, sub) is None:
                problems.append(problem(f"no_{sub.lower()}", f"no {sub} folder"))
    series: dict[str, dict] = {}
    for name, folder in scan_folders(case_dir) if case_dir.is_dir() else []:
        try:
            series[name] = describe_scan(name, folder, case_dir)
        except Exception as exc:  # noqa: BLE001 - one unreadable folder must not stop the inventory
            series[name] = {"folder": name, "path": str(folder), "error": _unexpected(exc)}
    by_uid: dict[str, list[str]] = {}
    for name, s in series.items():
        if s.get("series_uid"):
            by_uid.setdefault(s["series_uid"], []).append(name)
    segmentations: dict[str, dict] = {}
    for name, folder in assessor_folders(case_dir) if case_dir.is_dir() else []:
        try:
            segmentations[name] = describe_assessor(name, folder, case_dir, by_uid)
        except Exception as exc:  # noqa: BLE001 - one unreadable folder must not stop the inventory
            segmentations[name] = {"folder": name, "path": str(folder), "error": _unexpected(exc)}
    return CaseInventory(
        case=case_dir.name, path=case_dir,
        series={**base, "series": series, "problems": problems},
        segmentations={**base, "segmentations": segmentations,
                       "problems": [p for p in problems if p["code"] != "no_scans"]},
    )


def write_inventory(inventory: CaseInventory, out_case_dir: Path) -> dict[str, Path]:
    """``StudySeries_info.json`` and ``Segmentations_info.json`` in ``out_case_dir``."""
    out_case_dir = Path(out_case_dir)
    return {
        "series": write_json(out_case_dir / SERIES_INFO, inventory.series),
        "segmentations": write_json(out_case_dir / SEGMENTATIONS_INFO, inventory.segmentations),
    }


def case_summary(inventory: CaseInventory, out_case_dir: Path, **extra: object) -> dict:
    """One line of ``Cases_info.json``."""
    return {
        "case": inventory.case, "path": str(inventory.path.resolve()), "output": str(Path(out_case_dir).resolve()),
        "series": len(inventory.series["series"]), "segmentations": len(inventory.segmentations["segmentations"]),
        **extra, "problems": inventory.problems,
    }


def run_inventory(
    path: Path, out: Path, progress: Callable[[int, int, str], None] | None = None
) -> list[dict]:
    """Inventory every case under ``path`` into ``out/<case>/``; writes ``out/Cases_info.json`` too.

    ``progress(done, total, case)`` is called before each case and once at the end.
    """
    cases = find_cases(path)
    check_output(out, Path(path), cases)
    summaries = []
    for n, case_dir in enumerate(cases):
        if progress:
            progress(n, len(cases), case_dir.name)
        inventory = inventory_case(case_dir)
        out_case = Path(out) / case_dir.name
        write_inventory(inventory, out_case)
        summaries.append(case_summary(inventory, out_case))
    if progress:
        progress(len(cases), len(cases), "")
    write_json(Path(out) / CASES_INFO, {"input": str(Path(path).resolve()), "cases": summaries})
    return summaries
