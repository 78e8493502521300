"""Artifacts beside the labels: meshes, a Blender scene with a slice add-on, PNG slices.

* :mod:`node.artifacts.mesh`: one closed, manifold mesh per structure (STL/OBJ/PLY) in patient space;
* :mod:`node.artifacts.slices`: PNG stacks (axial/coronal/sagittal), ``slices.json``, a contact sheet;
* :mod:`node.artifacts.blender`: the node's side of the Blender scene (finds Blender, writes the manifest);
  :mod:`node.artifacts.blender_scene` and :mod:`node.artifacts.blender_slices_addon` run inside Blender;
* :mod:`node.artifacts.palette`: ``exact`` / ``auto`` colours and JSON colour mappings.

As pipeline outputs (``--output meshes|slices|blender``, :data:`node.pipeline.OUTPUT_STAGES`) they
write ``meshes/``, ``slices/`` + ``contact_sheet.png`` and ``scene.blend`` into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.classes import LabelClass, LabelVolume

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def label_path(path: Path | str) -> Path:
    """A label NIfTI, or ``labels.nii.gz`` of a run folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "labels.nii.gz"
        if not candidate.is_file():
            raise FileNotFoundError(f"{path} has no labels.nii.gz")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: give a label .nii/.nii.gz or a run folder")
    return path


def class_table(path: Path, classes: Path | str | None = None, task: str = "total") -> dict[int, LabelClass]:
    """The full class table for a label file: ``classes`` if given, else ``<name>.json`` beside it, else
    ``classes.json`` in its folder, else TotalSegmentator's map of ``task`` (when installed), else empty."""
    from node.segment.labelmap import make_class, read_class_table, totalsegmentator_class_map

    candidates = [Path(classes)] if classes else [path.with_name(_stem(path) + ".json"), path.parent / "classes.json"]
    for candidate in candidates:
        if candidate.is_file():
            return read_class_table(candidate)
    if classes:
        raise FileNotFoundError(f"class table {classes} does not exist")
    names = totalsegmentator_class_map(task)
    return {i: make_class(i, n) for i, n in (names or {}).items()}


def load_labels(path: Path | str, classes: Path | str | None = None,
                task: str = "total") -> tuple[LabelVolume, dict[int, LabelClass]]:
    """A label NIfTI as a :class:`LabelVolume` (classes of the ids present) and the full class table
    (every class the table knows, present or not: what ``--write-empty`` looks for)."""
    from node.nifti import read_nifti
    from node.segment.labelmap import make_class

    file = label_path(path)
    volume = read_nifti(file)
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ValueError(f"{file}: not a label image (non-integer values)")
        array = rounded
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"{file}: label ids must be 0..65535")
    array = array.astype(np.uint8 if array.size == 0 or array.max() < 256 else np.uint16)
    table = class_table(file, classes, task)
    present = [int(i) for i in np.unique(array) if i]
    found = {i: table.get(i) or make_class(i, f"label_{i}") for i in present}
    return LabelVolume(array, volume.geometry, notes=list(volume.notes), classes=found), table
