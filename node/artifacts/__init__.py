"""Artifacts beside the labels: meshes, a Blender scene with a slice add-on, PNG slices.

* :mod:`node.artifacts.mesh`: one closed, manifold mesh per structure (STL/OBJ/PLY) in patient space;
* :mod:`node.artifacts.mesh_dicom`: the meshes as Encapsulated STL instances in the study (``dicom_mesh``);
* :mod:`node.artifacts.review`: the one-page review sheet, PNG, PDF and Encapsulated PDF (``review``);
* :mod:`node.artifacts.slices`: PNG stacks (axial/coronal/sagittal), ``slices.json``, a contact sheet;
* :mod:`node.artifacts.blender`: the node's side of the Blender scene (finds Blender, writes the manifest);
  :mod:`node.artifacts.blender_scene` and :mod:`node.artifacts.blender_slices_addon` run inside Blender;
* :mod:`node.artifacts.palette`: ``exact`` / ``auto`` colours and JSON colour mappings.

As pipeline outputs (``--output-kind meshes|slices|blender``, :data:`node.pipeline.OUTPUT_STAGES`) they
write ``meshes/``, ``slices/`` + ``contact_sheet.png`` and ``scene.blend`` into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.classes import LabelClass, LabelVolume
from node.nifti import NIFTI_SUFFIXES, class_table_path, nifti_stem


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


def nifti_label_table(path: Path) -> dict[int, str] | None:
    """``id -> name`` from a NIfTI header extension holding a label table, as TotalSegmentator 2.x writes
    it (``nifti_ext_header.add_label_map_to_nifti``: a Caret/CIFTI ``<LabelTable>`` of ``<Label Key=..>``
    elements in an extension of code 0); None when the file carries none."""
    import xml.etree.ElementTree as ET

    import nibabel as nib

    try:
        extensions = nib.load(str(path)).header.extensions
    except Exception:
        return None
    for extension in extensions:
        try:
            content = extension.get_content()
            text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
            if "<LabelTable" not in text:
                continue
            root = ET.fromstring(text.strip().rstrip("\x00"))
        except Exception:
            continue
        table = {}
        for label in root.iter("Label"):
            key, name = label.get("Key"), (label.text or "").strip()
            if key is not None and key.lstrip("-").isdigit() and int(key) > 0 and name:
                table[int(key)] = name
        if table:
            return table
    return None


def _fitting_tasks(ids: set[int]) -> list[str]:
    """TotalSegmentator tasks whose class map has every id in ``ids``, smallest map first."""
    try:
        from totalsegmentator.map_to_binary import class_map  # type: ignore[import-not-found]
    except Exception:
        return []
    fitting = [(len(m), task) for task, m in class_map.items() if ids <= {int(k) for k in m}]
    return [task for _, task in sorted(fitting)]


def class_table(path: Path, classes: Path | str | None = None, task: str = "total",
                ids: set[int] | None = None) -> dict[int, LabelClass]:
    """The full class table for a label file, the file's own where it has one: ``classes`` if given,
    else ``<name>.classes.json`` or ``<name>.json`` beside it, else the label table in its NIfTI header
    (TotalSegmentator's), else ``classes.json`` in its folder, else TotalSegmentator's map of ``task``
    (assumed: a warning, in the log and on the console, names the ``ids`` that map lacks and the tasks
    whose map has them all), else empty."""
    import logging

    from node.segment.labelmap import make_class, read_class_table, totalsegmentator_class_map

    log = logging.getLogger(__name__)
    if classes:
        if not Path(classes).is_file():
            raise FileNotFoundError(f"class table {classes} does not exist")
        return read_class_table(Path(classes))
    for candidate in (class_table_path(path), path.with_name(nifti_stem(path) + ".json")):
        if candidate.is_file():
            return read_class_table(candidate)
    own = nifti_label_table(path)
    if own:
        log.info("%s: class names from the label table in its NIfTI header (%d classes)", path.name, len(own))
        return {i: make_class(i, n) for i, n in own.items()}
    if (path.parent / "classes.json").is_file():
        return read_class_table(path.parent / "classes.json")
    names = totalsegmentator_class_map(task)
    if names and ids:  # an assumption: the same ids mean other structures in other tasks (MR, CT)
        missing = sorted(ids - set(names))
        fits = [t for t in _fitting_tasks(ids) if t != task][:3] if missing else []
        lacking = (f", which has no label id(s) {_ids_text(missing)} (named label_<id>)"
                   + (f"; the ids fit --task {' / '.join(fits)}" if fits else "")) if missing else ""
        log.warning("%s has no class table: names assumed from TotalSegmentator's %r map%s; give --classes "
                    "or --task if it is another task's", path.name, task, lacking)
    return {i: make_class(i, n) for i, n in (names or {}).items()}


def _ids_text(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:12])) + (f" and {len(ids) - 12} more" if len(ids) > 12 else "")


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
    present = [int(i) for i in np.unique(array) if i]
    table = class_table(file, classes, task, ids=set(present))
    found = {i: table.get(i) or make_class(i, f"label_{i}") for i in present}
    return LabelVolume(array, volume.geometry, notes=list(volume.notes), classes=found), table
