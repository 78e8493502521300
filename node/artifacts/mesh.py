"""Surface meshes of label volumes: one closed, manifold triangle mesh per structure, in patient space.

How a mesh is made (:func:`structure_mesh`):

1. **Voxel surface.** The label's voxels, cropped to their bounding box padded by one voxel, are
   wrapped in their exact boundary: two triangles per voxel face between the label and anything else,
   outward. Its volume is exactly the label's voxel volume and its bounding box the label's physical
   extent (voxel edges). Where voxels of the label touch only along an edge or at a corner, the
   shared corner gets one vertex per surface sheet meeting there (a table of the 256 corner
   configurations says which face belongs to which sheet) and each copy is moved 2% of a voxel
   towards its own faces: every edge has exactly two faces, every vertex one fan, and no two copies
   share a position (an STL reader that merges equal positions keeps them apart). Diagonal
   neighbours therefore stay separate pieces (6-connectivity), as marching cubes keeps them.
   Why not marching cubes (VTK's flying edges): its surface cuts every corner, which takes 3-19 % off
   ribs, adrenal glands and small vessels at 3 mm and 83 % off a one-voxel structure.
2. **Smoothing** (``smooth_iters``, default 10): Taubin's lambda/mu filter (lambda 0.5, mu -0.53), a
   low-pass that does not shrink the way Laplacian smoothing does; it takes the staircase off. A
   structure of a few voxels that would melt (half its volume gone) keeps its voxel surface. 0 keeps
   the exact voxel surface everywhere.
3. **Decimation** (``decimate``: the fraction of faces to keep, e.g. 0.1; default off): quadric edge
   collapse (fast-simplification), then the check below. About one structure in seven comes back with
   an edge of four faces, nearly always a back-to-back face pair (a "fin"), which is dropped; what is
   still not closed and manifold, or lost a thin tip (its extent moved by more than half a voxel), is
   decimated again at a milder ratio, and failing that the undecimated mesh is kept (said in the
   mesh's notes). At least 400 faces are kept. VTK's topology-preserving decimators were
   measured too: 8-10x slower and no better here.
4. **Volume** (after smoothing or decimation): every vertex moves along its normal by one common
   distance (at most half a voxel) so the mesh encloses the label's voxel volume again; Taubin
   smoothing keeps big organs' volume but takes a few per cent off thin vessels and ribs.
5. **Check** (:func:`check_mesh`): every directed edge once and its reverse once (closed, consistently
   oriented), one fan per vertex (manifold), no degenerate face; the outward orientation is fixed by
   the sign of the enclosed volume.

Coordinates: patient space, RAS by default (NIfTI, Slicer, Blender) or LPS (DICOM), in mm or m
(``units``), so a mesh overlays its CT exactly. Files (:func:`write_mesh`): binary STL, OBJ, binary
PLY, written here with numpy. :func:`export_meshes` writes one file per structure, named after the
class, plus ``meshes.json`` (ids, colours, categories, volumes, checks) that the Blender scene
builder reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from node.classes import LabelClass, LabelVolume
from node.volume import Geometry

log = logging.getLogger(__name__)

FORMATS = ("stl", "obj", "ply")
Space = Literal["RAS", "LPS"]
Units = Literal["mm", "m"]
#: How far (in voxels, towards its own voxels) each copy of a corner shared by several sheets moves.
SPLIT_NUDGE = 0.02
MESH_INDEX = "meshes.json"
#: Decimation keeps at least this many faces (small structures keep their shape).
MIN_DECIMATED_FACES = 400


# --- options and results ------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshOptions:
    """How meshes are made and written (the CLI's and the ``meshes`` output stage's options)."""

    #: Taubin smoothing iterations (one lambda and one mu step each); 0 = the exact voxel surface.
    smooth_iters: int = 10
    #: Fraction of faces to keep (0 < r <= 1), e.g. 0.1; None or 1 = no decimation.
    decimate: float | None = None
    space: Space = "RAS"
    units: Units = "mm"
    export_format: str = "stl"
    #: Write an empty placeholder file for an expected structure that has no voxel.
    write_empty: bool = False
    #: Structures smaller than this many voxels get no mesh (0 = every structure).
    min_voxels: int = 1
    #: Threads meshing structures side by side (0 = one per CPU core, at most 8).
    workers: int = 0

    def __post_init__(self) -> None:
        if self.smooth_iters < 0:
            raise ValueError(f"smooth_iters must be >= 0, got {self.smooth_iters}")
        if self.decimate is not None and not 0 < self.decimate <= 1:
            raise ValueError(f"decimate is the fraction of faces to keep (0 < r <= 1), got {self.decimate}")
        if self.space not in ("RAS", "LPS"):
            raise ValueError(f"space must be RAS or LPS, got {self.space!r}")
        if self.units not in ("mm", "m"):
            raise ValueError(f"units must be mm or m, got {self.units!r}")
        if self.export_format not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {self.export_format!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> MeshOptions:
        """Options from a stage's option dict; the CLI's flag names (``mesh_smooth_iters``) are accepted."""
        aliases = {"mesh_smooth_iters": "smooth_iters", "format": "export_format", "decimate_ratio": "decimate"}
        known = {f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {}
        for key, value in options.items():
            key = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
            if key in known:
                values[key] = value
        if "export_format" in values:
            values["export_format"] = str(values["export_format"]).lower()
        if "space" in values:
            values["space"] = str(values["space"]).upper()
        return cls(**values)


@dataclass(frozen=True)
class MeshCheck:
    """What :func:`check_mesh` found."""

    closed: bool  # every edge has exactly two faces
    oriented: bool  # ... which use it in opposite directions
    manifold_vertices: bool  # one fan of faces around every vertex
    degenerate_faces: int

    @property
    def watertight(self) -> bool:
        return self.closed and self.oriented and self.manifold_vertices and self.degenerate_faces == 0


@dataclass
class Mesh:
    """One structure's triangle mesh: ``vertices`` (N x 3, float64) and ``faces`` (M x 3, int64)."""

    name: str
    label: int
    vertices: np.ndarray
    faces: np.ndarray
    space: Space = "RAS"
    units: Units = "mm"
    voxels: int = 0
    voxel_volume_mm3: float = 0.0
    check: MeshCheck | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def empty(self) -> bool:
        return len(self.faces) == 0

    @property
    def volume(self) -> float:
        """Enclosed volume in the mesh's units cubed (positive for an outward mesh)."""
        return signed_volume(self.vertices, self.faces)

    @property
    def volume_mm3(self) -> float:
        return self.volume * (1e9 if self.units == "m" else 1.0)

    @property
    def bounds(self) -> np.ndarray:
        """[[xmin, ymin, zmin], [xmax, ymax, zmax]] in the mesh's space and units."""
        if self.empty:
            return np.zeros((2, 3))
        return np.array([self.vertices.min(axis=0), self.vertices.max(axis=0)])


# --- the voxel surface ---------------------------------------------------------------------------

# A corner of the voxel lattice is surrounded by 2x2x2 voxels; voxel (dk, dj, di) of that block is bit
# dk*4 + dj*2 + di of the corner's configuration code. The 12 faces inside the block, which all touch
# the corner, are numbered axis*4 + ob*2 + oc: the face between the two voxels that differ along
# ``axis`` (0 k, 1 j, 2 i), at offset ob/oc along the two other axes taken cyclically after it.
_CYCLIC = {0: (1, 2), 1: (2, 0), 2: (0, 1)}


def _bit(offset: tuple[int, int, int]) -> int:
    return offset[0] * 4 + offset[1] * 2 + offset[2]


def _face_voxels(face: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    axis, ob, oc = face // 4, (face // 2) % 2, face % 2
    b, c = _CYCLIC[axis]
    lo = [0, 0, 0]
    lo[b], lo[c] = ob, oc
    hi = list(lo)
    hi[axis] = 1
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


@cache
def _corner_sheets(code: int, pair_out: int = 0) -> tuple[tuple[int, ...], int, tuple[tuple[float, float, float], ...]]:
    """How the boundary faces around a corner with configuration ``code`` form sheets (fans).

    Around each of the corner's six half-edges (along axis ``e`` on side ``s``: bit ``e*2 + s``) lie
    0, 2 or 4 boundary faces; two are glued, four (two voxels meeting only along that edge) are glued
    in pairs by inside voxel, or by outside voxel where ``pair_out`` has the half-edge's bit set.
    Returns each face's sheet (-1: not a boundary face), the number of sheets, and each sheet's nudge
    direction (unit vector or zero, ``(k, j, i)``, towards the mean centre of its faces).
    """
    faces = [_face_voxels(f) for f in range(12)]
    inside = [(code >> b) & 1 for b in range(8)]

    def is_in(v: tuple[int, int, int]) -> bool:
        return bool(inside[_bit(v)])

    boundary = [f for f in range(12) if is_in(faces[f][0]) != is_in(faces[f][1])]
    parent = {f: f for f in boundary}

    def find(f: int) -> int:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    for e in range(3):
        for s in (0, 1):
            around = []
            for f in boundary:
                axis = f // 4
                if axis == e:
                    continue
                b, _ = _CYCLIC[axis]
                if ((f // 2) % 2 if b == e else f % 2) == s:
                    around.append(f)
            if len(around) == 2:
                parent[find(around[0])] = find(around[1])
            elif len(around) == 4:
                want_in = not (pair_out >> (e * 2 + s)) & 1
                by_voxel: dict[tuple[int, int, int], list[int]] = {}
                for f in around:
                    lo, hi = faces[f]
                    v = lo if is_in(lo) == want_in else hi
                    by_voxel.setdefault(v, []).append(f)
                for pair in by_voxel.values():
                    parent[find(pair[0])] = find(pair[1])
    roots = sorted({find(f) for f in boundary})
    sheet_of = [-1] * 12
    for f in boundary:
        sheet_of[f] = roots.index(find(f))
    nudge = [(0.0, 0.0, 0.0)] * 4
    if len(roots) > 1:
        for sheet, root in enumerate(roots):
            # Towards the middle of its faces (a saddle around the corner, whose faces' middle is
            # the corner itself, stays: at most one sheet of a corner is one).
            centres = [[(a + b) / 2.0 - 0.5 for a, b in zip(*faces[f])] for f in boundary if find(f) == root]
            d = np.mean(centres, axis=0)
            norm = float(np.linalg.norm(d))
            nudge[sheet] = tuple(float(x) for x in d / norm) if norm > 1e-6 else (0.0, 0.0, 0.0)
        for a in range(len(roots)):
            for b in range(a):
                assert np.linalg.norm(np.subtract(nudge[a], nudge[b])) > 0.5, (code, pair_out)
    return tuple(sheet_of), len(roots), tuple(nudge)


@cache
def _corner_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_corner_sheets` of all 256 configurations (default gluing) as arrays, and which
    configurations have a half-edge with four faces (where the other gluing could apply)."""
    sheet_of = np.full((256, 12), -1, np.int8)
    n_sheets = np.zeros(256, np.int8)
    nudge = np.zeros((256, 4, 3))
    critical = np.zeros(256, bool)
    for code in range(256):
        s, n, d = _corner_sheets(code)
        sheet_of[code], n_sheets[code], nudge[code] = s, n, d
        critical[code] = any(_corner_sheets(code, 1 << bit)[0] != s for bit in range(6))
    return sheet_of, n_sheets, nudge, critical


def voxel_surface(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The closed, manifold boundary of a boolean ``[k, j, i]`` mask whose outer layer is background.

    Returns vertices in voxel index units, ``(k, j, i)`` order (a voxel's centre is its index), and
    triangles, consistently oriented (callers fix the sign for their world transform with
    :func:`signed_volume`).

    Faces are glued along edges where two voxels meet only along an edge by inside voxel (the two
    stay apart). Where that leaves two sheets sharing both ends of that edge (the voxels are joined
    around both ends), that edge is glued by outside voxel instead.
    """
    m = np.ascontiguousarray(mask, dtype=bool)
    K, J, I = m.shape
    if K < 3 or J < 3 or I < 3 or m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() \
            or m[:, :, 0].any() or m[:, :, -1].any():
        raise ValueError("voxel_surface needs a mask padded with background on every side")
    dims = np.array([K + 1, J + 1, I + 1])
    refs = []  # per axis: (lattice corners (n, 4, 3), local face index (4,), outward (n,))
    order = ((0, 0), (1, 0), (1, 1), (0, 1))
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        a, b = m[tuple(lo)], m[tuple(hi)]
        idx = np.nonzero(a != b)
        if not len(idx[0]):
            continue
        outward = a[idx]  # True: the lower voxel is inside, the normal points along +axis
        base = np.stack(idx, axis=1)
        base[:, axis] += 1
        bax, cax = _CYCLIC[axis]
        quad = np.repeat(base[:, None, :], 4, axis=1)
        local = np.empty(4, np.int64)
        for n, (eb, ec) in enumerate(order):
            quad[:, n, bax] += eb
            quad[:, n, cax] += ec
            local[n] = axis * 4 + (1 - eb) * 2 + (1 - ec)
        refs.append((quad, local, outward))
    if not refs:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    quads = np.concatenate([q for q, _, _ in refs])
    local = np.concatenate([np.broadcast_to(l, (len(q), 4)) for q, l, _ in refs])
    outward = np.concatenate([o for _, _, o in refs])
    lin = np.ravel_multi_index((quads[..., 0], quads[..., 1], quads[..., 2]), dims)  # (n, 4)
    lattice = int(np.prod(dims))
    if lattice <= 8 * lin.size:  # dense enough: number the corners through a lattice-sized table
        used = np.zeros(lattice, bool)
        used[lin] = True
        corners = np.flatnonzero(used)
        number = np.cumsum(used, dtype=np.int64) - 1
        inverse = number[lin]
    else:
        corners, inverse = np.unique(lin, return_inverse=True)
        inverse = inverse.reshape(lin.shape)
    ck, cj, ci = np.unravel_index(corners, dims)
    flat = m.ravel()
    code = np.zeros(len(corners), np.int64)
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                voxel = ((ck - 1 + dk) * J + (cj - 1 + dj)) * I + (ci - 1 + di)
                code |= flat[voxel].astype(np.int64) << _bit((dk, dj, di))
    sheet_of, n_sheets, nudge_table, critical = _corner_tables()
    sheet = sheet_of[code[inverse], local].astype(np.int64)
    corner_n = n_sheets[code].astype(np.int64)
    corner_xyz = np.stack([ck, cj, ci], axis=1)
    # Where two voxels meet only along a lattice edge, gluing by inside voxel can leave the two
    # sheets sharing both ends of that edge; such an edge is glued by outside voxel instead (at both
    # ends). Only quads with two corners of such configurations can hold one.
    is_critical = critical[code][inverse]
    suspect = np.nonzero(is_critical.sum(axis=1) >= 2)[0]
    critical_refs = np.flatnonzero(is_critical)  # every reference to such a corner, in any quad
    pair_out: dict[int, int] = {}
    for _ in range(8):
        first = np.concatenate([[0], np.cumsum(corner_n)[:-1]])
        q = first[inverse[suspect]] + sheet[suspect]
        e0, e1 = q.ravel(), q[:, [1, 2, 3, 0]].ravel()
        total = int(corner_n.sum())
        und = np.minimum(e0, e1) * total + np.maximum(e0, e1)
        _, where, counts = np.unique(und, return_index=True, return_counts=True)
        bad = where[counts > 2]
        if not len(bad):
            break
        # The two corners of each bad edge, as corner numbers: quad row and position of each end.
        rows, pos = np.divmod(bad, 4)
        ca = inverse[suspect[rows], pos]
        cb = inverse[suspect[rows], (pos + 1) % 4]
        for a, b in zip(ca.tolist(), cb.tolist()):
            axis = int(np.argmax(np.abs(corner_xyz[b] - corner_xyz[a])))
            side = int(corner_xyz[b, axis] > corner_xyz[a, axis])
            pair_out[a] = pair_out.get(a, 0) | 1 << (axis * 2 + side)
            pair_out[b] = pair_out.get(b, 0) | 1 << (axis * 2 + 1 - side)
        for c in set(ca.tolist()) | set(cb.tolist()):
            s_of, n, _ = _corner_sheets(int(code[c]), pair_out[c])
            corner_n[c] = n
            refs_c = critical_refs[inverse.ravel()[critical_refs] == c]
            sheet.ravel()[refs_c] = np.asarray(s_of)[local.ravel()[refs_c]]
    else:
        log.warning("voxel_surface: non-manifold edges left after 8 passes")
    first = np.concatenate([[0], np.cumsum(corner_n)[:-1]])
    vid = first[inverse] + sheet
    q = np.where(outward[:, None], vid, vid[:, ::-1])
    corner_of_vertex = np.repeat(np.arange(len(corners)), corner_n)
    verts = corner_xyz[corner_of_vertex].astype(np.float64) - 0.5
    split = np.nonzero(corner_n > 1)[0]
    if len(split):
        directions = nudge_table[code[split]]  # (s, 4, 3)
        for c, bits in pair_out.items():
            if corner_n[c] > 1:
                directions[np.searchsorted(split, c)] = _corner_sheets(int(code[c]), bits)[2]
        for n in range(4):
            has = corner_n[split] > n
            verts[first[split[has]] + n] += SPLIT_NUDGE * directions[has, n]
    tris = np.concatenate([q[:, [0, 1, 2]], q[:, [0, 2, 3]]])
    return verts, tris


# --- geometry helpers ---------------------------------------------------------------------------


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross product (numpy's np.cross is several times slower on N x 3 arrays)."""
    out = np.empty_like(a)
    out[:, 0] = a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1]
    out[:, 1] = a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2]
    out[:, 2] = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return out


def _face_terms(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, float]:
    """Each face's normal scaled to twice its area, and the enclosed (signed) volume."""
    v = np.asarray(vertices, dtype=np.float64)
    centre = v.mean(axis=0)  # about the centre: keeps the sum well conditioned far from the origin
    a = v[faces[:, 0]] - centre
    b = v[faces[:, 1]] - centre
    c = v[faces[:, 2]] - centre
    normal = _cross(b - a, c - a)
    volume = float(np.einsum("ij,ij->", a, normal) / 6.0)  # a . ((b-a) x (c-a)) = a . (b x c)
    return normal, volume


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed triangle mesh (divergence theorem); negative if it faces inward."""
    if len(faces) == 0:
        return 0.0
    return _face_terms(vertices, faces)[1]


def check_mesh(faces: np.ndarray, n_vertices: int | None = None) -> MeshCheck:
    """Is the triangle mesh closed, consistently oriented and manifold? (Vertices are not needed.)

    Closed and oriented: every directed edge occurs once and its reverse once. Manifold: the faces
    around every vertex form one fan (the corners of a vertex, linked to the face across their
    incoming edge, make a single cycle).
    """
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        return MeshCheck(False, False, False, 0)
    n = int(f.max()) + 1 if n_vertices is None else int(n_vertices)
    degenerate = int(((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])).sum())
    src = f.ravel()  # half-edge h = 3 * face + corner runs src[h] -> dst[h]
    dst = f[:, [1, 2, 0]].ravel()
    key = src * n + dst
    rev = dst * n + src
    order = np.argsort(key)
    order_rev = np.argsort(rev)
    sorted_key = key[order]
    unique_directed = bool((sorted_key[1:] != sorted_key[:-1]).all())
    oriented = unique_directed and bool(np.array_equal(sorted_key, rev[order_rev]))
    if oriented:
        closed = True
    else:  # closed regardless of orientation: each undirected edge exactly twice
        _, counts = np.unique(np.minimum(src, dst) * n + np.maximum(src, dst), return_counts=True)
        closed = bool((counts == 2).all())
    manifold = False
    if oriented:
        twin = np.empty_like(order)
        twin[order_rev] = order  # half-edge twin[h] runs dst[h] -> src[h]
        # Corner h sits at src[h]; the twin of its face's incoming half-edge starts at the same vertex
        # in the neighbouring face: the next corner of that vertex's fan.
        h = np.arange(len(src))
        incoming = h - h % 3 + (h + 2) % 3
        nxt = twin[incoming]
        m = len(src)
        graph = sparse.csr_matrix((np.ones(m, np.int8), nxt, np.arange(m + 1)), shape=(m, m))
        n_fans = connected_components(graph, directed=True, connection="weak", return_labels=False)
        used = np.zeros(n, bool)
        used[src] = True
        manifold = n_fans == int(used.sum())
    return MeshCheck(closed, oriented, manifold, degenerate)


def _walk_matrix(faces: np.ndarray, n: int, closed: bool = False) -> sparse.csr_matrix:
    """Row-stochastic matrix averaging each vertex's neighbours (uniform weights).

    On a closed, consistently oriented mesh (``closed``) every edge occurs once in each direction, so
    the half-edges are the adjacency as they are; otherwise they are made symmetric and unique first.
    """
    src = faces.ravel()
    dst = faces[:, [1, 2, 0]].ravel()
    if not closed:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        key = np.unique(src * n + dst)
        src, dst = key // n, key % n
    counts = np.bincount(src, minlength=n)
    degree = np.maximum(counts, 1).astype(np.float64)
    order = np.argsort(src, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sparse.csr_matrix((1.0 / degree[src[order]], dst[order], indptr), shape=(n, n))


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int,
                  lam: float = 0.5, mu: float = -0.53, closed: bool = False) -> np.ndarray:
    """Taubin's lambda/mu smoothing with uniform weights: a low-pass filter that does not shrink.
    ``closed``: the mesh is known to be closed and consistently oriented (saves a sort)."""
    v = np.asarray(vertices, dtype=np.float64)
    if iterations <= 0 or len(faces) == 0:
        return v.copy()
    centre = v.mean(axis=0)
    v = v - centre
    walk = _walk_matrix(np.asarray(faces, np.int64), len(v), closed)
    for _ in range(iterations):
        v += lam * (walk @ v - v)
        v += mu * (walk @ v - v)
    return v + centre


def vertex_normals(vertices: np.ndarray, faces: np.ndarray, face_normals: np.ndarray | None = None) -> np.ndarray:
    """Area-weighted unit vertex normals (zero where a vertex has no area around it)."""
    fn = _face_terms(vertices, faces)[0] if face_normals is None else face_normals
    n = len(vertices)
    normals = np.empty((n, 3))
    idx = faces.ravel()
    for axis in range(3):
        normals[:, axis] = np.bincount(idx, weights=np.repeat(fn[:, axis], 3), minlength=n)
    length = np.sqrt(np.einsum("ij,ij->i", normals, normals))
    length[length == 0] = 1.0
    return normals / length[:, None]


def surface_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    fn = _face_terms(vertices, faces)[0]
    return float(np.sqrt(np.einsum("ij,ij->i", fn, fn)).sum() / 2.0)


def restore_volume(vertices: np.ndarray, faces: np.ndarray, target: float, max_offset: float,
                   rounds: int = 3, tolerance: float = 1e-3) -> np.ndarray:
    """Move every vertex along its normal by the same distance so the mesh encloses ``target`` again
    (what smoothing and decimation took off thin parts), at most ``max_offset`` in all."""
    v = np.asarray(vertices, dtype=np.float64)
    moved = 0.0
    for _ in range(rounds):
        fn, volume = _face_terms(v, faces)
        if abs(volume - target) <= tolerance * abs(target):
            break
        area = float(np.sqrt(np.einsum("ij,ij->i", fn, fn)).sum() / 2.0)
        if area <= 0:
            break
        step = float(np.clip((target - volume) / area, -max_offset - moved, max_offset - moved))
        if abs(step) < 1e-12:
            break
        v = v + step * vertex_normals(v, faces, fn)
        moved += step
    return v


def compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices no face uses; renumber faces."""
    used, new_faces = np.unique(faces, return_inverse=True)
    return vertices[used], new_faces.reshape(faces.shape).astype(np.int64)


# --- decimation ---------------------------------------------------------------------------------


def _quadric(v: np.ndarray, f: np.ndarray, keep: float) -> tuple[np.ndarray, np.ndarray]:
    import fast_simplification  # type: ignore[import-not-found]

    pts, tris = fast_simplification.simplify(np.ascontiguousarray(v, np.float64), f.astype(np.int32),
                                             target_reduction=1.0 - keep)
    return compact(np.asarray(pts, np.float64), np.asarray(tris, np.int64))


def drop_fins(faces: np.ndarray) -> np.ndarray:
    """Faces without the pairs that share all three vertices (back-to-back "fins" a collapse can
    leave on an edge, making it an edge of four faces); the rest stays closed around them."""
    if len(faces) == 0:
        return faces
    s = np.sort(faces, axis=1)
    n = int(s.max()) + 1
    key = (s[:, 0] * n + s[:, 1]) * n + s[:, 2]
    order = np.argsort(key)
    k = key[order]
    dup = np.zeros(len(k), bool)
    same = k[1:] == k[:-1]
    dup[1:] |= same
    dup[:-1] |= same
    keep = np.ones(len(faces), bool)
    keep[order[dup]] = False
    return faces[keep]


def decimate(vertices: np.ndarray, faces: np.ndarray, keep: float,
             max_shift: float | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Keep about ``keep`` of the faces, closed and manifold, or say why not.

    Quadric edge collapse (fast-simplification); a result with an edge of four faces is repaired by
    dropping back-to-back face pairs. A result still not closed and manifold, or whose bounding box
    moved by more than ``max_shift`` on any side (a collapse took off a thin tip), is decimated again
    at a milder ratio (x1.25, x1.6, x2.5). Returns the mesh and what happened: ``"quadric"``,
    ``"quadric+fins"``, ``"quadric@<ratio>"``, or ``"none: <why>"`` with the input unchanged.
    """
    try:
        import fast_simplification  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return vertices, faces, "none: fast-simplification is not installed"
    box = np.array([vertices.min(axis=0), vertices.max(axis=0)])
    why = "no decimation stayed closed and manifold"
    for factor in (1.0, 1.25, 1.6, 2.5):
        ratio = min(keep * factor, 1.0)
        if ratio >= 1.0:
            break
        v, f = _quadric(vertices, faces, ratio)
        how = "quadric" if factor == 1.0 else f"quadric@{ratio:.3g}"
        if not (len(f) and check_mesh(f, len(v)).watertight):
            v, f = compact(v, drop_fins(f))
            how += "+fins"
            if not (len(f) and check_mesh(f, len(v)).watertight):
                continue
        if max_shift is not None and np.abs(np.array([v.min(axis=0), v.max(axis=0)]) - box).max() > max_shift:
            why = f"every decimation moved the extent by more than {max_shift:.3g}"
            continue
        return v, f, how
    return vertices, faces, f"none: {why}"


# --- one structure ------------------------------------------------------------------------------


def world_transform(geometry: Geometry, space: Space = "RAS", units: Units = "mm") -> np.ndarray:
    """4x4 matrix from voxel index ``(k, j, i, 1)`` (this module's vertex order) to patient space."""
    swap = np.zeros((4, 4))
    swap[0, 2] = swap[1, 1] = swap[2, 0] = swap[3, 3] = 1.0  # (k, j, i) -> (i, j, k)
    m = (geometry.affine_ras if space == "RAS" else geometry.affine) @ swap
    if units == "m":
        m = np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ m
    return m


@cache
def _index_orientation() -> float:
    """+1 if :func:`voxel_surface` faces outward in ``(k, j, i)`` index space, else -1."""
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    return float(np.sign(signed_volume(*voxel_surface(one))))


def structure_mesh(
    mask: np.ndarray,
    geometry: Geometry,
    options: MeshOptions = MeshOptions(),
    offset: tuple[int, int, int] = (0, 0, 0),
    name: str = "",
    label: int = 0,
) -> Mesh:
    """The mesh of one boolean ``[k, j, i]`` mask (a crop whose voxel (0, 0, 0) is ``offset`` of the
    full grid); see the module docstring for the steps."""
    started = time.perf_counter()
    m = np.asarray(mask, dtype=bool)
    voxels = int(np.count_nonzero(m))
    sx, sy, sz = geometry.spacing
    target = voxels * sx * sy * sz
    mesh = Mesh(name=name, label=label, vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), np.int64),
                space=options.space, units=options.units, voxels=voxels, voxel_volume_mm3=target)
    if voxels == 0:
        return mesh
    nz = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = [int(n[0]) for n in nz]
    hi = [int(n[-1]) + 1 for n in nz]
    verts, faces = voxel_surface(np.pad(m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1))
    verts += np.array(offset, float) + np.array(lo, float) - 1.0  # back to the full grid's indices
    t = world_transform(geometry, options.space, "mm")
    verts = verts @ t[:3, :3].T + t[:3, 3]
    if _index_orientation() * np.linalg.det(t[:3, :3]) < 0:
        faces = faces[:, ::-1].copy()
    changed = False
    if options.smooth_iters:
        smoothed = taubin_smooth(verts, faces, options.smooth_iters, closed=True)
        if signed_volume(smoothed, faces) < 0.5 * target:  # a structure of a few voxels melts away
            mesh.notes.append("too small to smooth: exact voxel surface")
        else:
            verts, changed = smoothed, True
    keep = 1.0 if options.decimate is None else max(options.decimate, MIN_DECIMATED_FACES / max(len(faces), 1))
    if keep < 1.0:
        verts, faces, how = decimate(verts, faces, keep, max_shift=0.5 * max(geometry.spacing))
        changed = changed or not how.startswith("none")
        if how.startswith("none"):
            mesh.notes.append(f"undecimated ({how[6:]})")
        elif how != "quadric":
            mesh.notes.append(f"decimated: {how}")
    if changed:
        verts = restore_volume(verts, faces, target, max_offset=0.5 * min(geometry.spacing))
    check = check_mesh(faces, len(verts))
    if options.units == "m":
        verts = verts * 1e-3
    mesh.vertices, mesh.faces, mesh.check = verts, faces, check
    if not check.watertight:
        mesh.notes.append(f"not closed and manifold: {check}")
    mesh.seconds = time.perf_counter() - started
    return mesh


#: Label maps whose structures' boxes hold more voxels than this are meshed in worker processes.
PROCESS_THRESHOLD = 4_000_000


def _mesh_task(task: tuple[Any, ...]) -> Mesh:
    packed, shape, geometry, options, offset, name, label = task
    mask = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
    return structure_mesh(mask, geometry, options, offset=offset, name=name, label=label)


def label_meshes(
    labels: LabelVolume,
    options: MeshOptions = MeshOptions(),
    ids: Iterable[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Mesh]:
    """Meshes of the structures of ``labels`` (those in ``ids``, default every class present), by id.

    Structures are meshed side by side in ``options.workers`` processes (0: one per core, at most 8)
    when the map is big enough to pay for starting them (:data:`PROCESS_THRESHOLD`); the quadric
    decimator holds the GIL, so threads would not help.
    """
    array = labels.array
    wanted = sorted(set(labels.present_ids()) if ids is None else {int(i) for i in ids})
    max_id = int(array.max()) if array.size else 0
    boxes = ndimage.find_objects(array, max_label=max_id) if max_id > 0 else []
    items = []
    for i in wanted:
        box = boxes[i - 1] if 0 < i <= len(boxes) else None
        name = labels.classes[i].name if i in labels.classes else f"label_{i}"
        items.append((i, name, box))
    items.sort(key=lambda t: -_box_size(t[2]))  # big structures first keeps every worker busy to the end
    total_box = sum(_box_size(t[2]) for t in items)
    workers = options.workers or min(os.cpu_count() or 1, 8)
    workers = min(workers, len(items))
    results: list[Mesh] = []

    def crop(item: tuple[int, str, tuple[slice, ...] | None]) -> tuple[np.ndarray, tuple[int, int, int]]:
        i, _, box = item
        if box is None:
            return np.zeros((1, 1, 1), bool), (0, 0, 0)
        mask = array[box] == i
        if np.count_nonzero(mask) < options.min_voxels:
            mask = np.zeros((1, 1, 1), bool)
        return mask, (box[0].start, box[1].start, box[2].start)

    def report() -> None:
        if progress is not None:
            progress(len(results), len(items))

    if workers > 1 and total_box > PROCESS_THRESHOLD:
        import multiprocessing
        import threading
        from concurrent.futures import ProcessPoolExecutor

        # fork is quick, but only safe while this process has one thread; the node's server has many,
        # so it gets forkserver. The mask crops travel as bits.
        context = multiprocessing.get_context("fork" if threading.active_count() == 1 else "forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = []
            for item in items:
                mask, offset = crop(item)
                task = (np.packbits(mask), mask.shape, labels.geometry, options, offset, item[1], item[0])
                futures.append(pool.submit(_mesh_task, task))
            for future in futures:
                results.append(future.result())
                report()
    else:
        for item in items:
            mask, offset = crop(item)
            results.append(structure_mesh(mask, labels.geometry, options, offset=offset, name=item[1],
                                          label=item[0]))
            report()
    return sorted(results, key=lambda m: m.label)


def _box_size(box: tuple[slice, ...] | None) -> int:
    if box is None:
        return 0
    return int(np.prod([s.stop - s.start for s in box]))


# --- files ----------------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def file_stem(name: str) -> str:
    """A structure's name as a file name: the name itself where it is safe (TotalSegmentator's are)."""
    stem = _SAFE.sub("_", name).strip("._") or "structure"
    return stem


def write_stl(path: Path, vertices: np.ndarray, faces: np.ndarray, name: str = "") -> Path:
    """Binary STL (little-endian float32, facet normals from the vertex order)."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    record = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    data = np.zeros(len(f), record)
    if len(f):
        tri = v[f]
        n = _cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        length = np.linalg.norm(n, axis=1)
        length[length == 0] = 1.0
        data["normal"] = n / length[:, None]
        data["v"] = tri
    header = f"segnode {name}".encode("ascii", "replace")[:80].ljust(80, b" ")
    if header.lower().startswith(b"solid"):  # an ASCII STL starts so; readers would be misled
        header = b"binary " + header[:73]
    with open(path, "wb") as out:
        out.write(header)
        out.write(np.uint32(len(f)).tobytes())
        out.write(data.tobytes())
    return path


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, name: str = "") -> Path:
    """Wavefront OBJ: one object, ``v`` lines (6 decimals) and 1-based ``f`` lines."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64) + 1
    with open(path, "w", encoding="ascii", newline="\n") as out:
        out.write(f"# segnode mesh\no {file_stem(name) if name else 'mesh'}\n")
        if len(v):
            np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
        if len(f):
            np.savetxt(out, f, fmt="f %d %d %d")
    return path


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, name: str = "") -> Path:
    """Binary little-endian PLY: float32 x, y, z; faces as ``list uchar int vertex_indices``."""
    v = np.ascontiguousarray(vertices, "<f4")
    f = np.asarray(faces, np.int64)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment segnode {name}\n"
        f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    record = np.dtype([("n", "u1"), ("i", "<i4", 3)])
    data = np.empty(len(f), record)
    data["n"] = 3
    data["i"] = f
    with open(path, "wb") as out:
        out.write(header.encode("ascii", "replace"))
        out.write(v.tobytes())
        out.write(data.tobytes())
    return path


WRITERS = {"stl": write_stl, "obj": write_obj, "ply": write_ply}


def write_mesh(path: Path | str, vertices: np.ndarray, faces: np.ndarray, name: str = "",
               export_format: str | None = None) -> Path:
    """Write a mesh as STL, OBJ or PLY (by ``export_format`` or the file's suffix)."""
    path = Path(path)
    fmt = (export_format or path.suffix.lstrip(".")).lower()
    if fmt not in WRITERS:
        raise ValueError(f"mesh format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return WRITERS[fmt](path, vertices, faces, name)


def read_mesh(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read an STL (binary or ASCII), OBJ or PLY (binary or ASCII, triangles or polygons) file.

    STL repeats each vertex per facet; equal positions are merged into one vertex. Polygons are
    fanned into triangles. An empty placeholder gives empty arrays.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    data = path.read_bytes()
    if suffix == ".stl":
        return _read_stl(data)
    if suffix == ".obj":
        return _read_obj(data.decode("utf-8", "replace"))
    if suffix == ".ply":
        return _read_ply(data)
    raise ValueError(f"{path}: not an .stl, .obj or .ply file")


def _merge(tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = tri.reshape(-1, 3)
    if not len(flat):
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    unique, inverse = np.unique(flat, axis=0, return_inverse=True)
    return unique.astype(np.float64), inverse.reshape(-1, 3).astype(np.int64)


def _read_stl(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(data) >= 84:
        count = int(np.frombuffer(data, "<u4", 1, 80)[0])
        if 84 + 50 * count == len(data):
            record = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
            return _merge(np.frombuffer(data, record, count, 84)["v"].astype(np.float64))
    text = data.decode("ascii", "replace")
    values = [line.split()[1:4] for line in text.splitlines() if line.strip().startswith("vertex")]
    return _merge(np.array(values, np.float64).reshape(-1, 3, 3) if values else np.zeros((0, 3, 3)))


def _fan(polygons: list[list[int]]) -> np.ndarray:
    tris = [(p[0], p[n], p[n + 1]) for p in polygons for n in range(1, len(p) - 1)]
    return np.array(tris, np.int64).reshape(-1, 3)


def _read_obj(text: str) -> tuple[np.ndarray, np.ndarray]:
    verts: list[list[float]] = []
    polys: list[list[int]] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts[0] == "f":
            idx = [int(p.split("/")[0]) for p in parts[1:]]
            polys.append([i - 1 if i > 0 else len(verts) + i for i in idx])
    return np.array(verts, np.float64).reshape(-1, 3), _fan(polys)


def _read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError("not a PLY file")
    body_start = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii", "replace").splitlines()
    fmt = ""
    elements: list[tuple[str, int, list[tuple[str, ...]]]] = []
    for line in header:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property" and elements:
            elements[-1][2].append(tuple(parts[1:]))
    types = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
    verts = np.zeros((0, 3))
    polys: list[list[int]] = []
    if fmt == "ascii":
        lines = iter(data[body_start:].decode("ascii", "replace").split("\n"))
        for name, count, props in elements:
            rows = [next(lines).split() for _ in range(count)]
            if name == "vertex":
                names = [p[-1] for p in props]
                cols = [names.index(a) for a in ("x", "y", "z")]
                verts = np.array([[float(r[c]) for c in cols] for r in rows], np.float64).reshape(-1, 3)
            elif name == "face":
                polys = [[int(x) for x in r[1:1 + int(r[0])]] for r in rows]
        return verts, _fan(polys)
    endian = "<" if fmt == "binary_little_endian" else ">"
    pos = body_start
    faces = np.zeros((0, 3), np.int64)
    for name, count, props in elements:
        if all(p[0] != "list" for p in props):
            dtype = np.dtype([(p[-1], endian + types[p[0]]) for p in props])
            table = np.frombuffer(data, dtype, count, pos)
            pos += dtype.itemsize * count
            if name == "vertex":
                verts = np.stack([table[a].astype(np.float64) for a in ("x", "y", "z")], axis=1)
            continue
        if name == "face" and len(props) == 1 and count:
            _, count_type, index_type, _ = props[0]
            ct, it = np.dtype(endian + types[count_type]), np.dtype(endian + types[index_type])
            first = int(np.frombuffer(data, ct, 1, pos)[0])
            dtype = np.dtype([("n", ct), ("i", it, first)])
            table = np.frombuffer(data, dtype, count, pos) if pos + dtype.itemsize * count <= len(data) else None
            if table is not None and (table["n"] == first).all():  # all polygons the same size: fast path
                faces = _fan(table["i"].astype(np.int64).tolist()) if first != 3 else table["i"].astype(np.int64)
                pos += dtype.itemsize * count
                continue
        # General path: lists of varying length, other properties.
        for _ in range(count):
            row: list[int] = []
            for p in props:
                if p[0] == "list":
                    ct, it = np.dtype(endian + types[p[1]]), np.dtype(endian + types[p[2]])
                    n = int(np.frombuffer(data, ct, 1, pos)[0])
                    pos += ct.itemsize
                    values = np.frombuffer(data, it, n, pos)
                    pos += it.itemsize * n
                    if p[-1] in ("vertex_indices", "vertex_index"):
                        row = values.astype(np.int64).tolist()
                else:
                    pos += np.dtype(types[p[0]]).itemsize
            if name == "face":
                polys.append(row)
    if polys:
        faces = _fan(polys)
    return verts, faces


# --- a folder of meshes ---------------------------------------------------------------------------


def export_meshes(
    labels: LabelVolume,
    outdir: Path | str,
    options: MeshOptions = MeshOptions(),
    expected: dict[int, LabelClass] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """One mesh file per structure in ``outdir`` (``<name>.<format>``) and ``meshes.json``.

    ``expected``: the classes a batch importer looks for; with ``options.write_empty`` each of them that
    has no voxel gets an empty placeholder file (a 0-facet STL, an OBJ with no face, a 0-face PLY).
    Returns the index written to ``meshes.json``.
    """
    from node.artifacts.palette import auto_color

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meshes = label_meshes(labels, options, progress=progress)
    classes = dict(expected or {})
    classes.update(labels.classes)
    ext = options.export_format
    entries = []
    seen: set[str] = set()

    def entry_for(label: int, name: str) -> dict[str, Any]:
        c = classes.get(label)
        category = c.category if c is not None else "Other"
        color = list(c.color) if c is not None else list(auto_color(name, category, label))
        stem = file_stem(name)
        if stem in seen:  # two classes with the same name: keep both files
            stem = f"{stem}_{label}"
        seen.add(stem)
        return {"id": label, "name": name, "file": f"{stem}.{ext}", "category": category, "color": color,
                "color_auto": list(auto_color(name, category, label))}

    for mesh in meshes:
        e = entry_for(mesh.label, mesh.name)
        write_mesh(outdir / e["file"], mesh.vertices, mesh.faces, mesh.name, ext)
        e.update(
            empty=mesh.empty, voxels=mesh.voxels, voxel_volume_ml=round(mesh.voxel_volume_mm3 / 1000.0, 4),
            mesh_volume_ml=round(mesh.volume_mm3 / 1000.0, 4), vertices=len(mesh.vertices),
            faces=len(mesh.faces), watertight=bool(mesh.check and mesh.check.watertight),
            bounds=np.round(mesh.bounds, 4).tolist(), seconds=round(mesh.seconds, 3), notes=mesh.notes,
        )
        entries.append(e)
    if options.write_empty:
        have = {m.label for m in meshes}
        for label, c in sorted(classes.items()):
            if label in have:
                continue
            e = entry_for(label, c.name)
            write_mesh(outdir / e["file"], np.zeros((0, 3)), np.zeros((0, 3), np.int64), c.name, ext)
            e.update(empty=True, voxels=0, voxel_volume_ml=0.0, mesh_volume_ml=0.0, vertices=0, faces=0,
                     watertight=False, bounds=None, seconds=0.0, notes=["no voxel: empty placeholder"])
            entries.append(e)
    entries.sort(key=lambda e: e["id"])
    g = labels.geometry
    index = {
        "version": 1,
        "format": ext,
        "space": options.space,
        "units": options.units,
        "smooth_iters": options.smooth_iters,
        "decimate": options.decimate,
        "grid": {"shape_ijk": list(labels.shape_ijk), "spacing_mm": list(g.spacing),
                 "affine_ras": np.round(g.affine_ras, 6).tolist()},
        "seconds": round(time.perf_counter() - started, 3),
        "meshes": entries,
    }
    (outdir / MESH_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def read_mesh_folder(folder: Path | str) -> list[dict[str, Any]]:
    """The meshes of a folder: ``meshes.json``'s entries when there is one, else every .stl/.obj/.ply
    file (name = file stem, category guessed from the name). Each entry gets ``path``."""
    folder = Path(folder)
    index = folder / MESH_INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        entries = []
        for e in data.get("meshes", []):
            e = dict(e)
            e["path"] = str(folder / e["file"])
            e.setdefault("units", data.get("units", "mm"))
            e.setdefault("space", data.get("space", "RAS"))
            entries.append(e)
        return entries
    from node.artifacts.palette import auto_color, category_of

    entries = []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".stl", ".obj", ".ply") and p.is_file())
    for n, p in enumerate(files, 1):
        category = category_of(p.stem)
        entries.append({"id": n, "name": p.stem, "file": p.name, "path": str(p), "category": category,
                        "color": None, "color_auto": list(auto_color(p.stem, category, n)),
                        "empty": p.stat().st_size <= 134, "units": None, "space": None})
    return entries


# --- the pipeline's output stage ------------------------------------------------------------------


def meshes_stage(ctx: Any) -> None:
    """Output stage ``meshes``: ``meshes/<name>.<format>`` and ``meshes/meshes.json`` in the run folder.

    Options (``stage_options["meshes"]``): the :class:`MeshOptions` fields, by those names or the CLI's
    (``export_format``, ``units``, ``mesh_smooth_iters``, ``decimate``, ``write_empty``, ``space``).
    With ``write_empty``, the expected classes are the engine's full class list when it is
    TotalSegmentator (its task's map), else the classes of the labels.
    """
    options = MeshOptions.from_dict(ctx.options)
    expected = None
    if options.write_empty:
        expected = _expected_classes(ctx)
    outdir = Path(ctx.outdir) / "meshes"
    if outdir.is_dir():  # an earlier run's meshes in this run folder must not pass for this one's
        for old in outdir.iterdir():
            if old.is_file() and (old.suffix.lower() in (".stl", ".obj", ".ply") or old.name == MESH_INDEX):
                old.unlink()
    index = export_meshes(ctx.labels, outdir, options, expected=expected)
    ctx.artifacts["meshes"] = outdir
    written = [e for e in index["meshes"] if not e["empty"]]
    ctx.qc["meshes"] = {
        "format": options.export_format, "units": options.units, "space": options.space,
        "meshes": len(written), "placeholders": len(index["meshes"]) - len(written),
        "watertight": sum(1 for e in written if e["watertight"]),
        "faces": sum(e["faces"] for e in written), "seconds": index["seconds"],
    }
    bad = [e["name"] for e in written if not e["watertight"]]
    if bad:
        ctx.notes.append(f"meshes not closed and manifold: {', '.join(bad)}")


def _expected_classes(ctx: Any) -> dict[int, LabelClass]:
    request = getattr(ctx.request, "segment", None)
    if request is not None and getattr(request, "engine", "") == "totalsegmentator":
        try:
            from node.segment.snomed import task_classes

            return task_classes(request.task)
        except Exception as exc:  # noqa: BLE001 - TotalSegmentator not importable here: the classes we have
            log.info("write_empty: no TotalSegmentator class map (%s); expecting the labels' classes", exc)
    return dict(ctx.labels.classes)
