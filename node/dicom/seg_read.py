"""Read any DICOM Segmentation onto a grid: the one SEG reader of the node (import, editor, XNAT).

:func:`read_seg` gives a :class:`~node.classes.LabelVolume` on the source's grid (or on the SEG's own
grid when no source is given); :func:`read_seg_masks` gives one boolean mask per segment instead (for
segments that overlap). Both rest on three public steps that other importers can use alone:

1. :func:`parse_seg`: the segments and, per frame, its segment, referenced source image and position.
   Tolerant: vendor SEGs that lack optional or even required attributes (no
   SegmentedPropertyCategoryCodeSequence, no SegmentSequence at all, no SegmentationType, positions
   only at the top level) are read with notes; highdicom's strict reader is used only to cross-check
   in the tests.
2. :func:`place_frames`: on which slice (and where in-plane) of a grid each frame lies; see there.
3. :func:`seg_grid`: the grid of a SEG's own plane positions, when there is no source.

Frames are placed by the SOP instance (+ frame number) they derive from when the source's identity
knows it, else by ImagePositionPatient projected on the grid's slice normal; the notes say which. A SEG
whose FrameOfReferenceUID differs from the source's is read all the same, with a note (pydicom-seg, for
one, writes a new FrameOfReferenceUID). Where segments overlap, the later segment (higher position in
the SegmentSequence) wins in :func:`read_seg`, and the overlap is reported in the notes.

Label ids: the private label id that segnode writes (:data:`node.dicom.seg_write.PRIVATE_CREATOR`), else
the segment number (in a LABELMAP SEG, the pixel value is the segment number, mapped to the label id
like any other segment's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.classes import Code, LabelClass, LabelVolume
from node.dicom.codes import cielab_to_rgb
from node.dicom.seg_write import LABEL_ID_OFFSET, PRIVATE_CREATOR, PRIVATE_GROUP, SegError
from node.volume import Geometry, SeriesIdentity, Volume

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "BINARY/FRACTIONAL",
    "1.2.840.10008.5.1.4.1.1.66.7": "LABELMAP",
}
_MULTI = (list, tuple, pydicom.multival.MultiValue)
#: How far (mm) a frame may lie from a grid slice (along the normal, as a fraction of the slice step) and
#: from a whole pixel in-plane, and still be placed there.
NORMAL_TOLERANCE = 0.1
IN_PLANE_TOLERANCE = 0.1


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG, as described in its SegmentSequence (anything missing is ``None``)."""

    number: int
    label: str
    label_id: int
    category: Code | None = None
    type: Code | None = None
    type_modifier: Code | None = None
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None
    color: tuple[int, int, int] | None = None
    algorithm_type: str = ""
    algorithm_name: str = ""
    algorithm_version: str = ""


@dataclass(frozen=True)
class SegFrame:
    """One frame of a SEG: its index (0-based), segment number (``None`` for LABELMAP), the source image
    it derives from (SOP instance UID, frame number for multi-frame sources) and its position (LPS mm)."""

    index: int
    segment: int | None
    sop_uid: str | None = None
    frame_number: int | None = None
    position: tuple[float, float, float] | None = None


@dataclass
class ParsedSeg:
    """A SEG's description without its pixels decoded (:func:`parse_seg`)."""

    dataset: Dataset
    segmentation_type: str
    segments: dict[int, Segment]
    frames: list[SegFrame]
    rows: int
    columns: int
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing), mm
    spacing_between_slices: float | None
    frame_of_reference_uid: str
    #: Referenced series UID -> its referenced SOP instance UIDs (ReferencedSeriesSequence).
    referenced_series: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    @property
    def frame_counts(self) -> Counter[int | None]:
        return Counter(f.segment for f in self.frames)


@dataclass
class Placement:
    """Where each frame lies on a grid: slice ``k`` and the in-plane offset ``(j0, i0)`` of its first
    pixel, -1 in ``k`` for a frame that lies on no slice. ``method`` is ``reference``, ``position`` or
    ``reference+position`` (some frames each way)."""

    k: np.ndarray
    j0: np.ndarray
    i0: np.ndarray
    method: str
    notes: list[str] = field(default_factory=list)


@dataclass
class SegmentMasks:
    """One boolean mask per segment (by label id) on a grid (:func:`read_seg_masks`)."""

    geometry: Geometry
    masks: dict[int, np.ndarray]
    classes: dict[int, LabelClass]
    source: SeriesIdentity | None = None
    notes: list[str] = field(default_factory=list)


# --- parsing ---------------------------------------------------------------------------------------


def _code(seq: Any) -> Code | None:
    try:
        item = seq[0]
        value = str(item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or "")
        scheme = str(item.get("CodingSchemeDesignator", ""))
        if value or scheme:
            return Code(value, scheme, str(item.get("CodeMeaning", "")))
    except Exception:
        pass
    return None


def _label_id(item: Dataset) -> int | None:
    try:
        block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        value = block[LABEL_ID_OFFSET].value
        if isinstance(value, bytes):  # UN: stored with implicit VR and read without our dictionary entry
            value = int.from_bytes(value, "little") if len(value) == 2 else None
        value = int(value[0] if isinstance(value, _MULTI) else value)
        return value if 0 < value < 65536 else None
    except Exception:
        return None


def _segment(item: Dataset, number: int) -> Segment:
    type_seq = item.get("SegmentedPropertyTypeCodeSequence")
    region_seq = item.get("AnatomicRegionSequence")
    type_modifier = type_seq[0].get("SegmentedPropertyTypeModifierCodeSequence") if type_seq else None
    region_modifier = region_seq[0].get("AnatomicRegionModifierSequence") if region_seq else None
    color = None
    lab = item.get("RecommendedDisplayCIELabValue")
    if lab is not None and len(lab) == 3:
        color = cielab_to_rgb(tuple(int(v) for v in lab))  # type: ignore[arg-type]
    algorithm = (item.get("SegmentationAlgorithmIdentificationSequence") or [Dataset()])[0]
    return Segment(
        number=number,
        label=str(item.get("SegmentLabel") or f"segment_{number}"),
        label_id=_label_id(item) or number,
        category=_code(item.get("SegmentedPropertyCategoryCodeSequence")),
        type=_code(type_seq),
        type_modifier=_code(type_modifier),
        anatomic_region=_code(region_seq),
        anatomic_region_modifier=_code(region_modifier),
        color=color,
        algorithm_type=str(item.get("SegmentAlgorithmType", "")),
        algorithm_name=str(algorithm.get("AlgorithmName") or item.get("SegmentAlgorithmName") or ""),
        algorithm_version=str(algorithm.get("AlgorithmVersion", "")),
    )


def _first(groups: Sequence[Dataset], sequence: str, keyword: str, top: Dataset | None = None) -> Any:
    for group in groups:
        try:
            if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
                return group[sequence][0][keyword].value
        except Exception:
            continue
    return top.get(keyword) if top is not None else None


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _reference(item: Dataset) -> tuple[str | None, int | None]:
    """(ReferencedSOPInstanceUID, ReferencedFrameNumber) of the frame's first source image."""
    try:
        for derivation in item.get("DerivationImageSequence") or []:
            for source in derivation.get("SourceImageSequence") or []:
                uid = source.get("ReferencedSOPInstanceUID")
                if uid:
                    number = source.get("ReferencedFrameNumber")
                    if isinstance(number, _MULTI):
                        number = number[0] if len(number) else None
                    frame = int(number) if number not in (None, "") else None
                    return str(uid), frame
    except Exception:
        pass
    return None, None


def _read(seg: Path | str | Dataset) -> Dataset:
    if isinstance(seg, Dataset):
        return seg
    try:
        return pydicom.dcmread(seg)
    except Exception as exc:
        raise SegError("not_dicom", f"{seg}: not a readable DICOM file ({exc})") from None


def parse_seg(seg: Path | str | Dataset) -> ParsedSeg:
    """The segments and frames of a SEG file or dataset, tolerating missing attributes (see the notes)."""
    ds = _read(seg)
    notes: list[str] = []
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class not in SEG_SOP_CLASSES and modality != "SEG":
        raise SegError("not_seg", f"not a DICOM Segmentation (SOP class {sop_class or 'missing'}, "
                                  f"modality {modality or 'missing'})")
    if "PixelData" not in ds:
        raise SegError("no_pixels", "the SEG has no pixel data")
    kind = str(ds.get("SegmentationType", "")).upper()
    if not kind:
        kind = "LABELMAP" if SEG_SOP_CLASSES.get(sop_class) == "LABELMAP" else (
            "BINARY" if int(ds.get("BitsAllocated", 1)) == 1 else "FRACTIONAL")
        notes.append(f"no SegmentationType: taken as {kind}")
    if kind not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise SegError("unsupported", f"SegmentationType {kind} is not supported")
    if kind == "FRACTIONAL":
        top = _maximum_fractional(ds)
        notes.append(f"FRACTIONAL ({ds.get('SegmentationFractionalType', 'PROBABILITY')}) SEG read as "
                     f"binary: a voxel is in a segment where its value is at least {top / 2:g} (half of "
                     f"MaximumFractionalValue {top})")
    labelmap = kind == "LABELMAP"

    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if per_frame and len(per_frame) != n_frames:
        notes.append(f"{len(per_frame)} per-frame functional groups for {n_frames} frames: "
                     f"using the first {min(len(per_frame), n_frames)}")
        n_frames = min(len(per_frame), n_frames)

    segments: dict[int, Segment] = {}
    lacking: dict[str, list[int]] = {}
    for index, item in enumerate(ds.get("SegmentSequence") or []):
        try:
            number = int(item.get("SegmentNumber"))
        except (TypeError, ValueError):
            number = index + 1
            notes.append(f"segment item {index + 1} has no SegmentNumber: taken as {number}")
        if labelmap and number == 0:
            continue  # the background of a LABELMAP SEG
        for keyword in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
                        "SegmentLabel", "SegmentAlgorithmType"):
            if not item.get(keyword):
                lacking.setdefault(keyword, []).append(number)
        segments[number] = _segment(item, number)
    for keyword, numbers in lacking.items():
        notes.append(f"segment(s) {numbers} lack {keyword}")

    frames: list[SegFrame] = []
    for index in range(n_frames):
        groups = ([per_frame[index]] if per_frame else []) + shared
        number = None
        if not labelmap:
            value = _first(groups, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            try:
                number = int(value)
            except (TypeError, ValueError):
                number = next(iter(segments), 1) if len(segments) <= 1 else None
                if number is None:
                    raise SegError("no_segment", f"frame {index + 1} names no segment "
                                                 "(ReferencedSegmentNumber)") from None
        uid, frame_number = _reference(per_frame[index]) if per_frame else (None, None)
        position = _floats(_first(groups, "PlanePositionSequence", "ImagePositionPatient", ds), 3)
        frames.append(SegFrame(index, number, uid, frame_number,
                               tuple(float(v) for v in position) if position is not None else None))
    if not labelmap:
        for number in sorted({f.segment for f in frames} - set(segments)):  # type: ignore[arg-type]
            segments[number] = Segment(number, f"segment_{number}", number)  # type: ignore[arg-type]
            notes.append(f"segment {number} has frames but no description in the SegmentSequence")
    segments = dict(sorted(segments.items()))
    ids = [seg.label_id for seg in segments.values()]
    if len(set(ids)) != len(ids):  # private ids that collide: segment numbers instead
        segments = {n: replace(seg, label_id=n) for n, seg in segments.items()}
        notes.append("label ids in the SEG collide: segment numbers used as ids")

    groups = shared + per_frame[:1]
    orientation = _floats(_first(groups, "PlaneOrientationSequence", "ImageOrientationPatient", ds), 6)
    spacing = _floats(_first(groups, "PixelMeasuresSequence", "PixelSpacing", ds), 2)
    between = _first(groups, "PixelMeasuresSequence", "SpacingBetweenSlices", ds)
    try:
        between_mm = float(between) if between not in (None, "") else None
    except (TypeError, ValueError):
        between_mm = None
    referenced: dict[str, list[str]] = {}
    for item in ds.get("ReferencedSeriesSequence") or []:
        instances = item.get("ReferencedInstanceSequence") or []
        uids = [str(i.get("ReferencedSOPInstanceUID", "")) for i in instances]
        referenced[str(item.get("SeriesInstanceUID", ""))] = uids
    return ParsedSeg(
        dataset=ds, segmentation_type=kind, segments=segments, frames=frames,
        rows=int(ds.Rows), columns=int(ds.Columns), orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        spacing_between_slices=between_mm if between_mm and between_mm > 0 else None,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        referenced_series=referenced, notes=notes,
    )


# --- grids -----------------------------------------------------------------------------------------


def _axes(orientation: np.ndarray) -> np.ndarray:
    from node.dicom.series import VolumeError, plane_axes

    try:
        row, col = plane_axes(orientation)
    except VolumeError as exc:
        raise SegError("no_geometry", str(exc)) from None
    return np.column_stack([row, col, np.cross(row, col)])


def _regular_steps(along: np.ndarray, step: float | None) -> tuple[float, np.ndarray]:
    """The slice step of sorted distinct positions along the normal and each one's slice index; the
    positions may have gaps (whole steps) but must lie on one regular grid."""
    if len(along) == 1:
        return (step or 1.0), np.zeros(1, int)
    diffs = np.diff(along)
    if step is None or not np.allclose(diffs / step, np.round(diffs / step), atol=NORMAL_TOLERANCE):
        step = float(np.median(diffs)) if np.allclose(diffs, np.median(diffs), rtol=0.01, atol=0.005) \
            else float(diffs.min())
    index = (along - along[0]) / step
    if np.max(np.abs(index - np.round(index))) > NORMAL_TOLERANCE:
        raise SegError("no_geometry", "plane positions are not on a regular grid "
                                      f"(steps {diffs.round(3).tolist()[:8]} mm)")
    return step, np.round(index).astype(int)


def seg_grid(parsed: ParsedSeg) -> Geometry:
    """The grid of a SEG's own frames: its orientation and pixel spacing, slices at its distinct plane
    positions along the normal (gaps between them filled at the slice step: SpacingBetweenSlices when
    it fits, else the positions' own step), in-plane wide enough for every frame."""
    if parsed.orientation is None or parsed.pixel_spacing is None:
        raise SegError("no_geometry",
                       "the SEG has no ImageOrientationPatient or PixelSpacing: give the source")
    positions = [f.position for f in parsed.frames if f.position is not None]
    if not positions:
        raise SegError("no_geometry", "the SEG's frames have no ImagePositionPatient: give the source")
    d = _axes(parsed.orientation)
    pts = np.array(positions)
    along = np.unique(np.round(pts @ d[:, 2], 3))
    step, _ = _regular_steps(along, parsed.spacing_between_slices)
    row_spacing, col_spacing = parsed.pixel_spacing
    u = (pts - pts[0]) @ d[:, 0] / col_spacing
    v = (pts - pts[0]) @ d[:, 1] / row_spacing
    origin = pts[0] + u.min() * col_spacing * d[:, 0] + v.min() * row_spacing * d[:, 1]
    origin = origin + (along[0] - origin @ d[:, 2]) * d[:, 2]
    return Geometry(origin=tuple(float(x) for x in origin), spacing=(col_spacing, row_spacing, step),
                    direction=tuple(tuple(float(x) for x in r) for r in d))


def _grid_shape(parsed: ParsedSeg, geometry: Geometry) -> tuple[int, int, int]:
    pts = np.array([f.position for f in parsed.frames if f.position is not None])
    ijk = geometry.lps_to_index(pts)
    top = np.round(ijk.max(axis=0)).astype(int)
    return int(top[2]) + 1, int(top[1]) + parsed.rows, int(top[0]) + parsed.columns


def source_grid(path: Path | str, series_uid: str | None = None) -> Volume:
    """The grid (and identity) of the image series under ``path`` (``series_uid`` picks one of several),
    for placing SEG frames on it.

    A regular series is read by :func:`node.dicom.series.read_series`. A series with whole slices
    missing, which that reader refuses, still gives a grid here: the missing slices are part of it,
    without an image (their ``instance_uids`` entries are empty). The array is the images' pixels
    (zeros in missing slices).
    """
    from node.dicom.series import (
        NON_IMAGE_SOP_CLASSES,
        VolumeError,
        read_datasets,
        read_series,
        volume_from_datasets,
    )

    try:
        return read_series(Path(path), series_uid)
    except VolumeError as exc:
        error = exc
        if exc.code != "missing_slices":
            raise SegError(f"source_{exc.code}", f"source {path}: {exc}") from None
    datasets = [(n, ds) for n, ds in read_datasets(Path(path))[0]
                if str(ds.get("SOPClassUID", "")) not in NON_IMAGE_SOP_CLASSES and "PixelData" in ds
                and series_uid in (None, str(ds.get("SeriesInstanceUID", "")))]
    if any("ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds for _, ds in datasets):
        raise SegError("source_missing_slices", f"source {path}: {error}")
    pieces = []  # contiguous runs, each a regular volume
    d = _axes(_floats(datasets[0][1].ImageOrientationPatient, 6))  # type: ignore[arg-type]
    def distance(ds: Dataset) -> float:
        return float(np.asarray(ds.ImagePositionPatient, dtype=float) @ d[:, 2])

    datasets.sort(key=lambda item: distance(item[1]))
    along = np.array([distance(ds) for _, ds in datasets])
    step, index = _regular_steps(along, None)
    runs = np.split(np.arange(len(datasets)), np.flatnonzero(np.diff(index) > 1) + 1)
    for run in runs:
        pieces.append(volume_from_datasets([datasets[i] for i in run], min_slices=1))
    first = pieces[0]
    nk = int(index[-1]) + 1
    array = np.zeros((nk, *first.array.shape[1:]), dtype=np.result_type(*[p.array.dtype for p in pieces]))
    uids = [""] * nk
    frames = [0] * nk
    for run, piece in zip(runs, pieces):
        ks = index[run]
        array[ks] = piece.array
        for k, uid, fn in zip(ks, piece.source.instance_uids,  # type: ignore[union-attr]
                              piece.source.frame_numbers or [0] * len(ks)):  # type: ignore[union-attr]
            uids[int(k)], frames[int(k)] = uid, fn
    geometry = Geometry(origin=first.geometry.origin, spacing=(*first.geometry.spacing[:2], step),
                        direction=first.geometry.direction)
    identity = first.source

    identity = replace(identity, instance_uids=tuple(uids),  # type: ignore[arg-type]
                       frame_numbers=tuple(frames) if any(frames) else ())
    missing = nk - len(datasets)
    return Volume(array, geometry, identity, notes=[
        (f"source has {missing} missing slice(s) in {len(runs) - 1} gap(s): they are part of the grid, "
        "without an image (frames are placed by referenced instance or position on the files themselves)")])


# --- placing frames --------------------------------------------------------------------------------


def place_frames(frames: Sequence[SegFrame], geometry: Geometry, shape: tuple[int, int, int],
                 identity: SeriesIdentity | None = None, *, frame_size: tuple[int, int] | None = None,
                 orientation: np.ndarray | None = None, pixel_spacing: tuple[float, float] | None = None,
                 by_reference: bool = True) -> Placement:
    """Where each SEG frame lies on the grid ``geometry`` of ``shape`` (k, j, i).

    A frame is placed **by reference** when the SOP instance (+ frame number) it derives from is one of
    ``identity.instance_uids`` (the source's slices in k order): its slice is that instance's index.
    Otherwise it is placed **by position**: its ImagePositionPatient projected on the grid's slice normal
    must lie within :data:`NORMAL_TOLERANCE` of the slice step from a slice. The in-plane offset of its
    first pixel comes from its position too (frames cropped in-plane are placed where they belong), and
    is 0 for a frame without a position. A frame that lies on no slice, or outside the grid, gets
    ``k = -1`` and a note. ``orientation`` and ``pixel_spacing`` (the SEG's) must match the grid's.

    Used by :func:`read_seg`; public so that other importers (XNAT) place frames the same way.
    """
    notes: list[str] = []
    d = geometry.direction_matrix
    grid_orientation = np.concatenate([d[:, 0], d[:, 1]])
    if orientation is not None and np.max(np.abs(np.asarray(orientation) - grid_orientation)) > 1e-3:
        raise SegError("orientation_mismatch", f"the SEG's orientation {np.round(orientation, 4).tolist()} "
                                               "differs from the source's")
    in_plane = (geometry.spacing[1], geometry.spacing[0])
    if pixel_spacing is not None and not np.allclose(pixel_spacing, in_plane, rtol=1e-3, atol=1e-4):
        raise SegError("spacing_mismatch", f"the SEG's PixelSpacing {list(pixel_spacing)} differs from the "
                                           f"source's {list(in_plane)}")
    nk, nj, ni = shape
    rows, cols = frame_size or (nj, ni)
    lookup: dict[tuple[str, int], int] = {}
    if identity is not None and by_reference:
        numbers = identity.frame_numbers or (0,) * len(identity.instance_uids)
        for k, (uid, number) in enumerate(zip(identity.instance_uids, numbers)):
            if uid:
                lookup[(uid, int(number or 0))] = k
    k_out = np.full(len(frames), -1, int)
    j_out = np.zeros(len(frames), int)
    i_out = np.zeros(len(frames), int)
    by: Counter[str] = Counter()
    off_grid = unknown_refs = disagree = 0
    full_size = (rows, cols) == (nj, ni)
    for n, frame in enumerate(frames):
        k_ref = None
        if frame.sop_uid is not None and lookup:
            k_ref = lookup.get((frame.sop_uid, int(frame.frame_number or 0)))
            if k_ref is None and frame.frame_number in (None, 1):
                k_ref = lookup.get((frame.sop_uid, 0))  # a single-frame source referenced as frame 1
            unknown_refs += k_ref is None
        ijk = geometry.lps_to_index(np.asarray(frame.position))[0] if frame.position is not None else None
        whole = np.round(ijk).astype(int) if ijk is not None else None
        limits = (IN_PLANE_TOLERANCE, IN_PLANE_TOLERANCE, NORMAL_TOLERANCE)
        on_grid = ijk is not None and bool(np.all(np.abs(ijk - whole) <= limits))
        if k_ref is not None:
            k, method = k_ref, "reference"
            if full_size:  # the reference says where; a position that says otherwise is only noted
                j0 = i0 = 0
                disagree += ijk is not None and not (on_grid and tuple(whole) == (0, 0, k_ref))
            elif ijk is not None and on_grid:
                j0, i0 = int(whole[1]), int(whole[0])
            else:
                off_grid += 1
                continue
        elif ijk is not None:
            if not on_grid:
                off_grid += 1
                continue
            k, j0, i0, method = int(whole[2]), int(whole[1]), int(whole[0]), "position"
        else:
            continue
        if not 0 <= k < nk or j0 + rows <= 0 or i0 + cols <= 0 or j0 >= nj or i0 >= ni:
            off_grid += 1
            continue
        k_out[n], j_out[n], i_out[n] = k, j0, i0
        by[method] += 1
    method = "+".join(m for m in ("reference", "position") if by[m]) or "none"
    if by["reference"]:
        notes.append(f"{by['reference']} frame(s) placed by referenced SOP instance")
    if by["position"]:
        notes.append(f"{by['position']} frame(s) placed by ImagePositionPatient projected on the grid's "
                     "slice normal")
    if disagree:
        notes.append(f"{disagree} frame(s) have an ImagePositionPatient that is not their referenced "
                     "instance's: the reference was used")
    if unknown_refs:
        notes.append(f"{unknown_refs} frame(s) reference instances that are not in the source")
    if off_grid:
        notes.append(f"{off_grid} frame(s) lie outside the grid or between its slices: left out")
    unplaced = int((k_out < 0).sum()) - off_grid
    if unplaced > 0:
        notes.append(f"{unplaced} frame(s) have neither a known reference nor a position: left out")
    return Placement(k_out, j_out, i_out, method, notes)


# --- pixels ----------------------------------------------------------------------------------------


def frame_pixels(ds: Dataset, rows: int, cols: int, count: int) -> Callable[[int], np.ndarray]:
    """A function giving frame ``index``'s stored values as a (rows, cols) array. Native pixel data is
    read frame by frame (bit-packed BINARY frames unpacked LSB first, PS3.5 8.1.1); RLE with Bits
    Allocated 1 and Deflated Image Frame Compression by :mod:`node.dicom.frame_codecs`; other
    encapsulated data (RLE, JPEG 2000, ...) is decoded once by pydicom. A transfer syntax none of them
    decodes is a ``SegError`` (``unsupported_transfer_syntax``) that names it."""
    from node.dicom.frame_codecs import DECODERS, OWN_DECODERS, RLE_LOSSLESS

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    bits = int(ds.get("BitsAllocated", 1))
    n = rows * cols
    uid = pydicom.uid.UID(str(ts)) if ts else None
    name = OWN_DECODERS.get(str(ts)) or (uid.name if uid is not None else "")
    try:
        encapsulated = uid is not None and (str(ts) in OWN_DECODERS or uid.is_encapsulated)
    except ValueError:  # a UID pydicom does not know as a transfer syntax
        raise SegError("unsupported_transfer_syntax",
                       f"the SEG's transfer syntax {ts} is not one this node can decode") from None
    if encapsulated:
        decoder = DECODERS.get(str(ts))
        if decoder is not None and (str(ts) != RLE_LOSSLESS or bits == 1):
            from pydicom.encaps import generate_frames

            try:
                fragments = list(generate_frames(ds.PixelData, number_of_frames=count))
                decoded = [decoder(fragment, rows, cols, bits) for fragment in fragments]
            except Exception as exc:  # a truncated or malformed stream
                raise SegError("pixel_data",
                               f"the SEG's {name} pixel data cannot be decoded: {exc}") from None
            if len(decoded) < count:
                raise SegError("pixel_data", f"the SEG's {name} pixel data holds {len(decoded)} frames, "
                                             f"{count} expected")
            return decoded.__getitem__
        from pydicom.pixels import iter_pixels

        try:
            decoded = [frame.reshape(rows, cols) for frame in iter_pixels(ds, raw=True)]
        except NotImplementedError as exc:  # pydicom has no decoder (plugin) for it
            raise SegError("unsupported_transfer_syntax",
                           f"the SEG's transfer syntax {ts} ({name}) cannot be decoded here: {exc}") from None
        except Exception as exc:
            raise SegError("pixel_data", f"the SEG's {name} ({ts}) pixel data cannot be decoded: "
                                         f"{type(exc).__name__}: {exc}") from None
        return decoded.__getitem__
    data = ds.PixelData
    needed = (count * n * bits + 7) // 8
    if len(data) < needed:
        raise SegError("pixel_data",
                       f"the SEG's pixel data is {len(data)} bytes, {count} frames need {needed}")
    if bits == 1:
        def unpack(index: int) -> np.ndarray:
            start = index * n
            chunk = np.frombuffer(data, np.uint8, count=(start + n + 7) // 8 - start // 8, offset=start // 8)
            return np.unpackbits(chunk, bitorder="little")[start % 8: start % 8 + n].reshape(rows, cols)

        return unpack
    dtype = {8: np.dtype(np.uint8), 16: np.dtype("<u2"), 32: np.dtype("<u4")}.get(bits)
    if dtype is None:
        raise SegError("unsupported", f"BitsAllocated {bits} is not supported")

    def frame(index: int) -> np.ndarray:
        return np.frombuffer(data, dtype, count=n, offset=index * dtype.itemsize * n).reshape(rows, cols)

    return frame


def _maximum_fractional(ds: Dataset) -> int:
    """MaximumFractionalValue (PS3.3 C.8.20.2; 255 when missing or not a positive number)."""
    try:
        value = int(ds.get("MaximumFractionalValue", 255) or 255)
    except (TypeError, ValueError):
        return 255
    return value if value > 0 else 255


def frame_masks(parsed: ParsedSeg, values: np.ndarray, frame: SegFrame) -> Iterator[tuple[int, np.ndarray]]:
    """(segment number, mask) for each segment in a frame's stored values: the frame's segment for
    BINARY; for FRACTIONAL, where the value is at least half of MaximumFractionalValue; each described
    segment number present for LABELMAP."""
    if parsed.segmentation_type == "LABELMAP":
        for number in np.unique(values):
            if number and int(number) in parsed.segments:
                yield int(number), values == number
        return
    if parsed.segmentation_type == "FRACTIONAL":
        yield frame.segment, values >= _maximum_fractional(parsed.dataset) / 2.0  # type: ignore[misc]
        return
    yield frame.segment, values.astype(bool)  # type: ignore[misc]


_masks_of = frame_masks  # the name an earlier adapter (node.xnat.export) imports


# --- reading ---------------------------------------------------------------------------------------


def _classes(parsed: ParsedSeg) -> dict[int, LabelClass]:
    from node.segment.snomed import SnomedEntry, fallback_color, guess_category

    classes = {}
    for s in parsed.segments.values():
        if not 0 < s.label_id < 65536:
            continue
        entry = SnomedEntry(s.label, s.category, s.type, s.type_modifier, s.anatomic_region,
                            s.anatomic_region_modifier, s.color)
        classes[s.label_id] = LabelClass(
            id=s.label_id, name=s.label, color=s.color or fallback_color(s.label_id),
            category=guess_category(s.label, entry), property_category=s.category, property_type=s.type)
    return classes


def _grid(parsed: ParsedSeg, source: Volume | Path | str | None) -> tuple[Geometry, tuple[int, int, int],
                                                                          SeriesIdentity | None, list[str]]:
    notes: list[str] = []
    if source is None:
        geometry = seg_grid(parsed)
        shape = _grid_shape(parsed, geometry)
        series = next(iter(parsed.referenced_series), "")
        identity = SeriesIdentity(study_uid=str(parsed.dataset.get("StudyInstanceUID", "")),
                                  series_uid=series, frame_of_reference_uid=parsed.frame_of_reference_uid,
                                  modality="", sop_class_uid="")
        notes.append("no source: the grid is the SEG's own plane positions")
        return geometry, shape, identity, notes
    if isinstance(source, Volume):
        volume = source
    else:  # the series the SEG references, when a folder holds several
        referenced = [uid for uid in parsed.referenced_series if uid]
        try:
            volume = source_grid(source, referenced[0] if len(referenced) == 1 else None)
        except SegError as exc:
            if exc.code != "source_series_not_found":
                raise
            volume = source_grid(source)
            notes.append(f"the series the SEG references ({referenced[0]}) is not in {source}: its one "
                         "series was used")
    notes.extend(n for n in volume.notes if "missing slice" in n)
    identity = volume.source
    if identity is not None and parsed.frame_of_reference_uid and identity.frame_of_reference_uid \
            and parsed.frame_of_reference_uid != identity.frame_of_reference_uid:
        notes.append(f"the SEG's FrameOfReferenceUID {parsed.frame_of_reference_uid} differs from the "
                     f"source's {identity.frame_of_reference_uid}: its positions are taken in the source's "
                     "frame")
    return volume.geometry, volume.array.shape, identity, notes  # type: ignore[return-value]


def _read_frames(seg: Path | str | Dataset, source: Volume | Path | str | None):
    parsed = parse_seg(seg)
    geometry, shape, identity, notes = _grid(parsed, source)
    placement = place_frames(parsed.frames, geometry, shape, identity,
                             frame_size=(parsed.rows, parsed.columns), orientation=parsed.orientation,
                             pixel_spacing=parsed.pixel_spacing)
    if len(parsed.frames) and not (placement.k >= 0).any():
        raise SegError("no_match", "no frame of the SEG lies on the source: " + "; ".join(placement.notes))
    return parsed, geometry, shape, identity, notes + parsed.notes + placement.notes, placement


def _paste(target: np.ndarray, k: int, j0: int, i0: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``mask`` inside the grid and the matching view of slice ``k`` of ``target``."""
    nj, ni = target.shape[1:]
    rows, cols = mask.shape
    js, je = max(j0, 0), min(j0 + rows, nj)
    is_, ie = max(i0, 0), min(i0 + cols, ni)
    return target[k, js:je, is_:ie], mask[js - j0: je - j0, is_ - i0: ie - i0]


def read_seg(seg: Path | str | Dataset, source: Volume | Path | str | None = None) -> LabelVolume:
    """The SEG's segments as a label volume on ``source``'s grid (a Volume, or its DICOM folder/zip/file),
    or on the SEG's own grid (:func:`seg_grid`) without a source.

    Overlapping segments: the later segment in the SegmentSequence wins; the overlap (voxels per pair
    of labels) is in the notes. Use :func:`read_seg_masks` to keep every segment whole.
    """
    parsed, geometry, shape, identity, notes, placement = _read_frames(seg, source)
    classes = _classes(parsed)
    id_of = {s.number: s.label_id for s in parsed.segments.values()}
    rank = {number: r for r, number in enumerate(parsed.segments)}
    dtype = np.uint8 if max(classes, default=0) < 256 else np.uint16
    out = np.zeros(shape, dtype)
    overlap: Counter[tuple[int, int]] = Counter()
    pixels = frame_pixels(parsed.dataset, parsed.rows, parsed.columns, len(parsed.frames))
    # Later segments win: frames in SegmentSequence order (LABELMAP frames hold every segment at once).
    order = sorted(range(len(parsed.frames)), key=lambda n: (rank.get(parsed.frames[n].segment, -1), n))
    for n in order:
        k = int(placement.k[n])
        if k < 0:
            continue
        for number, mask in frame_masks(parsed, pixels(n), parsed.frames[n]):
            label = id_of.get(number)
            if label is None or label not in classes:
                continue
            view, part = _paste(out, k, int(placement.j0[n]), int(placement.i0[n]), mask)
            previous = view[part]
            hit = previous[(previous != 0) & (previous != label)]
            if hit.size:
                for other, count in zip(*np.unique(hit, return_counts=True)):
                    overlap[(int(other), label)] += int(count)
            view[part] = label
    if overlap:
        pairs = ", ".join(f"{a}/{b}: {c}" for (a, b), c in sorted(overlap.items()))
        notes.append(f"segments overlap ({sum(overlap.values())} voxel(s); earlier/later label: voxels "
                     f"{pairs}); the later segment wins")
    empty = sorted(set(classes) - {int(v) for v in np.unique(out)})
    if empty:
        notes.append(f"segment(s) with label id(s) {empty} have no voxels on the grid")
    return LabelVolume(out, geometry, source=identity, notes=notes, classes=classes)


def read_seg_masks(seg: Path | str | Dataset, source: Volume | Path | str | None = None) -> SegmentMasks:
    """Like :func:`read_seg`, one boolean mask per segment (label id), overlaps kept."""
    parsed, geometry, shape, identity, notes, placement = _read_frames(seg, source)
    classes = _classes(parsed)
    id_of = {s.number: s.label_id for s in parsed.segments.values()}
    masks = {label: np.zeros(shape, bool) for label in classes}
    pixels = frame_pixels(parsed.dataset, parsed.rows, parsed.columns, len(parsed.frames))
    for n in range(len(parsed.frames)):
        k = int(placement.k[n])
        if k < 0:
            continue
        for number, mask in frame_masks(parsed, pixels(n), parsed.frames[n]):
            label = id_of.get(number)
            if label in masks:
                view, part = _paste(masks[label], k, int(placement.j0[n]), int(placement.i0[n]), mask)
                view |= part
    return SegmentMasks(geometry, masks, classes, identity, notes)


def describe_seg(seg: Path | str | Dataset) -> dict[str, Any]:
    """What ``segnode seg info`` shows: type, series, references and, per segment, its codes, colour
    and frame count."""
    parsed = parse_seg(seg)
    ds = parsed.dataset
    counts = parsed.frame_counts

    def code(c: Code | None) -> dict[str, str] | None:
        return None if c is None else {"value": c.value, "scheme": c.scheme, "meaning": c.meaning}

    segments = []
    for s in parsed.segments.values():
        frames = counts.get(s.number, 0) if parsed.segmentation_type != "LABELMAP" else None
        segments.append({
            "number": s.number, "label_id": s.label_id, "label": s.label,
            "category": code(s.category), "type": code(s.type), "type_modifier": code(s.type_modifier),
            "anatomic_region": code(s.anatomic_region), "color": list(s.color) if s.color else None,
            "algorithm": s.algorithm_type, "algorithm_name": s.algorithm_name, "frames": frames,
        })
    return {
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "series_number": ds.get("SeriesNumber"), "series_description": str(ds.get("SeriesDescription", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "segmentation_type": parsed.segmentation_type, "frames": len(parsed.frames),
        "rows": parsed.rows, "columns": parsed.columns,
        "frame_of_reference_uid": parsed.frame_of_reference_uid,
        "referenced_series": {uid: len(uids) for uid, uids in parsed.referenced_series.items()},
        "segments": segments, "notes": parsed.notes,
    }
