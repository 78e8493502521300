"""The ``labelmap`` engine: bring your own segmentation, placed on the series' exact grid.

Accepted ``SegmentRequest.labels_path``:

* a multilabel NIfTI (``.nii``/``.nii.gz``): class names from a sidecar (``<name>.json`` beside it,
  else ``classes.json`` in its folder, else ``options["classes"]``), else from TotalSegmentator's class
  map for ``task`` when TotalSegmentator is installed, else ``label_<id>``;
* a segnode run folder (``labels.nii.gz`` and ``classes.json``): its label map;
* a folder of per-class masks as TotalSegmentator writes them (``liver.nii.gz``, ``aorta.nii.gz``,
  ...): the file name is the class name; ids come from a ``classes.json`` in the folder, else from
  TotalSegmentator's map for ``task``, else the files are numbered 1..N in sorted order (said in the
  notes). Where masks overlap, the smaller structure wins (vessels inside an organ stay visible).

Class tables (sidecars) may be a list of ``{"id", "name", "color", "category", "property_category",
"property_type"}`` (what the phantom and :mod:`node.pipeline` write), a ``{"<id>": "<name>"}`` map, or
a dcmqi ``metainfo.json`` (``segmentAttributes``).

Geometry: labels on the series grid (within 1e-3 mm) are used as they are; labels on another grid in
the same patient space are resampled nearest-neighbour through both affines; labels that do not
overlap the series (``no_overlap``) or do not cover all of it (``labels_extent``: each edge may fall short
by one voxel of the coarser grid) are refused with :class:`~node.segment.SegmentationError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from node.classes import CATEGORIES, Code, LabelClass, LabelVolume
from node.nifti import NIFTI_SUFFIXES, nifti_stem, read_nifti
from node.segment import SegmentationError, SegmentRequest
from node.segment.snomed import fallback_color, guess_category
from node.volume import Geometry, Volume


# --- class tables -------------------------------------------------------------------------------


def _snomed_entry(name: str) -> Any:
    """TotalSegmentator's SNOMED mapping row for ``name``, or None (unknown name, or not installed)."""
    try:
        from node.segment.snomed import mapping

        return mapping().get(name)
    except Exception:
        return None


def _code(value: Any) -> Code | None:
    if isinstance(value, dict):
        value = {k.lower(): v for k, v in value.items()}
        cv = value.get("value", value.get("codevalue"))
        scheme = value.get("scheme", value.get("codingschemedesignator"))
        meaning = value.get("meaning", value.get("codemeaning"))
        if cv and scheme and meaning:
            return Code(str(cv), str(scheme), str(meaning))
    return None


def make_class(label_id: int, name: str, given: dict[str, Any] | None = None) -> LabelClass:
    """A LabelClass from what ``given`` says (``color``, ``category``, codes); what it lacks comes from
    TotalSegmentator's SNOMED mapping when the name is one of its structures, else from defaults."""
    given = given or {}
    entry = _snomed_entry(name)
    color = given.get("color")
    try:
        rgb = tuple(int(c) for c in color)[:3]  # type: ignore[union-attr]
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError
    except (TypeError, ValueError):
        rgb = entry.color if entry is not None and entry.color is not None else fallback_color(label_id)
    category = given.get("category")
    if category not in CATEGORIES:
        category = guess_category(name, entry)
    property_type = _code(given.get("property_type"))
    property_category = _code(given.get("property_category"))
    if property_type is None and entry is not None and entry.type is not None:
        property_type, property_category = entry.type, entry.category
    return LabelClass(
        id=label_id, name=name, color=rgb, category=category,  # type: ignore[arg-type]
        property_category=property_category, property_type=property_type,
    )


def read_class_table(path: Path) -> dict[int, LabelClass]:
    """Classes from a JSON class table (see the module docstring for the accepted shapes)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegmentationError("bad_classes", f"{path}: not a readable JSON class table ({exc})") from None
    rows: list[tuple[int, str, dict[str, Any]]] = []
    try:
        if isinstance(data, dict) and "segmentAttributes" in data:  # dcmqi metainfo.json
            for group in data["segmentAttributes"]:
                for seg in group:
                    name = seg.get("SegmentLabel") or seg.get("SegmentDescription")
                    name = name or f"label_{seg['labelID']}"
                    rows.append((int(seg["labelID"]), str(name), {
                        "color": seg.get("recommendedDisplayRGBValue"),
                        "property_category": seg.get("SegmentedPropertyCategoryCodeSequence"),
                        "property_type": seg.get("SegmentedPropertyTypeCodeSequence"),
                    }))
        elif isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, dict):
                    rows.append((int(key), str(value.get("name", f"label_{key}")), value))
                else:
                    rows.append((int(key), str(value), {}))
        elif isinstance(data, list):
            for entry in data:
                rows.append((int(entry["id"]), str(entry["name"]), entry))
        else:
            raise TypeError(type(data).__name__)
        return {i: make_class(i, name, extra) for i, name, extra in rows}
    except (KeyError, TypeError, ValueError) as exc:
        raise SegmentationError(
            "bad_classes", f"{path}: not a class table this node reads ({exc!r})"
        ) from None


def write_class_table(classes: dict[int, LabelClass], path: Path) -> Path:
    """Write ``classes`` as the JSON list :func:`read_class_table` reads (ids in order)."""

    def code(c: Code | None) -> dict[str, str] | None:
        return None if c is None else {"value": c.value, "scheme": c.scheme, "meaning": c.meaning}

    rows = [
        {"id": c.id, "name": c.name, "color": list(c.color), "category": c.category,
         "property_category": code(c.property_category), "property_type": code(c.property_type)}
        for c in sorted(classes.values(), key=lambda c: c.id)
    ]
    Path(path).write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    return Path(path)


def totalsegmentator_class_map(task: str) -> dict[int, str] | None:
    """TotalSegmentator's ``id -> name`` map of ``task``, or None when it is not installed."""
    try:
        from totalsegmentator.map_to_binary import class_map  # type: ignore[import-not-found]
    except Exception:  # not installed, or its import fails (torch/torchvision on this machine)
        return None
    table = class_map.get(task)
    return {int(k): str(v) for k, v in table.items()} if table else None


# --- geometry -----------------------------------------------------------------------------------


def _describe(geometry: Geometry, shape_kji: tuple[int, ...]) -> str:
    size = "x".join(str(n) for n in shape_kji[::-1])
    spacing = "x".join(f"{s:g}" for s in geometry.spacing)
    origin = ", ".join(f"{v:.1f}" for v in geometry.origin)
    return f"{size} voxels of {spacing} mm at ({origin})"


def _corners_lps(geometry: Geometry, shape_kji: tuple[int, ...]) -> np.ndarray:
    """The 8 outer corners (voxel edges, not centres) of a grid, in LPS mm."""
    k, j, i = shape_kji
    ijk = np.array([[a, b, c] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for c in (-0.5, k - 0.5)])
    return geometry.index_to_lps(ijk)


def place_on_grid(
    labels: Volume, target: Geometry, shape_kji: tuple[int, int, int]
) -> tuple[np.ndarray, str]:
    """``labels.array`` on the ``target`` grid, and a sentence saying how it got there.

    Same grid within 1e-3 mm: the array itself. Otherwise nearest-neighbour resampling through both
    affines (each target voxel centre takes the value of the label voxel containing it; outside the
    label grid: 0). No overlap at all, or not one labelled voxel landing on the target: refused.
    """
    shape_kji = tuple(int(n) for n in shape_kji)
    if labels.array.shape == shape_kji and labels.geometry.same_grid(target, atol_mm=1e-3):
        return labels.array, "labels are on the series grid"
    given, wanted = _describe(labels.geometry, labels.array.shape), _describe(target, shape_kji)
    # Overlap of the two boxes, tested in the target's index space.
    corners = target.lps_to_index(_corners_lps(labels.geometry, labels.array.shape))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    size_ijk = np.array(shape_kji[::-1], float)
    if np.any(hi < -0.5) or np.any(lo > size_ijk - 0.5):
        raise SegmentationError(
            "no_overlap",
            f"the labels ({given}) do not overlap the series ({wanted}) in patient space: "
            "they belong to another series or frame of reference",
        )
    # The labels must cover the whole series: a label map of part of it (a crop whose header kept the
    # full series' origin) would be placed on the wrong slices. Each edge may fall short by one voxel of
    # the coarser of the two grids (edges of grids of another resolution over the same field of view).
    allowed_mm = max(max(labels.geometry.spacing), max(target.spacing))
    short = np.maximum(lo - -0.5, 0) + np.maximum(size_ijk - 0.5 - hi, 0)  # target voxels, per axis
    if np.any(short * np.asarray(target.spacing) > allowed_mm + 1e-6):
        spans = ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("ijk", lo + 0.5, hi + 0.5))
        raise SegmentationError(
            "labels_extent",
            f"the labels ({given}) do not cover the series ({wanted}): in the series' voxels they span "
            f"{spans} of i 0..{shape_kji[2]}, j 0..{shape_kji[1]}, k 0..{shape_kji[0]} (allowed short by "
            f"{allowed_mm:g} mm at an edge); labels of part of the series cannot be placed on it",
        )
    # output index (k, j, i) -> LPS -> label index (i, j, k) -> label array index (k, j, i)
    to_label_ijk = np.linalg.inv(labels.geometry.affine) @ target.affine
    flip = np.zeros((4, 4))
    flip[:3, :3] = np.eye(3)[::-1]
    flip[3, 3] = 1.0
    m = flip @ to_label_ijk @ flip
    out = ndimage.affine_transform(
        labels.array, m[:3, :3], offset=m[:3, 3], output_shape=shape_kji, order=0, mode="constant", cval=0,
        output=labels.array.dtype,
    )
    if labels.array.any() and not out.any():
        raise SegmentationError(
            "no_overlap",
            f"not one labelled voxel of the labels ({given}) falls inside the series ({wanted})",
        )
    return out, f"labels resampled nearest-neighbour from {given} onto the series grid ({wanted})"


# --- reading labels -----------------------------------------------------------------------------


def _read(path: Path) -> Volume:
    try:
        return read_nifti(path)
    except FileNotFoundError:
        raise SegmentationError("labels_not_found", f"{path} does not exist") from None
    except Exception as exc:  # nibabel's ImageFileError, a 4-D image, a damaged gzip stream
        raise SegmentationError(
            "bad_labels", f"{path}: not a readable 3-D NIfTI label image ({exc})"
        ) from None


def _as_label_array(volume: Volume, path: Path) -> np.ndarray:
    data = volume.array
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise SegmentationError(
                "bad_labels", f"{path}: label values must be whole numbers ({data.dtype})"
            )
    if data.size and (data.min() < 0 or data.max() > 65535):
        raise SegmentationError(
            "bad_labels", f"{path}: label values must lie in 0..65535, found {data.min()}..{data.max()}"
        )
    return data.astype(np.uint8 if data.size == 0 or data.max() < 256 else np.uint16)


def _sidecar(path: Path, request: SegmentRequest) -> Path | None:
    explicit = request.options.get("classes")
    if explicit:
        if not Path(str(explicit)).is_file():
            raise SegmentationError("bad_classes", f"class table {explicit} does not exist")
        return Path(str(explicit))
    folder = path if path.is_dir() else path.parent
    candidates = [] if path.is_dir() else [path.with_name(nifti_stem(path) + ".json")]
    for candidate in [*candidates, folder / "classes.json"]:
        if candidate.is_file():
            return candidate
    return None


class LabelmapEngine:
    """Labels the user already has (a NIfTI or a TotalSegmentator output folder), on the series grid."""

    name = "labelmap"

    def segment(self, volume: Volume, request: SegmentRequest) -> LabelVolume:
        raw = request.labels_path or request.options.get("labels")
        if not raw:
            raise SegmentationError(
                "no_labels",
                "the labelmap engine needs --labels: a label NIfTI or a folder of per-class masks",
            )
        path = Path(str(raw))
        if not path.exists():
            raise SegmentationError("labels_not_found", f"{path} does not exist")
        notes: list[str] = []
        if path.is_dir() and (path / "labels.nii.gz").is_file():  # a segnode run folder: its label map
            path = path / "labels.nii.gz"
        if path.is_dir():
            array, table = self._from_folder(path, volume, request, notes)
        elif path.name.endswith(NIFTI_SUFFIXES):
            array, table = self._from_multilabel(path, volume, request, notes)
        else:
            raise SegmentationError(
                "unsupported_labels",
                f"{path}: give a .nii/.nii.gz label image or a folder of per-class masks",
            )
        present = [int(v) for v in np.unique(array) if v != 0]
        classes = {i: table.get(i) or make_class(i, f"label_{i}") for i in present}
        unnamed = [i for i in present if i not in table]
        if unnamed:
            more = " ..." if len(unnamed) > 10 else ""
            notes.append(f"no name for id(s) {unnamed[:10]}{more}: called label_<id>")
        empty = sorted(set(table) - set(present))
        if empty:
            notes.append(f"{len(empty)} class(es) of the table have no voxel on this series")
        return LabelVolume(array=array, geometry=volume.geometry, source=volume.source, notes=notes,
                           classes=classes)

    def _table_for(self, path: Path, request: SegmentRequest, notes: list[str]) -> dict[int, LabelClass]:
        sidecar = _sidecar(path, request)
        if sidecar is not None:
            notes.append(f"class names from {sidecar.name}")
            return read_class_table(sidecar)
        names = totalsegmentator_class_map(request.task)
        if names is not None:
            notes.append(f"class names from TotalSegmentator's '{request.task}' class map")
            return {i: make_class(i, n) for i, n in names.items()}
        return {}

    def _from_multilabel(self, path: Path, volume: Volume, request: SegmentRequest, notes: list[str]):
        labels = _read(path)
        labels.array = _as_label_array(labels, path)
        array, how = place_on_grid(labels, volume.geometry, volume.array.shape)
        notes.append(how)
        table = self._table_for(path, request, notes)
        if not table:
            notes.append(
                "no class table beside the labels and TotalSegmentator is not installed: "
                "ids are named label_<id>"
            )
        return array, table

    def _from_folder(self, folder: Path, volume: Volume, request: SegmentRequest, notes: list[str]):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise SegmentationError("bad_labels", f"{folder} holds no .nii/.nii.gz masks")
        names = [nifti_stem(p) for p in files]
        table = self._table_for(folder, request, notes)
        by_name = {c.name: c for c in table.values()}
        ids: dict[str, int] = {}
        next_id = max(table, default=0) + 1
        unknown = []
        for name in names:
            if name in by_name:
                ids[name] = by_name[name].id
            else:
                unknown.append(name)
        if not table:
            notes.append(
                "TotalSegmentator is not installed and the folder has no classes.json: "
                f"the {len(files)} masks are numbered 1..{len(files)} in sorted file-name order"
            )
            next_id = 1
        elif unknown:
            notes.append(
                f"{len(unknown)} mask(s) not in the class table, numbered from {next_id}: {unknown[:5]}"
            )
        for name in unknown:
            ids[name] = next_id
            next_id += 1
        if next_id > 65536:
            raise SegmentationError("bad_labels", f"{folder}: more classes than label ids")
        classes = {ids[n]: by_name[n] if n in by_name else make_class(ids[n], n) for n in names}

        # Masks are streamed (a full TotalSegmentator folder is 117 masks): each grid gets one combined
        # array, placed once on the series grid. Where masks overlap, the smaller structure wins.
        dtype = np.uint8 if max(ids.values()) < 256 else np.uint16
        size_of = np.zeros(65536, np.int64)  # voxel count of each id's mask, 0 = background
        combined: dict[tuple, tuple[Geometry, np.ndarray]] = {}
        overlap = 0
        for name, file in zip(names, files):
            mask_volume = _read(file)
            data = mask_volume.array
            if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
                raise SegmentationError("bad_labels", f"{file}: the mask holds NaN or infinite values")
            key = (data.shape, tuple(np.round(mask_volume.geometry.affine, 3).ravel()))
            if key not in combined:
                combined[key] = (mask_volume.geometry, np.zeros(data.shape, dtype))
            target = combined[key][1]
            where = np.flatnonzero(data.ravel() != 0)
            label_id = ids[name]
            size_of[label_id] = where.size
            current = target.ravel()[where]
            overlap += int(np.count_nonzero(current))
            wins = (current == 0) | (size_of[current] > where.size)
            target.ravel()[where[wins]] = label_id
        out = np.zeros(volume.array.shape, dtype)
        for geometry, array in combined.values():
            placed, how = place_on_grid(Volume(array, geometry), volume.geometry, volume.array.shape)
            notes.append(how)
            overlap += int(np.count_nonzero(out[placed != 0]))
            np.copyto(out, placed, where=placed != 0)
        if overlap:
            notes.append(f"{overlap} voxel(s) claimed by more than one mask went to the smaller structure")
        notes.append(f"{len(files)} mask(s) read from {folder.name}/")
        return out, classes
