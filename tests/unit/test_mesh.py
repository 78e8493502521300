"""Meshes of label volumes: closed and manifold, the label's volume and extent, in patient space.

Volume checks: with smoothing off (the exact voxel surface) every structure's mesh encloses its voxel
volume within 0.5 %; with the default smoothing (10 Taubin iterations, then the volume restored) and
with smoothing plus 10 % decimation, within 3 %. Extents: within one voxel of the label's physical
extent (its voxels' outer edges) in RAS, decimated or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from node.artifacts import mesh as M
from node.classes import LabelClass, LabelVolume
from node.phantom import TINY, PhantomSpec, make_phantom
from node.volume import Geometry

trimesh = pytest.importorskip("trimesh")

SAMPLE = Path(os.environ.get("SEGNODE_SAMPLE_DIR", "/work/shared/data/totalsegmentator")) / "example_seg.nii.gz"
MID = PhantomSpec(size=(128, 128, 80), spacing=(1.6, 1.6, 3.0))


@pytest.fixture(scope="module")
def tiny() -> LabelVolume:
    return make_phantom(TINY).labels


@pytest.fixture(scope="module")
def mid() -> LabelVolume:
    return make_phantom(MID).labels


@pytest.fixture(scope="module")
def sample() -> LabelVolume:
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is not on this machine")
    from node.nifti import read_nifti
    from node.segment.labelmap import make_class, totalsegmentator_class_map

    volume = read_nifti(SAMPLE)
    names = totalsegmentator_class_map("total") or {}
    array = volume.array.astype(np.uint8)
    ids = [int(i) for i in np.unique(array) if i]
    classes = {i: make_class(i, names.get(i, f"label_{i}")) for i in ids}
    return LabelVolume(array, volume.geometry, classes=classes)


def physical_extent(labels: LabelVolume, label: int) -> np.ndarray:
    """[[min], [max]] in RAS mm of the outer edges of the label's voxels."""
    idx = np.argwhere(labels.array == label)[:, ::-1]  # (i, j, k)
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    ras = corners @ labels.geometry.affine_ras[:3, :3].T + labels.geometry.affine_ras[:3, 3]
    return np.array([ras.min(axis=0), ras.max(axis=0)])


def assert_meshes_match(labels: LabelVolume, meshes: list[M.Mesh], volume_tol: float,
                        extent_voxels: float = 1.0) -> None:
    voxel = max(labels.geometry.spacing) * extent_voxels
    assert {m.label for m in meshes} == set(labels.present_ids())
    for m in meshes:
        assert m.check is not None and m.check.watertight, (m.name, m.check, m.notes)
        tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
        assert tm.is_watertight and tm.is_winding_consistent, m.name
        assert m.volume_mm3 > 0
        assert abs(tm.volume - m.voxel_volume_mm3) <= volume_tol * m.voxel_volume_mm3, (
            m.name, m.voxels, tm.volume / m.voxel_volume_mm3 - 1)
        extent = physical_extent(labels, m.label)
        assert np.abs(m.bounds - extent).max() <= voxel, (m.name, m.bounds, extent)


# --- the voxel surface ----------------------------------------------------------------------------


def _mask(points: list[tuple[int, int, int]], shape=(4, 4, 4)) -> np.ndarray:
    m = np.zeros(shape, bool)
    for p in points:
        m[p] = True
    return np.pad(m, 1)


@pytest.mark.parametrize("points, pieces", [
    ([(0, 0, 0)], 1),
    ([(0, 0, 0), (0, 0, 1)], 1),
    ([(0, 0, 0), (0, 1, 1)], 2),  # along an edge only
    ([(0, 0, 0), (1, 1, 1)], 2),  # at a corner only
    ([(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)], 4),  # checkerboard block
    ([(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1) if (a, b, c) not in ((0, 0, 0), (1, 1, 1))], 1),
])
def test_voxel_surface_is_closed_manifold_and_exact(points: list, pieces: int) -> None:
    v, f = M.voxel_surface(_mask(points))
    check = M.check_mesh(f, len(v))
    assert check.watertight, check
    assert abs(abs(M.signed_volume(v, f)) - len(points)) < 0.05 * len(points)  # split corners move 2 %
    tm = trimesh.Trimesh(v, f, process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert len(tm.split(only_watertight=False)) == pieces
    # As an STL reader sees it: vertices merged by position; copies of a shared corner stay apart.
    merged = trimesh.Trimesh(v.astype(np.float32), f, process=True)
    assert merged.is_watertight


def test_voxel_surface_random_masks_stay_closed() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(3, 10))
        m = np.pad(rng.random((n, n + 1, n + 2)) < rng.uniform(0.2, 0.8), 1)
        v, f = M.voxel_surface(m)
        assert M.check_mesh(f, len(v)).watertight
        assert abs(abs(M.signed_volume(v, f)) - m.sum()) < 0.03 * m.sum()
        assert trimesh.Trimesh(v.astype(np.float32), f, process=True).is_watertight


def test_voxel_surface_needs_background_around() -> None:
    with pytest.raises(ValueError):
        M.voxel_surface(np.ones((3, 3, 3), bool))


def test_check_mesh_finds_the_defects() -> None:
    box = trimesh.creation.box()
    v, f = np.asarray(box.vertices), np.asarray(box.faces)
    assert M.check_mesh(f).watertight
    open_ = M.check_mesh(f[1:])
    assert not open_.closed and not open_.watertight
    flipped = f.copy()
    flipped[0] = flipped[0, ::-1]
    c = M.check_mesh(flipped)
    assert c.closed and not c.oriented
    # Two boxes sharing one vertex: closed and oriented, not manifold at that vertex.
    v2 = v + (v[0] - v[7] if not np.allclose(v[0], v[7]) else 1.0)
    shared = int(np.argmin(np.linalg.norm(v2 - v[0], axis=1)))
    tet = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    tv = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    two = np.concatenate([tet, tet + 4])
    two[two == 4] = 0  # the second tetrahedron's first vertex is the first's
    c = M.check_mesh(two, 8)
    assert c.closed and c.oriented and not c.manifold_vertices
    assert not M.check_mesh(np.array([[0, 1, 1]] + tet.tolist())).watertight
    del shared, tv


def test_drop_fins_repairs_a_back_to_back_pair() -> None:
    box = trimesh.creation.box()
    f = np.asarray(box.faces)
    a, b = f[0][:2]
    fin = np.array([[a, b, 8], [b, a, 8]])  # a flap of two faces hanging off edge (a, b)
    broken = np.concatenate([f, fin])
    assert not M.check_mesh(broken).watertight
    repaired = M.drop_fins(broken)
    assert M.check_mesh(repaired, 9).watertight and len(repaired) == len(f)


# --- structures ------------------------------------------------------------------------------------


def test_tiny_phantom_exact_surface(tiny: LabelVolume) -> None:
    meshes = M.label_meshes(tiny, M.MeshOptions(smooth_iters=0, workers=1))
    assert_meshes_match(tiny, meshes, volume_tol=0.005)


def test_tiny_phantom_smoothed(tiny: LabelVolume) -> None:
    meshes = M.label_meshes(tiny, M.MeshOptions(workers=1))
    assert_meshes_match(tiny, meshes, volume_tol=0.03)


def test_mid_phantom_smoothed_and_decimated(mid: LabelVolume) -> None:
    exact = {m.label: len(m.faces) for m in M.label_meshes(mid, M.MeshOptions(smooth_iters=0, workers=1))}
    meshes = M.label_meshes(mid, M.MeshOptions(decimate=0.1, workers=1))
    assert_meshes_match(mid, meshes, volume_tol=0.03)
    for m in meshes:
        target = max(0.1 * exact[m.label], M.MIN_DECIMATED_FACES)
        assert len(m.faces) <= 2.6 * target + 4, (m.name, len(m.faces), exact[m.label])
    assert sum(len(m.faces) for m in meshes) < 0.2 * sum(exact.values())


def test_mid_phantom_exact_surface(mid: LabelVolume) -> None:
    assert_meshes_match(mid, M.label_meshes(mid, M.MeshOptions(smooth_iters=0, workers=1)), volume_tol=0.005)


def test_real_sample_all_structures(sample: LabelVolume) -> None:
    assert len(sample.present_ids()) == 41
    for options, tol, extent in ((M.MeshOptions(smooth_iters=0, workers=1), 0.005, 1.0),
                                 (M.MeshOptions(workers=1), 0.03, 1.0),
                                 (M.MeshOptions(decimate=0.1, workers=1), 0.03, 1.0)):
        assert_meshes_match(sample, M.label_meshes(sample, options), volume_tol=tol, extent_voxels=extent)


@pytest.mark.parametrize("threaded", [False, True])
def test_worker_processes_give_the_same_meshes(tiny: LabelVolume, monkeypatch: pytest.MonkeyPatch,
                                               threaded: bool) -> None:
    """Worker processes: fork while this process has one thread, forkserver when it has more (a server)."""
    import threading

    monkeypatch.setattr(M, "PROCESS_THRESHOLD", 0)
    one = M.label_meshes(tiny, M.MeshOptions(workers=1))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    if threaded:
        other.start()
    try:
        two = M.label_meshes(tiny, M.MeshOptions(workers=2))
    finally:
        stop.set()
    assert [m.label for m in one] == [m.label for m in two]
    for a, b in zip(one, two):
        assert np.array_equal(a.faces, b.faces) and np.allclose(a.vertices, b.vertices)


# --- coordinates ------------------------------------------------------------------------------------


def test_space_and_units() -> None:
    a = np.zeros((6, 7, 8), np.uint8)
    a[2:4, 3:5, 1:6] = 1  # k 2..3, j 3..4, i 1..5
    g = Geometry(origin=(10.0, -20.0, 30.0), spacing=(0.5, 0.8, 2.0))
    lv = LabelVolume(a, g, classes={1: LabelClass(1, "box")})
    ras = M.label_meshes(lv, M.MeshOptions(smooth_iters=0, workers=1))[0]
    lps = M.label_meshes(lv, M.MeshOptions(smooth_iters=0, space="LPS", workers=1))[0]
    metres = M.label_meshes(lv, M.MeshOptions(smooth_iters=0, units="m", workers=1))[0]
    lo_lps = np.array([10 + 0.5 * 0.5, -20 + 2.5 * 0.8, 30 + 1.5 * 2.0])
    hi_lps = np.array([10 + 5.5 * 0.5, -20 + 4.5 * 0.8, 30 + 3.5 * 2.0])
    assert np.allclose(lps.bounds, [lo_lps, hi_lps])
    assert np.allclose(ras.bounds, [[-hi_lps[0], -hi_lps[1], lo_lps[2]], [-lo_lps[0], -lo_lps[1], hi_lps[2]]])
    assert np.allclose(metres.bounds, ras.bounds * 1e-3)
    assert np.isclose(ras.volume, 5 * 2 * 2 * 0.5 * 0.8 * 2.0)
    assert np.isclose(metres.volume_mm3, ras.volume)


def test_flipped_and_oblique_grids_face_outward() -> None:
    a = np.zeros((8, 8, 8), np.uint8)
    a[2:6, 3:5, 1:7] = 3
    theta = np.radians(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    for direction in (np.diag([-1.0, 1.0, 1.0]), rot):
        g = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.5, 2.0),
                     direction=tuple(tuple(r) for r in direction))
        lv = LabelVolume(a, g, classes={3: LabelClass(3, "thing")})
        m = M.label_meshes(lv, M.MeshOptions(workers=1))[0]
        assert m.check.watertight and m.volume > 0
        assert abs(m.volume - m.voxel_volume_mm3) < 0.03 * m.voxel_volume_mm3
        assert np.abs(m.bounds - physical_extent(lv, 3)).max() <= 2.0


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", M.FORMATS)
def test_files_load_in_trimesh(tiny: LabelVolume, tmp_path: Path, fmt: str) -> None:
    mesh = next(m for m in M.label_meshes(tiny, M.MeshOptions(workers=1)) if m.name == "liver")
    path = M.write_mesh(tmp_path / f"liver.{fmt}", mesh.vertices, mesh.faces, "liver")
    loaded = trimesh.load(path, force="mesh")
    assert loaded.is_watertight and loaded.is_winding_consistent
    assert len(loaded.faces) == len(mesh.faces)
    assert np.isclose(loaded.volume, mesh.volume, rtol=1e-4)
    assert np.allclose(loaded.bounds, mesh.bounds, atol=1e-3)
    v, f = M.read_mesh(path)
    assert len(f) == len(mesh.faces) and np.isclose(M.signed_volume(v, f), mesh.volume, rtol=1e-4)


def test_export_folder_with_placeholders(tiny: LabelVolume, tmp_path: Path) -> None:
    expected = dict(tiny.classes)
    expected[104] = LabelClass(104, "heart", (200, 0, 0), "Thoracic")
    options = M.MeshOptions(export_format="ply", write_empty=True, decimate=0.2)
    index = M.export_meshes(tiny, tmp_path, options, expected=expected)
    names = {e["name"]: e for e in index["meshes"]}
    assert set(names) == {c.name for c in expected.values()}
    assert names["heart"]["empty"] and (tmp_path / "heart.ply").is_file()
    assert M.read_mesh(tmp_path / "heart.ply")[1].shape == (0, 3)
    liver = names["liver"]
    assert liver["watertight"] and liver["file"] == "liver.ply" and liver["category"] == "Abdominal"
    assert liver["color"] == list(tiny.classes[5].color)
    assert abs(liver["mesh_volume_ml"] / liver["voxel_volume_ml"] - 1) < 0.03
    on_disk = json.loads((tmp_path / "meshes.json").read_text())
    assert on_disk["space"] == "RAS" and on_disk["units"] == "mm" and len(on_disk["meshes"]) == len(expected)
    entries = M.read_mesh_folder(tmp_path)
    assert {Path(e["path"]).name for e in entries} == {e["file"] for e in index["meshes"]}
    stl = M.write_mesh(tmp_path / "empty.stl", np.zeros((0, 3)), np.zeros((0, 3), int))
    assert stl.stat().st_size == 84


def test_options_from_cli_names() -> None:
    o = M.MeshOptions.from_dict({"export-format": "OBJ", "mesh_smooth_iters": 3, "units": "m", "space": "lps"})
    assert (o.export_format, o.smooth_iters, o.units, o.space) == ("obj", 3, "m", "LPS")
    with pytest.raises(ValueError):
        M.MeshOptions(decimate=0.0)
    with pytest.raises(ValueError):
        M.MeshOptions(export_format="fbx")
