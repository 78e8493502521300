"""NIfTI read/write at the edges (TotalSegmentator input/output, user exports).

NIfTI stores RAS world coordinates and an ``[i, j, k]`` array; a :class:`~node.volume.Volume`
keeps LPS and ``[k, j, i]``. Both conversions happen here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from node.volume import LPS_TO_RAS, Geometry, Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: Path) -> str:
    """``path``'s name without ``.nii.gz`` / ``.nii`` (``Path.stem`` would keep ``.nii``)."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def class_table_path(nifti: Path | str) -> Path:
    """Where a label file's own class table goes: ``<name>.classes.json`` beside ``<name>.nii.gz`` (two
    label files in one folder keep their tables apart)."""
    nifti = Path(nifti)
    return nifti.with_name(nifti_stem(nifti) + ".classes.json")


def to_nifti_image(volume: Volume) -> nib.Nifti1Image:
    """An in-memory NIfTI-1 image whose sform and qform both carry the volume's exact grid."""
    data = volume.array.transpose(2, 1, 0)  # an F-contiguous view: nibabel writes it without a copy
    image = nib.Nifti1Image(data, volume.geometry.affine_ras)
    image.set_sform(volume.geometry.affine_ras, code=1)  # 1 = scanner coordinates
    image.set_qform(volume.geometry.affine_ras, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_nifti(volume: Volume, path: Path) -> Path:
    """Write ``volume`` to ``path`` (``.nii`` or ``.nii.gz``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(to_nifti_image(volume), str(path))
    return path


def from_nifti_image(image: nib.Nifti1Image) -> Volume:
    """A Volume from a 3-D NIfTI image (sform if set, else qform, as nibabel chooses).

    The stored values are returned as-is (scl_slope/scl_inter applied only if present).
    """
    shape = image.shape
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise ValueError(f"expected a 3-D NIfTI image, got shape {shape}")
    data = np.asanyarray(image.dataobj).reshape(shape[:3])
    slope, inter = image.header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        data = data * (slope or 1.0) + (inter or 0.0)
    geometry = Geometry.from_affine(LPS_TO_RAS @ image.affine)
    return Volume(array=np.ascontiguousarray(data.transpose(2, 1, 0)), geometry=geometry)


def read_nifti(path: Path) -> Volume:
    """Read a 3-D ``.nii``/``.nii.gz`` file as a Volume."""
    return from_nifti_image(nib.load(str(path)))
