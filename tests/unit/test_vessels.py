"""Liver vessel enhancement and the portal/hepatic split: accuracy on the phantom, crossings, QC,
options, refusals, and the pipeline stage end to end.

The phantom's trees never touch, so on its own it only tests seeding, propagation and gap bridging;
``touching`` draws false bridges between the trees, and the synthetic tubes below cross or touch
on purpose. The helpers (:func:`evaluate` and its inputs) are shared with
``tests/bench/bench_vessels.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from node.classes import LabelVolume
from node.nifti import read_nifti, write_nifti
from node.phantom import Phantom, PhantomSpec, make_phantom
from node.segment.labelmap import write_class_table
from node.segment.vessel_split import _absorb_small, split_arrays
from node.segment.vessels import (
    SPLIT_CLASSES,
    SUPPORT_NAMES,
    VesselError,
    VesselOptions,
    enhance_liver_vessels,
    split_portal_hepatic,
)
from node.volume import Geometry, Volume

#: A grid fine enough for the thin branches and fast: the phantom's field of view at 1.6 x 1.6 x 3 mm.
MID = PhantomSpec(size=(128, 128, 80), spacing=(1.6, 1.6, 3.0))
CUBE = np.ones((3, 3, 3), bool)
KINDS = ("gt", "enhanced", "degraded", "touching")


# --- shared with the bench ------------------------------------------------------------------------


def split_accuracy(pred: np.ndarray, truth_labels: np.ndarray, input_mask: np.ndarray) -> tuple[float, float]:
    """(share of the true intrahepatic vessel voxels (201, 202) in the input that got their own tree,
    share of the true vessel voxels that are in the input at all). Unassigned counts as wrong."""
    gt = np.isin(truth_labels, [201, 202])
    covered = gt & input_mask
    truth = np.where(truth_labels == 201, 1, 2)
    return float((pred[covered] == truth[covered]).mean()), float(covered.sum() / gt.sum())


def cut_portal_gap(mask: np.ndarray, phantom: Phantom, length_mm: float = 6.0) -> tuple[np.ndarray, int]:
    """``mask`` without a ``length_mm`` piece of a portal branch, a quarter along it: the first branch
    (generation 2, then 3, most descendants first) whose cut cuts a part of the tree off."""
    segs, kids = phantom.segments, {}
    for n, s in enumerate(segs):
        if s.parent is not None:
            kids.setdefault(s.parent, []).append(n)

    def descendants(n: int) -> int:
        return sum(1 + descendants(c) for c in kids.get(n, []))

    g = phantom.ct.geometry
    k, j, i = np.nonzero(mask)
    points = g.index_to_lps(np.stack([i, j, k], axis=1))
    parts = ndimage.label(mask, CUBE)[1]
    candidates = [n for gen in (2, 3) for n in sorted(
        (n for n, s in enumerate(segs) if s.tree == "portal" and s.generation == gen),
        key=lambda n: -descendants(n))]
    for n in candidates:
        s = segs[n]
        a, b = np.array(s.start), np.array(s.end)
        length = float(np.linalg.norm(b - a))
        d = (b - a) / length
        t = (points - a) @ d
        radial = np.linalg.norm(points - a - t[:, None] * d, axis=1)
        cut = (np.abs(t - 0.25 * length) <= length_mm / 2) & (radial <= max(s.radius_start, s.radius_end)
                                                               + 2 * max(g.spacing))
        out = mask.copy()
        out[k[cut], j[cut], i[cut]] = False
        if ndimage.label(out, CUBE)[1] > parts:
            return out, int(cut.sum())
    raise AssertionError("no portal branch whose cut disconnects part of the tree")


def thinner(mask: np.ndarray) -> np.ndarray:
    """One voxel off every vessel's rim in-plane, its skeleton kept (so no branch falls apart)."""
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, plane) | (skeletonize(mask) > 0)


def false_bridges(mask: np.ndarray, labels: np.ndarray, spacing_kji, n: int = 3,
                  apart_mm: float = 25.0) -> np.ndarray:
    """``mask`` plus ``n`` one-voxel lines joining the portal (201) and hepatic (202) trees where they
    come closest (at least ``apart_mm`` apart from each other): segmentation leaks between the trees."""
    mm = np.asarray(spacing_kji, float)
    portal, hepatic = np.argwhere(labels == 201), np.argwhere(labels == 202)
    dist, nearest = cKDTree(hepatic * mm).query(portal * mm)
    out, used = mask.copy(), []
    for o in np.argsort(dist):
        p, h = portal[o], hepatic[nearest[o]]
        if any(np.linalg.norm((p - u) * mm) < apart_mm for u in used):
            continue
        used.append(p)
        for t in np.linspace(0.0, 1.0, int(np.abs(h - p).max()) * 2 + 2):
            out[tuple(np.rint(p + t * (h - p)).astype(int))] = True
        if len(used) == n:
            break
    return out


def evaluate(spec: PhantomSpec, seed: int, kind: str, options: VesselOptions | None = None) -> dict[str, Any]:
    """Split one phantom's vessels; ``kind``: ``gt`` (the true mask 201|202), ``enhanced`` (found in
    the CT by :func:`enhance_liver_vessels`), ``degraded`` (noise 30 HU, found in the CT, thinner,
    one gap in a portal branch) or ``touching`` (the true mask with three false bridges between the
    trees). Support is the truth: liver {5, 201, 202}, IVC 63, portal vein 64."""
    options = options or VesselOptions()
    ph = make_phantom(replace(spec, seed=seed, noise_hu=30.0 if kind == "degraded" else spec.noise_hu))
    labels = ph.labels.array

    def vol(a: np.ndarray) -> Volume:
        return ph.labels.with_array(a.astype(np.uint8))

    result: dict[str, Any] = {}
    if kind in ("gt", "touching"):
        vessels = np.isin(labels, [201, 202])
    else:
        enhanced, meta = enhance_liver_vessels(ph.ct, vol(np.isin(labels, [5, 201, 202])), None, options,
                                               portal=vol(labels == 64), ivc=vol(labels == 63))
        vessels = enhanced.array.astype(bool)
        gt = np.isin(labels, [201, 202])
        result["precision"] = float((vessels & gt).sum() / max(vessels.sum(), 1))
        result["enhancement"] = meta
    if kind == "degraded":
        vessels, result["gap_voxels"] = cut_portal_gap(thinner(vessels), ph)
    if kind == "touching":
        vessels = false_bridges(vessels, labels, ph.labels.geometry.spacing[::-1])
    start = time.perf_counter()
    split = split_portal_hepatic(vol(vessels), vol(labels == 64), vol(labels == 63), options)
    result["seconds"] = time.perf_counter() - start
    result["accuracy"], result["coverage"] = split_accuracy(split.labels.array, labels, vessels)
    result["qc"] = split.qc
    return result


def tube(shape: tuple[int, int, int], a, b, r: float) -> np.ndarray:
    """A capsule from ``a`` to ``b`` (k, j, i voxel coordinates) of radius ``r`` voxels."""
    p = np.stack(np.indices(shape, dtype=float), axis=-1)
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = np.clip(((p - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(p - a - t[..., None] * (b - a), axis=-1) <= r


def _split_tubes(portal: np.ndarray, hepatic: np.ndarray, **kw: Any):
    """Split two tubes seeded at their ends (the first 4 columns of the portal tube, the first 4 rows
    of the hepatic one); accuracy on the voxels that belong to only one tube."""
    portal_seed = np.zeros_like(portal)
    portal_seed[:, :, :4] = portal[:, :, :4]
    first = np.nonzero(hepatic.any(axis=(0, 2)))[0][0]
    hepatic_seed = np.zeros_like(hepatic)
    hepatic_seed[:, first:first + 4] = hepatic[:, first:first + 4] & ~portal[:, first:first + 4]
    vessels = (portal | hepatic) & ~portal_seed & ~hepatic_seed
    result = split_arrays(vessels, portal_seed, hepatic_seed, (1.0, 1.0, 1.0), **kw)
    only_p, only_h = portal & ~hepatic & vessels, hepatic & ~portal & vessels
    return float((result.labels[only_p] == 1).mean()), float((result.labels[only_h] == 2).mean()), result


# --- accuracy on the phantom ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_ground_truth_vessels_are_split_at_least_95_percent_right(seed: int) -> None:
    r = evaluate(MID, seed, "gt")
    assert r["accuracy"] >= 0.95
    assert r["coverage"] == 1.0
    assert r["qc"]["unassigned_voxels"] == 0
    assert r["qc"]["portal_seed_voxels"] > 0 and r["qc"]["hepatic_seed_voxels"] > 0
    assert r["qc"]["warnings"] == []


@pytest.mark.parametrize("seed", (0, 3))
def test_vessels_found_in_the_ct_are_split_right(seed: int) -> None:
    r = evaluate(MID, seed, "enhanced")
    assert r["accuracy"] >= 0.95
    assert r["coverage"] >= 0.85 and r["precision"] >= 0.6
    assert r["enhancement"]["fallbacks_used"] == ["ct_enhancement"]


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_degraded_phantom_is_split_at_least_85_percent_right(seed: int) -> None:
    r = evaluate(MID, seed, "degraded")
    assert r["accuracy"] >= 0.85
    assert r["coverage"] >= 0.15  # noise 30 HU and one voxel thinner on a 1.6 x 1.6 x 3 mm grid
    assert r["gap_voxels"] > 0 and r["qc"]["bridged_components"] >= 1  # the cut-off part is found again


@pytest.mark.parametrize("seed", range(5))
def test_trees_joined_by_false_bridges_stay_apart(seed: int) -> None:
    r = evaluate(MID, seed, "touching")
    assert r["accuracy"] >= 0.85
    assert r["qc"]["unassigned_voxels"] == 0


# --- crossings and contacts (synthetic tubes, 1 mm voxels) ------------------------------------------


@pytest.mark.parametrize("angle", (90, 60, 45))
def test_crossing_vessels_do_not_swap_with_the_skeleton(angle: int) -> None:
    """The hepatic tube crosses the portal one 70 mm from the portal root but only 48 mm from its own:
    a plain geodesic competition gives the hepatic tree the portal's far end; the skeleton's crossing
    rule keeps each vessel going straight through."""
    shape = (40, 100, 100)
    portal = tube(shape, (20, 50, 0), (20, 50, 99), 3.0)
    th = np.radians(angle)
    centre, direction = np.array([20.0, 50.0, 70.0]), np.array([0.0, np.sin(th), np.cos(th)])
    hepatic = tube(shape, centre - 48 * direction, centre + 45 * direction, 3.0)
    p, h, result = _split_tubes(portal, hepatic)
    assert p >= 0.95 and h >= 0.95
    assert result.qc["skeleton_crossings"] == 1
    p_plain, _, _ = _split_tubes(portal, hepatic, use_skeleton=False)
    assert p_plain < 0.8  # the case really needs the crossing rule


@pytest.mark.parametrize("use_skeleton", (True, False))
def test_a_vessel_touching_the_other_tree_through_a_narrow_contact_stays_apart(use_skeleton: bool) -> None:
    """A hepatic branch ends against the side of a portal vein, 70 mm from the portal root and 40 mm from
    its own: the narrow contact costs more than the long way round."""
    shape = (40, 100, 100)
    portal = tube(shape, (20, 50, 0), (20, 50, 99), 3.0)
    hepatic = tube(shape, (20, 5, 70), (20, 44, 70), 2.5)  # its tip and the portal wall are neighbours
    assert not (portal & hepatic).any() and ndimage.label(portal | hepatic, CUBE)[1] == 1
    p, h, _ = _split_tubes(portal, hepatic, use_skeleton=use_skeleton)
    assert p >= 0.95 and h >= 0.95


# --- QC -------------------------------------------------------------------------------------------


def _two_trees(hepatic_length: int = 60,
               hepatic_radius: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A portal and a hepatic vein side by side, 40 mm apart; seeds: their first 2 mm."""
    shape = (30, 80, 90)
    portal = tube(shape, (15, 20, 2), (15, 20, 85), 3.0)
    hepatic = tube(shape, (15, 60, 2), (15, 60, 2 + hepatic_length), hepatic_radius)
    ps, hs = np.zeros(shape, bool), np.zeros(shape, bool)
    ps[:, :, :2], hs[:, :, :2] = portal[:, :, :2], hepatic[:, :, :2]
    portal[:, :, :2] = hepatic[:, :, :2] = False
    return portal | hepatic, ps, hs


@pytest.mark.parametrize("use_skeleton", (True, False))
def test_qc_counts_fractions_and_unassigned_voxels(use_skeleton: bool) -> None:
    vessels, ps, hs = _two_trees()
    island = tube(vessels.shape, (15, 40, 40), (15, 40, 44), 1.5)  # 20 mm from both: beyond max_gap_mm
    result = split_arrays(vessels | island, ps, hs, (1.0, 1.0, 1.0), use_skeleton=use_skeleton,
                          max_gap_mm=10.0)
    qc = result.qc
    assert qc["unassigned_voxels"] == int(island.sum()) > 0
    assert not result.labels[island].any()
    assert qc["portal_voxels"] + qc["hepatic_voxels"] + qc["unassigned_voxels"] == qc["total_vessel_voxels"]
    assert qc["total_vessel_voxels"] == int((vessels | island).sum())
    fractions = qc["portal_fraction"] + qc["hepatic_fraction"] + qc["unassigned_fraction"]
    assert fractions == pytest.approx(1.0, abs=1e-5)
    assert qc["portal_fraction"] == pytest.approx(qc["portal_voxels"] / qc["total_vessel_voxels"], abs=1e-6)
    assert qc["portal_voxels"] == int((result.labels == 1).sum())
    assert qc["hepatic_voxels"] == int((result.labels == 2).sum())
    assert qc["portal_seed_voxels"] > 0 and qc["hepatic_seed_voxels"] > 0
    assert qc["conflicting_seed_voxels"] == 0
    assert qc["warnings"] == []
    assert (result.skeleton is not None) == use_skeleton
    if use_skeleton:
        assert set(np.unique(result.skeleton)) <= {0, 1, 2}
        labelled = int((result.skeleton > 0).sum())
        assert 0 < labelled < qc["skeleton_voxels"]  # the island's skeleton stays unassigned


def test_a_fraction_below_5_percent_is_a_warning() -> None:
    vessels, ps, hs = _two_trees(hepatic_length=4, hepatic_radius=1.5)  # a stub: under 5 % of the voxels
    qc = split_arrays(vessels, ps, hs, (1.0, 1.0, 1.0)).qc
    assert qc["hepatic_fraction"] < 0.05 <= qc["portal_fraction"]
    assert [w for w in qc["warnings"] if w.startswith("hepatic fraction")] == [
        f"hepatic fraction {qc['hepatic_fraction']:.3f} is below 0.05: the hepatic seeds probably failed"]
    assert not any(w.startswith("portal fraction") for w in qc["warnings"])


def test_without_seeds_nothing_is_assigned_and_both_seeds_are_reported_missing() -> None:
    vessels, ps, hs = _two_trees()
    qc = split_arrays(vessels, np.zeros_like(ps), np.zeros_like(hs), (1.0, 1.0, 1.0)).qc
    assert qc["unassigned_voxels"] == qc["total_vessel_voxels"] == int(vessels.sum())
    assert qc["portal_seed_voxels"] == qc["hepatic_seed_voxels"] == 0
    assert sum(w.startswith(("no portal seed", "no hepatic seed")) for w in qc["warnings"]) == 2


@pytest.mark.parametrize("gap_mm, max_gap_mm, bridged", ((6, 10.0, True), (6, 4.0, False)))
def test_a_gap_in_a_branch_is_bridged_up_to_max_gap_mm(gap_mm: int, max_gap_mm: float, bridged: bool) -> None:
    vessels, ps, hs = _two_trees()
    portal = tube(vessels.shape, (15, 20, 2), (15, 20, 85), 3.0)
    vessels[:, :, 40:40 + gap_mm] &= ~portal[:, :, 40:40 + gap_mm]
    distal = np.zeros_like(vessels)
    distal[:, :30, 40 + gap_mm:] = vessels[:, :30, 40 + gap_mm:]
    result = split_arrays(vessels, ps, hs, (1.0, 1.0, 1.0), max_gap_mm=max_gap_mm)
    if bridged:
        assert (result.labels[distal] == 1).all()
        assert result.qc["bridged_components"] == 1 and result.qc["bridged_voxels"] == int(distal.sum())
    else:
        assert not result.labels[distal].any()
        assert result.qc["unassigned_voxels"] == int(distal.sum())


def test_small_pieces_of_one_tree_inside_the_other_join_it() -> None:
    labels = np.zeros((5, 5, 20), np.uint8)
    labels[2, 2, :] = 1
    labels[2, 2, 8:10] = 2  # a 2-voxel hepatic piece inside a portal vessel
    out, moved = _absorb_small(labels.copy(), 5)
    assert moved == 2 and (out[2, 2] == 1).all()
    out, moved = _absorb_small(labels.copy(), 2)  # not smaller than 2: stays
    assert moved == 0 and (out[2, 2, 8:10] == 2).all()


# --- the Volume API -------------------------------------------------------------------------------


def _volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Volume:
    return Volume(array.astype(np.uint8), Geometry(origin=(0.0, 0.0, 0.0), spacing=spacing))


def test_split_gives_a_label_volume_with_the_split_class_table() -> None:
    vessels, ps, hs = _two_trees()
    split = split_portal_hepatic(_volume(vessels), _volume(ps), _volume(hs))
    assert isinstance(split.labels, LabelVolume) and split.labels.classes == SPLIT_CLASSES
    portal, hepatic = SPLIT_CLASSES[1], SPLIT_CLASSES[2]
    assert (portal.name, hepatic.name) == ("portal_vein_branches", "hepatic_veins")
    assert portal.category == hepatic.category == "Vessel"
    assert (portal.property_type.value, portal.property_type.scheme) == ("32764006", "SCT")
    assert (hepatic.property_type.value, hepatic.property_type.scheme) == ("8993003", "SCT")
    assert portal.property_category.value == hepatic.property_category.value == "123037004"
    assert portal.color == (0, 40, 200) and hepatic.color == (138, 43, 226)  # deep blue, blue-violet
    masks = split.masks()
    assert set(masks) == {"portal_vein_branches", "hepatic_veins"}
    assert int(masks["portal_vein_branches"].array.sum()) == split.qc["portal_voxels"]
    assert split.skeleton is not None and split.skeleton.classes == SPLIT_CLASSES
    assert split_portal_hepatic(_volume(vessels), _volume(ps), _volume(hs),
                                VesselOptions(no_skeleton=True)).skeleton is None


def test_enhancement_keeps_intrahepatic_vessels_and_drops_small_components() -> None:
    shape = (20, 40, 40)
    liver = np.zeros(shape, bool)
    liver[:, 5:35, 5:35] = True
    vessels = tube(shape, (10, 20, 0), (10, 20, 39), 2.0)  # runs out of the liver on both sides
    blob = np.zeros(shape, bool)
    blob[3:5, 8:10, 8:11] = True  # 12 voxels
    spacing = (2.0, 1.0, 1.0)
    mask, meta = enhance_liver_vessels(None, _volume(liver, spacing), _volume(vessels | blob, spacing),
                                       VesselOptions(min_component_size=30))
    expected = vessels & liver
    assert np.array_equal(mask.array.astype(bool), expected) and mask.array.dtype == np.uint8
    assert meta["voxels"] == int(expected.sum())
    assert meta["volume_ml"] == pytest.approx(expected.sum() * 2.0 / 1000.0, abs=1e-3)
    assert meta["outside_liver_voxels"] == int((vessels & ~liver).sum())
    assert (meta["components"], meta["removed_components"], meta["removed_voxels"]) == (1, 1, 12)
    assert meta["fallbacks_used"] == [] and meta["liver_voxels"] == int(liver.sum())


def test_without_a_liver_the_whole_volume_is_the_fallback_unless_forbidden() -> None:
    vessels = _volume(tube((20, 40, 40), (10, 20, 0), (10, 20, 39), 2.0))
    _, meta = enhance_liver_vessels(None, None, vessels)
    assert meta["fallbacks_used"] == ["full_volume_liver"] and meta["voxels"] == int(vessels.array.sum())
    assert any("whole volume" in w for w in meta["warnings"])
    empty_liver = vessels.with_array(np.zeros_like(vessels.array))
    with pytest.raises(VesselError) as err:
        enhance_liver_vessels(None, empty_liver, vessels, VesselOptions(no_fallback_full_liver=True))
    assert err.value.code == "no_liver"
    with pytest.raises(VesselError) as err:  # finding vessels in the CT needs a liver
        enhance_liver_vessels(vessels, None, None)
    assert err.value.code == "no_liver"


def test_masks_on_another_grid_are_refused() -> None:
    vessels = _volume(np.ones((4, 4, 4)))
    other = _volume(np.ones((4, 4, 4)), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(VesselError) as err:
        enhance_liver_vessels(None, other, vessels)
    assert err.value.code == "grid_mismatch"
    with pytest.raises(VesselError):
        split_portal_hepatic(vessels, other, vessels)


def test_options_take_the_flag_names_users_know() -> None:
    options = VesselOptions.from_mapping({"--no_skeleton": True, "min-component-size": "50",
                                          "split_portal_hepatic": "yes", "split_support_dir": "/data/support",
                                          "max_gap_mm": 5})
    assert options.no_skeleton and options.split_portal_hepatic
    assert options.min_component_size == 50 and options.max_gap_mm == 5.0
    assert options.split_support_dir == Path("/data/support")
    for bad in ({"no_such_flag": 1}, {"no_skeleton": "maybe"}, {"min_component_size": "many"}):
        with pytest.raises(VesselError) as err:
            VesselOptions.from_mapping(bad)
        assert err.value.code == "bad_options"


# --- the pipeline stage ---------------------------------------------------------------------------


def _write_labels(labels: np.ndarray, geometry: Geometry, classes: dict, path: Path) -> Path:
    volume = LabelVolume(labels.astype(np.uint8), geometry, classes=classes)
    write_nifti(volume, path)
    write_class_table(classes, path.parent / "classes.json")
    return path


@pytest.fixture(scope="module")
def mid_phantom() -> Phantom:
    return make_phantom(MID)


def test_stage_splits_the_phantom_end_to_end_from_ct_liver_ivc_and_portal_vein(mid_phantom: Phantom,
                                                                                 tmp_path: Path) -> None:
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest

    truth = mid_phantom.labels.array
    # What TotalSegmentator's `total` gives: a liver holding its vessels, the IVC and portal vein.
    given = np.where(np.isin(truth, [201, 202]), 5, truth)
    given = np.where(np.isin(given, [5, 63, 64]), given, 0)
    classes = {i: mid_phantom.labels.classes[i] for i in (5, 63, 64)}
    (tmp_path / "in").mkdir()
    path = _write_labels(given, mid_phantom.labels.geometry, classes, tmp_path / "in" / "labels.nii.gz")
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=path),
                              post=("liver_vessels",),
                              stage_options={"liver_vessels": {"split_portal_hepatic": True}})
    result = run_pipeline(mid_phantom.ct, tmp_path / "out", request)
    assert result.ok, result.report["error"]
    names = {c.name: i for i, c in result.labels.classes.items()}
    assert names["portal_vein_branches"] == 201 and names["hepatic_veins"] == 202
    out = result.labels.array
    found = np.isin(out, [201, 202])
    accuracy, coverage = split_accuracy(np.where(out == 201, 1, np.where(out == 202, 2, 0)), truth, found)
    assert accuracy >= 0.95 and coverage >= 0.85
    qc = result.report["qc"]["liver_vessels"]
    assert qc["fallbacks_used"] == ["ct_enhancement"]
    assert qc["support_source"] == dict.fromkeys(SUPPORT_NAMES, "run")
    split_qc = qc["portal_hepatic_split_qc"]
    assert split_qc["portal_voxels"] == int((out == 201).sum())
    assert split_qc["hepatic_voxels"] == int((out == 202).sum())
    for name in ("enhanced_liver_vessels.nii.gz", "portal_vein_branches.nii.gz", "hepatic_veins.nii.gz",
                 "liver_vessels_labeled.nii.gz", "liver_vessels_skeleton_labeled.nii.gz",
                 "enhanced_liver_vessels_metadata.json"):
        assert (tmp_path / "out" / name).is_file(), name
    labelled = read_nifti(tmp_path / "out" / "liver_vessels_labeled.nii.gz").array
    assert np.array_equal(labelled == 1, out == 201) and np.array_equal(labelled == 2, out == 202)
    meta = json.loads((tmp_path / "out" / "enhanced_liver_vessels_metadata.json").read_text())
    assert meta["portal_hepatic_split_qc"]["portal_fraction"] == split_qc["portal_fraction"]


def test_stage_takes_liver_vessels_and_a_support_folder(mid_phantom: Phantom, tmp_path: Path) -> None:
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest
    from node.segment.labelmap import make_class

    truth, geometry = mid_phantom.labels.array, mid_phantom.labels.geometry
    (tmp_path / "in").mkdir()
    path = _write_labels(np.isin(truth, [201, 202]).astype(np.uint8), geometry,
                         {1: make_class(1, "liver_vessels")}, tmp_path / "in" / "liver_vessels.nii.gz")
    support = tmp_path / "support"
    support.mkdir()
    for name, ids in (("liver", [5, 201, 202]), ("portal_vein_and_splenic_vein", [64]),
                      ("inferior_vena_cava", [63])):
        write_nifti(Volume(np.isin(truth, ids).astype(np.uint8), geometry), support / f"{name}.nii.gz")
    options = {"split_portal_hepatic": True, "split_support_dir": str(support), "no_skeleton": True}
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=path),
                              post=("liver_vessels",), stage_options={"liver_vessels": options})
    result = run_pipeline(mid_phantom.ct, tmp_path / "out", request)
    assert result.ok, result.report["error"]
    qc = result.report["qc"]["liver_vessels"]
    assert set(qc["support_source"].values()) == {"split_support_dir"} and qc["fallbacks_used"] == []
    out = result.labels.array
    accuracy, coverage = split_accuracy(np.where(out == 201, 1, np.where(out == 202, 2, 0)), truth,
                                        np.isin(truth, [201, 202]))
    assert accuracy >= 0.95 and coverage == 1.0
    assert not (tmp_path / "out" / "liver_vessels_skeleton_labeled.nii.gz").exists()


def test_stage_without_liver_fails_only_when_the_fallback_is_forbidden(mid_phantom: Phantom,
                                                                        tmp_path: Path) -> None:
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest
    from node.segment.labelmap import make_class

    truth, geometry = mid_phantom.labels.array, mid_phantom.labels.geometry
    (tmp_path / "in").mkdir()
    path = _write_labels(np.isin(truth, [201, 202]).astype(np.uint8), geometry,
                         {1: make_class(1, "liver_vessels")}, tmp_path / "in" / "liver_vessels.nii.gz")

    def run(options: dict, out: str):
        request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=path),
                                  post=("liver_vessels",), stage_options={"liver_vessels": options})
        return run_pipeline(mid_phantom.ct, tmp_path / out, request)

    failed = run({"no_fallback_full_liver": True}, "a")
    assert not failed.ok and failed.error.code == "no_liver" and failed.error.stage == "liver_vessels"
    done = run({"split_portal_hepatic": True}, "b")  # no support: enhancement only, the split skipped
    assert done.ok
    qc = done.report["qc"]["liver_vessels"]
    assert qc["fallbacks_used"] == ["full_volume_liver"]
    assert "portal_vein_and_splenic_vein" in qc["portal_hepatic_split_qc"]["skipped"]
    assert sum("split skipped" in n for n in done.report["notes"]) == 1


def test_stage_generates_missing_support_with_totalsegmentator_total_roi_subset(
        mid_phantom: Phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``generate_split_support``: the classes the run lacks come from ``total --roi_subset`` (a stand-in
    engine here, as TotalSegmentator's weights are not on the test machine)."""
    from node.pipeline import PipelineRequest, run_pipeline
    from node.segment import SegmentRequest, registry

    truth = mid_phantom.labels.array
    asked: list[SegmentRequest] = []

    class StandIn:
        name = "totalsegmentator"

        def segment(self, volume: Volume, request: SegmentRequest) -> LabelVolume:
            asked.append(request)
            array = np.where(np.isin(truth, [63, 64]), truth, 0).astype(np.uint8)
            classes = {i: mid_phantom.labels.classes[i] for i in (63, 64)}
            return LabelVolume(array, volume.geometry, classes=classes)

    real = registry.get_engine
    monkeypatch.setattr(registry, "get_engine",
                        lambda name: StandIn() if name == "totalsegmentator" else real(name))
    (tmp_path / "in").mkdir()
    liver_only = np.isin(truth, [5, 201, 202]).astype(np.uint8) * 5
    path = _write_labels(liver_only, mid_phantom.labels.geometry, {5: mid_phantom.labels.classes[5]},
                         tmp_path / "in" / "labels.nii.gz")
    options = {"split_portal_hepatic": True, "generate_split_support": True}
    request = PipelineRequest(segment=SegmentRequest(engine="labelmap", labels_path=path, device="cpu"),
                              post=("liver_vessels",), stage_options={"liver_vessels": options})
    result = run_pipeline(mid_phantom.ct, tmp_path / "out", request)
    assert result.ok, result.report["error"]
    assert len(asked) == 1 and asked[0].task == "total" and asked[0].device == "cpu"
    assert set(asked[0].roi_subset) == {"portal_vein_and_splenic_vein", "inferior_vena_cava"}
    qc = result.report["qc"]["liver_vessels"]
    assert qc["support_source"] == {"liver": "run", "portal_vein_and_splenic_vein": "generate_split_support",
                                    "inferior_vena_cava": "generate_split_support"}
    out = result.labels.array
    found = np.isin(out, [201, 202])
    accuracy, _ = split_accuracy(np.where(out == 201, 1, np.where(out == 202, 2, 0)), truth, found)
    assert accuracy >= 0.95
