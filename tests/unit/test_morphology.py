"""node.segment.morphology gives exactly SciPy's voxels (the reference it replaces for speed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from node.segment import morphology

RNG = np.random.default_rng(7)
SPARSE = RNG.random((15, 40, 50)) > 0.85  # many small components
HALF = RNG.random((15, 40, 50)) > 0.5
BLOBS = ndimage.binary_dilation(RNG.random((20, 80, 90)) > 0.97, iterations=2)  # shapes with holes


@pytest.mark.parametrize("mask", [SPARSE, HALF, BLOBS], ids=["sparse", "half", "blobs"])
def test_distance_is_scipys_anisotropic_edt(mask: np.ndarray) -> None:
    spacing = (2.5, 0.7, 0.9)
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    assert np.abs(morphology.distance(mask, spacing) - expected).max() < 1e-4


@pytest.mark.parametrize("mask", [SPARSE, HALF, BLOBS], ids=["sparse", "half", "blobs"])
def test_dilate_erode_are_scipys(mask: np.ndarray) -> None:
    assert np.array_equal(morphology.dilate(mask), ndimage.binary_dilation(mask))
    assert np.array_equal(
        morphology.dilate(mask, cube=True), ndimage.binary_dilation(mask, np.ones((3, 3, 3)))
    )
    assert np.array_equal(morphology.erode(mask), ndimage.binary_erosion(mask))
    assert np.array_equal(morphology.erode(morphology.dilate(mask)), ndimage.binary_closing(mask))


def test_components_are_scipys() -> None:
    reference, count = ndimage.label(SPARSE, structure=np.ones((3, 3, 3)))
    assert morphology.label(SPARSE)[1] == count == 185
    sizes = np.bincount(reference.ravel())
    keep = sizes >= 4
    keep[0] = False
    assert np.array_equal(morphology.drop_small(SPARSE, 4), keep[reference])
    faces, _ = ndimage.label(SPARSE)  # 6-connected
    sizes = np.bincount(faces.ravel())
    sizes[0] = 0
    assert np.array_equal(morphology.largest_component(SPARSE), faces == np.argmax(sizes))
    empty = np.zeros((3, 4, 5), bool)
    assert not morphology.largest_component(empty).any() and not morphology.drop_small(empty, 3).any()


@pytest.mark.parametrize(
    ("mask", "holes"), [(SPARSE, 16), (HALF, 7874), (BLOBS, 16396)], ids=["sparse", "half", "blobs"]
)
def test_fill_holes_per_slice_is_scipys_per_slice(mask: np.ndarray, holes: int) -> None:
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    filled = morphology.fill_holes_per_slice(mask)
    assert np.array_equal(filled, expected)
    assert int(filled.sum() - mask.sum()) == holes
