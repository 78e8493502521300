"""Mesh speed on a TotalSegmentator-sized map: 117 structures on 512 x 512 x 300 voxels.

The map is the real sample (``example_seg.nii.gz``, 41 structures of TotalSegmentator's ``total`` task
on 122 x 101 x 30 voxels of 3 mm) upsampled to 512 x 512 x 300 (each structure's mask trilinearly, so
surfaces are smooth at the new resolution), with its biggest structures cut into pieces (nearest of a
few seeds inside each) until there are 117 distinct ids. It is built once and cached under the temp
folder.

Run: ``.venv/bin/python -m pytest tests/bench/bench_mesh.py -m bench -s``. It prints the time of
every step and the number of watertight meshes, for the default smoothing with 10% decimation on 2
threads, and the peer: the same extraction with VTK's discrete flying edges on each structure's
padded box (what the node would do with marching cubes) measured in the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.classes import LabelVolume
from node.volume import Geometry

SAMPLE = Path(os.environ.get("SEGNODE_SAMPLE_DIR", "/work/shared/data/totalsegmentator")) / "example_seg.nii.gz"
SHAPE_KJI = (300, 512, 512)
N_CLASSES = 117
CACHE = Path(tempfile.gettempdir()) / "segnode-bench-mesh-117x512x512x300.npz"


def build_map(cache: Path = CACHE) -> LabelVolume:
    """The 117-structure 512 x 512 x 300 map (see the module docstring), cached in ``cache``."""
    from node.nifti import read_nifti

    if cache.is_file():
        data = np.load(cache)
        return LabelVolume(data["labels"], Geometry.from_affine(data["affine"]), classes={})
    small = read_nifti(SAMPLE)
    src = small.array.astype(np.int32)
    zoom = np.array(SHAPE_KJI) / np.array(src.shape)
    out = np.zeros(SHAPE_KJI, np.uint8)
    ids = [int(i) for i in np.unique(src) if i]
    sizes = {i: int((src == i).sum()) for i in ids}
    for i in sorted(ids, key=lambda i: -sizes[i]):  # small ones last, so they stay whole
        box = ndimage.find_objects((src == i).astype(np.uint8))[0]
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, src.shape))
        mask = (src[box] == i).astype(np.float32)
        lo = [round(s.start * z) for s, z in zip(box, zoom)]
        hi = [min(round(s.stop * z), n) for s, z, n in zip(box, zoom, SHAPE_KJI)]
        big = ndimage.zoom(mask, [(h - l) / m for h, l, m in zip(hi, lo, mask.shape)], order=1, grid_mode=True,
                           mode="grid-constant")
        big = big[: hi[0] - lo[0], : hi[1] - lo[1], : hi[2] - lo[2]] > 0.5
        region = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        region[big[: region.shape[0], : region.shape[1], : region.shape[2]]] = i
    # Cut the biggest structures into pieces until there are N_CLASSES ids.
    rng = np.random.default_rng(0)
    free = [i for i in range(1, 256) if i not in ids]
    need = N_CLASSES - len(ids)
    volumes = np.bincount(out.ravel(), minlength=256)
    weights = np.sqrt(volumes[ids].astype(float))
    pieces = np.floor(weights / weights.sum() * need).astype(int)
    pieces[np.argsort(-weights)[: need - pieces.sum()]] += 1
    boxes = ndimage.find_objects(out)
    for i, extra in zip(ids, pieces):
        if extra <= 0:
            continue
        box = boxes[i - 1]
        sub = out[box]
        pts = np.argwhere(sub == i)
        seeds = pts[rng.choice(len(pts), extra + 1, replace=False)]
        best = np.zeros(len(pts), int)
        dist = np.full(len(pts), np.inf)
        for n, seed in enumerate(seeds):
            d = (((pts - seed) * [3.3, 1, 1]) ** 2).sum(axis=1)  # roughly isotropic in mm
            closer = d < dist
            dist[closer], best[closer] = d[closer], n
        new_ids = [i] + [free.pop(0) for _ in range(extra)]
        sub[tuple(pts.T)] = np.array(new_ids, np.uint8)[best]
    spacing = np.array(small.geometry.spacing) * np.array(src.shape[::-1]) / np.array(SHAPE_KJI[::-1])
    affine = small.geometry.affine.copy()
    affine[:3, :3] = small.geometry.direction_matrix * spacing
    affine[:3, 3] = small.geometry.index_to_lps(np.array([[-0.5, -0.5, -0.5]]))[0] + \
        small.geometry.direction_matrix @ (spacing / 2)
    np.savez(cache, labels=out, affine=affine)
    return LabelVolume(out, Geometry.from_affine(affine), classes={})


def _cpu() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _vtk_peer(labels: LabelVolume, smooth_iters: int) -> tuple[float, int, int]:
    """VTK discrete flying edges on each structure's box padded by one voxel, then windowed-sinc
    smoothing: seconds, structures meshed, total faces."""
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkWindowedSincPolyDataFilter
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D

    started = time.perf_counter()
    array = labels.array
    boxes = ndimage.find_objects(array)
    faces = meshed = 0
    for label, box in enumerate(boxes, 1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, array.shape))
        crop = np.ascontiguousarray((array[box] == label).astype(np.uint8))
        image = vtkImageData()
        image.SetDimensions(crop.shape[2], crop.shape[1], crop.shape[0])
        image.SetSpacing(*labels.geometry.spacing)
        image.GetPointData().SetScalars(ns.numpy_to_vtk(crop.ravel(), deep=1))
        fe = vtkDiscreteFlyingEdges3D()
        fe.SetInputData(image)
        fe.SetValue(0, 1)
        fe.ComputeNormalsOff()
        fe.ComputeGradientsOff()
        fe.ComputeScalarsOff()
        fe.Update()
        out = fe.GetOutput()
        if smooth_iters:
            sm = vtkWindowedSincPolyDataFilter()
            sm.SetInputData(out)
            sm.SetNumberOfIterations(smooth_iters)
            sm.SetPassBand(0.1)
            sm.NormalizeCoordinatesOn()
            sm.Update()
            out = sm.GetOutput()
        faces += out.GetNumberOfPolys()
        meshed += 1
    return time.perf_counter() - started, meshed, faces


@pytest.mark.bench
def test_bench_117_structures_512x512x300() -> None:
    from node.artifacts.mesh import MeshOptions, label_meshes

    labels = build_map()
    assert len(labels.present_ids()) == N_CLASSES and labels.array.shape == SHAPE_KJI
    print(f"\nmap: {N_CLASSES} structures on {SHAPE_KJI[::-1]} voxels of "
          f"{'x'.join(f'{s:.3f}' for s in labels.geometry.spacing)} mm; {os.cpu_count()} CPUs here")
    rows = []
    for name, options in (
        ("exact voxel surface, 2 workers", MeshOptions(smooth_iters=0, workers=2)),
        ("smoothed (10), 2 workers", MeshOptions(workers=2)),
        ("smoothed (10) + decimated to 10 %, 2 workers", MeshOptions(decimate=0.1, workers=2)),
        ("smoothed (10) + decimated to 10 %, 1 worker", MeshOptions(decimate=0.1, workers=1)),
    ):
        cpu0, t0 = _cpu(), time.perf_counter()
        meshes = label_meshes(labels, options)
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        tight = sum(1 for m in meshes if m.check is not None and m.check.watertight)
        faces = sum(len(m.faces) for m in meshes)
        worst = max(abs(m.volume_mm3 / m.voxel_volume_mm3 - 1) for m in meshes)
        notes = sum(1 for m in meshes if m.notes)
        rows.append((name, wall))
        print(f"{name:48s} {wall:6.2f} s wall {cpu:6.2f} s CPU  watertight {tight}/{len(meshes)}  "
              f"faces {faces:>9,}  worst volume error {worst:.2%}  with notes {notes}")
        assert tight == len(meshes) == N_CLASSES
    try:
        peer, meshed, peer_faces = _vtk_peer(labels, 10)
    except ImportError:
        print("peer: vtk is not installed")
        return
    print(f"{'peer: VTK flying edges + windowed sinc (10), 1 thread':48s} {peer:6.2f} s wall  "
          f"{meshed} structures, faces {peer_faces:,} (no check, no decimation)")
    smoothed = dict(rows)["smoothed (10), 2 workers"]
    print(f"ratio smoothed (2 workers) / peer: {smoothed / peer:.2f}")
