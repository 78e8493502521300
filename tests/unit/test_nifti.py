"""NIfTI edge: exact geometry both ways, LPS<->RAS once."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from node.nifti import read_nifti, write_nifti
from tests.unit.test_series import oblique_direction, ramp_volume


def test_round_trip_is_exact(tmp_path: Path) -> None:
    volume = ramp_volume(direction=oblique_direction(30))
    back = read_nifti(write_nifti(volume, tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.geometry.affine, volume.geometry.affine, atol=1e-4)


def test_nifti_holds_ras_and_ijk(tmp_path: Path) -> None:
    volume = ramp_volume()
    image = nib.load(write_nifti(volume, tmp_path / "v.nii"))
    k, j, i = volume.array.shape
    assert image.shape == (i, j, k)
    x, y, z = volume.geometry.origin
    np.testing.assert_allclose(image.affine[:3, 3], [-x, -y, z], atol=1e-5)  # LPS origin -> RAS
    assert image.header.get_sform(coded=True)[1] == 1 and image.header.get_qform(coded=True)[1] == 1
    assert np.asarray(image.dataobj)[3, 2, 1] == volume.array[1, 2, 3]
