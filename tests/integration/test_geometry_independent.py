"""Our Volume geometry against two independent readers: dcm2niix (Debian) and SimpleITK (GDCM).

Every case must agree to 1e-4 mm on the voxel-to-patient mapping and exactly on the voxel values.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo, write_series
from node.nifti import to_nifti_image
from tests.unit.test_series import SHARED, oblique_direction, ramp_volume

pytestmark = pytest.mark.integration

TOLERANCE_MM = 1e-4


def _case(name: str, tmp: Path) -> Path:
    folder = tmp / name
    if name == "dcmqi-ct-3slice":
        shutil.copytree(SHARED / "dcmqi/ct-3slice", folder)
    elif name == "pydicom-CT2-contiguous":
        # The three contiguous slices; with the fourth the series has a gap and is refused.
        folder.mkdir()
        for file in ("17136", "17166", "17196"):
            shutil.copy(SHARED / "pydicom/CT2_series" / file, folder / f"{file}.dcm")
    elif name == "oblique":
        write_series(ramp_volume(shape=(5, 24, 28), direction=oblique_direction(25)), folder, SeriesInfo(uid_seed="o"))
    elif name == "phantom":
        from node.phantom import TINY, write_phantom

        folder = write_phantom(TINY, tmp / "phantom-out")["dicom"]
    return folder


CASES = ["dcmqi-ct-3slice", "pydicom-CT2-contiguous", "oblique", "phantom"]


@pytest.mark.parametrize("name", CASES)
def test_geometry_matches_simpleitk(name: str, tmp_path: Path) -> None:
    folder = _case(name, tmp_path)
    ours = read_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    np.testing.assert_allclose(ours.geometry.origin, image.GetOrigin(), atol=TOLERANCE_MM)
    np.testing.assert_allclose(ours.geometry.spacing, image.GetSpacing(), atol=TOLERANCE_MM)
    np.testing.assert_allclose(np.array(ours.geometry.direction).ravel(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("name", CASES)
def test_geometry_matches_dcm2niix(name: str, tmp_path: Path) -> None:
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix (Debian package dcm2niix) is not installed")
    folder = _case(name, tmp_path)
    out = tmp_path / "dcm2niix"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "vol", "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    (theirs_path,) = out.glob("vol*.nii")
    theirs = nib.as_closest_canonical(nib.load(theirs_path))
    ours = nib.as_closest_canonical(to_nifti_image(read_series(folder)))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=TOLERANCE_MM)
    np.testing.assert_array_equal(np.asarray(ours.get_fdata()), np.asarray(theirs.get_fdata()))
