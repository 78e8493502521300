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
        lo = [int(round(s.start * z)) for s, z in zip(box, zoom)]
        hi = [min(int(round(s.stop * z)), n) for s, z, n in zip(box, zoom, SHAPE_KJI)]
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
