"""The synthetic abdominal CT phantom: determinism, anatomy, HU, vessel trees, DICOM round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from node.nifti import read_nifti
from node.phantom import CLASSES, TINY, Phantom, PhantomSpec, in_liver, make_phantom, write_phantom

CUBE = np.ones((3, 3, 3), bool)  # 26-connectivity

EXPECTED_CLASSES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach", 7: "pancreas",
    29: "vertebrae_L3", 30: "vertebrae_L2", 31: "vertebrae_L1", 32: "vertebrae_T12", 33: "vertebrae_T11",
    52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 79: "spinal_cord",
    86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right",
    201: "portal_vein_branches", 202: "hepatic_veins",
}


@pytest.fixture(scope="module")
def tiny() -> Phantom:
    return make_phantom(TINY)


@pytest.fixture(scope="module")
def lps(tiny: Phantom) -> np.ndarray:
    """LPS coordinates of every voxel centre of the tiny phantom, shaped [k, j, i, 3]."""
    k, j, i = np.indices(tiny.ct.array.shape)
    points = tiny.ct.geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    return points.reshape(*tiny.ct.array.shape, 3)


def _sample(segment, step_mm: float = 1.0) -> np.ndarray:
    a, b = np.array(segment.start), np.array(segment.end)
    return a + np.linspace(0, 1, int(np.linalg.norm(b - a) / step_mm) + 2)[:, None] * (b - a)


def test_same_seed_same_phantom_other_seed_other_trees(tiny: Phantom) -> None:
    again = make_phantom(TINY)
    assert np.array_equal(again.ct.array, tiny.ct.array)
    assert np.array_equal(again.labels.array, tiny.labels.array)
    assert again.segments == tiny.segments
    other = make_phantom(replace(TINY, seed=1))
    assert other.segments != tiny.segments
    assert not np.array_equal(other.labels.array == 201, tiny.labels.array == 201)


def test_every_class_is_present_with_its_totalsegmentator_id(tiny: Phantom) -> None:
    assert {i: c.name for i, c in tiny.labels.classes.items()} == EXPECTED_CLASSES
    assert {i: c.name for i, c in CLASSES.items()} == EXPECTED_CLASSES
    assert set(tiny.labels.present_ids()) == set(EXPECTED_CLASSES)
    assert {tiny.labels.classes[i].category for i in (52, 63, 64, 201, 202)} == {"Vessel"}
    assert tiny.labels.classes[31].category == "Bone" and tiny.labels.classes[86].category == "Muscle"


def test_ct_and_labels_share_an_axial_lps_grid_centred_on_the_origin(tiny: Phantom) -> None:
    ct, labels = tiny.ct, tiny.labels
    assert ct.array.shape == labels.array.shape == (40, 64, 64)
    assert ct.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert ct.geometry == labels.geometry
    assert ct.geometry.spacing == (3.2, 3.2, 6.0)
    assert np.array_equal(ct.geometry.direction_matrix, np.eye(3))
    centre = ct.geometry.index_to_lps(np.array([[31.5, 31.5, 19.5]]))[0]
    assert np.allclose(centre, 0.0)


def test_organs_sit_where_anatomy_puts_them(tiny: Phantom, lps: np.ndarray) -> None:
    c = {label: lps[tiny.labels.array == label].mean(axis=0) for label in tiny.labels.present_ids()}
    assert c[5][0] < -20 and c[1][0] > 20  # liver on the patient's right (-x), spleen on the left
    assert c[1][1] > c[5][1]  # spleen posterior of the liver
    assert c[2][0] < -30 < 30 < c[3][0] and c[2][1] > c[31][1] - 10  # kidneys either side of the spine
    assert c[52][0] > 0 > c[63][0] and max(c[52][1], c[63][1]) < c[31][1]  # aorta left, IVC right, in front
    assert c[86][0] > 0 > c[87][0] and min(c[86][1], c[87][1]) > c[31][1]  # autochthon behind the spine
    assert c[88][0] > 0 > c[89][0]
    heights = [c[label][2] for label in (33, 32, 31, 30, 29)]  # T11 ... L3, head to feet
    assert heights == sorted(heights, reverse=True)


def test_vertebrae_are_separated_by_discs(tiny: Phantom) -> None:
    labels = tiny.labels.array
    for upper, lower in ((33, 32), (32, 31), (31, 30), (30, 29)):
        assert not (ndimage.binary_dilation(labels == upper, CUBE) & (labels == lower)).any()
        assert ndimage.label(labels == upper, CUBE)[1] == 1


def test_hounsfield_units_are_those_of_a_portal_venous_phase(tiny: Phantom, lps: np.ndarray) -> None:
    ct, labels = tiny.ct.array, tiny.labels.array

    def median(label: int) -> float:
        return float(np.median(ct[labels == label]))

    assert 90 <= median(5) <= 110
    assert median(201) > median(5) + 30 and median(202) > median(5) + 20  # enhanced on a coarse grid
    assert abs(median(201) - median(202)) < 40  # the two trees overlap in HU on purpose
    assert median(52) > 130 and median(2) > 130 and median(31) > 250
    assert np.median(ct[:, :4, :4]) == pytest.approx(-1000, abs=3)  # air in the corners
    x, y = lps[..., 0], lps[..., 1]
    subcutaneous = ((x / 92) ** 2 + (y / 74) ** 2 <= 1) & ((x / 86) ** 2 + (y / 68) ** 2 > 1)
    assert -115 <= np.median(ct[subcutaneous]) <= -85
    assert 8 <= np.std(ct[:, :4, :4]) <= 16  # noise_hu = 12 in air, clipped at -1024 a little


def test_vessel_trees_branch_and_narrow(tiny: Phantom) -> None:
    portal = [s for s in tiny.segments if s.tree == "portal"]
    hepatic = [s for s in tiny.segments if s.tree == "hepatic"]
    assert max(s.generation for s in portal) >= 3 and max(s.generation for s in hepatic) >= 2
    assert sum(s.generation == 0 for s in hepatic) == 3  # right, middle and left hepatic veins
    assert sum(s.generation == 1 for s in portal) == 2  # right and left portal veins
    for s in portal + hepatic:
        if s.generation == 0:
            continue
        parent = tiny.segments[s.parent]
        assert parent.tree == s.tree and parent.generation == s.generation - 1
        assert s.radius_start == pytest.approx(0.7 * parent.radius_start)
        assert s.radius_end == pytest.approx(0.7 * s.radius_start)
        # Each branch starts on its parent's axis.
        a, b, p = np.array(parent.start), np.array(parent.end), np.array(s.start)
        t = np.clip((p - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
        assert np.linalg.norm(a + t * (b - a) - p) < 1e-9


@pytest.mark.parametrize(
    "spec", [TINY, replace(TINY, seed=7), PhantomSpec(size=(96, 64, 48), spacing=(2.0, 3.0, 5.0), seed=3)]
)
def test_portal_and_hepatic_trees_are_connected_and_never_touch(spec: PhantomSpec) -> None:
    labels = make_phantom(spec).labels.array
    portal, hepatic = np.isin(labels, [201, 64]), np.isin(labels, [202, 63])
    assert ndimage.label(portal, CUBE)[1] == 1
    assert ndimage.label(hepatic, CUBE)[1] == 1
    assert not (ndimage.binary_dilation(portal, CUBE) & hepatic).any()
    assert (ndimage.binary_dilation(labels == 202, CUBE) & (labels == 63)).any()  # they drain into the IVC
    assert (ndimage.binary_dilation(labels == 201, CUBE) & (labels == 64)).any()  # fed by the trunk


def test_branches_run_inside_the_liver(tiny: Phantom) -> None:
    labels, geometry = tiny.labels.array, tiny.labels.geometry
    branches = [s for s in tiny.segments if s.tree in ("portal", "hepatic") and s.generation >= 1]
    assert len(branches) > 20
    for s in branches:
        points = _sample(s)
        assert in_liver(*points.T).all()  # reference mm are LPS mm on TINY's field of view
        i, j, k = np.rint(geometry.lps_to_index(points)).astype(int).T
        expected = {201} if s.tree == "portal" else {202, 63}  # the IVC may cover a hepatic branch
        assert set(np.unique(labels[k, j, i])) <= expected
    # TotalSegmentator's liver is the parenchyma and the vessels inside it; only IVC and trunks cut it.
    liver = np.isin(labels, [5, 201, 202])
    assert ndimage.label(liver, CUBE)[1] == 1


def test_finer_grids_show_the_same_trees() -> None:
    finer = PhantomSpec(size=(128, 128, 80), spacing=(1.6, 1.6, 3.0))
    assert make_phantom(finer).segments == make_phantom(TINY).segments


def test_grids_coarser_than_tiny_are_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        PhantomSpec(size=(32, 64, 40))


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))


def test_written_series_rereads_to_the_same_hounsfield_units(tmp_path: Path, tiny: Phantom) -> None:
    paths = write_phantom(TINY, tmp_path / "a")
    assert set(paths) >= {"dicom", "labels", "ct", "classes"} and all(p.exists() for p in paths.values())
    series = _read_series(paths["dicom"])
    assert len(series) == 40 and series[0].Modality == "CT"
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in series])
    assert np.array_equal(hu, tiny.ct.array)
    assert [float(v) for v in series[0].ImagePositionPatient] == pytest.approx(tiny.ct.geometry.origin)
    assert [float(v) for v in series[0].PixelSpacing] == [3.2, 3.2]

    labels = read_nifti(paths["labels"])
    assert np.array_equal(labels.array, tiny.labels.array) and labels.geometry.same_grid(tiny.labels.geometry)
    assert np.array_equal(read_nifti(paths["ct"]).array, tiny.ct.array)
    table = json.loads(paths["classes"].read_text())
    assert {row["id"]: row["name"] for row in table} == EXPECTED_CLASSES
    assert all(len(row["color"]) == 3 and row["category"] for row in table)

    uids = [ds.SOPInstanceUID for ds in series]
    assert [ds.SOPInstanceUID for ds in _read_series(write_phantom(TINY, tmp_path / "b")["dicom"])] == uids
    other = _read_series(write_phantom(replace(TINY, seed=1), tmp_path / "c")["dicom"])
    assert not set(ds.SOPInstanceUID for ds in other) & set(uids)
