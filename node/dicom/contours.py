"""Planar contours of label masks, per slice: traced, simplified, rasterised back.

The convention (what RTSTRUCT's CLOSED_PLANAR contours mean here and in planning systems):

* **Where a contour runs**: on the 0.5 iso-line of the slice's mask (marching squares,
  :func:`skimage.measure.find_contours`), i.e. half-way between an inside and an outside pixel centre.
  A pixel belongs to the structure when its centre is inside the contour — the rule planning systems
  rasterise with — so the traced contour gives back the mask exactly and encloses its area (a contour
  through the boundary pixels' centres, OpenCV's and so rt-utils', loses half a pixel all round: 17 %
  of a 1 mL structure's area per slice at 0.8 mm pixels).
* **Holes and islands**: every boundary is its own closed contour; a hole is a contour inside another
  one, and a point is inside the structure when it is inside an odd number of the slice's contours
  (even-odd rule). That is how Eclipse, RayStation and plastimatch exchange holes, and what DICOM later
  named CLOSEDPLANAR_XOR; the contours stay CLOSED_PLANAR for the systems that predate it. The
  "keyhole" alternative (one contour with a zero-width cut into each hole) is not used: its cut is a
  line of pixels a rasteriser may or may not fill, and an island in a hole needs a second cut.
* **Simplification**: Douglas-Peucker with a tolerance in pixels (default :data:`TOLERANCE_PX`,
  0.4 pixel, at most 0.5): no traced point is farther than that from the simplified contour. It runs on every
  contour of a structure at once, one numpy pass per level of the recursion.

``trace(mask, tolerance)`` gives, per slice ``k``, a list of polygons in (column, row) pixel
coordinates of the full grid; :func:`rasterise` fills polygons back into a mask by the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: Default simplification tolerance, in pixels (of the in-plane spacing).
#: 0.4: the pixel centres nearest a traced contour lie 0.354 pixel from it (at a corner cut), so up
#: to that nothing changes sides; 0.4 drops a fifth of the points and changes a few voxels in 10,000.
TOLERANCE_PX = 0.4


def trace_slice(mask: np.ndarray) -> list[np.ndarray]:
    """The closed 0.5 iso-lines of a 2-D boolean mask as (n, 2) arrays of (column, row), first point
    not repeated at the end. Diagonal neighbours inside the mask are connected (8-connectivity)."""
    from skimage.measure import find_contours

    padded = np.pad(mask, 1).astype(np.float32)
    out = []
    for c in find_contours(padded, 0.5, fully_connected="high"):
        if len(c) < 4:
            continue
        out.append(np.ascontiguousarray(c[:-1, ::-1] - 1.0))  # (row, col) -> (col, row), padding off
    return out


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon without the vertices where it goes straight on (marching squares puts one on
    every pixel edge): most of a contour's points, removed before the costlier simplification."""
    d = np.diff(points, axis=0, append=points[:1])
    prev = np.roll(d, 1, axis=0)
    turn = np.abs(prev[:, 0] * d[:, 1] - prev[:, 1] * d[:, 0]) > 1e-9
    return points[turn] if turn.sum() >= 3 else points


def simplify(polygons: list[np.ndarray], tolerance: float = TOLERANCE_PX) -> list[np.ndarray]:
    """Douglas-Peucker on closed polygons, all at once: each keeps the vertices that no dropped vertex
    is farther than ``tolerance`` from. A polygon that would shrink below three vertices keeps its
    three farthest-apart ones."""
    rings = [_drop_collinear(p) for p in polygons]
    if tolerance <= 0 or not rings:
        return rings
    # Each ring is closed by repeating its first point; all rings in one array.
    closed = [np.vstack([r, r[:1]]) for r in rings]
    lengths = np.array([len(c) for c in closed])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pts = np.vstack(closed)
    keep = np.zeros(len(pts), bool)
    keep[starts] = True
    keep[starts + lengths - 1] = True
    # First split of each ring: at the point farthest from its first point.
    far = np.array([s + int(np.argmax(((c - c[0]) ** 2).sum(axis=1))) for s, c in zip(starts, closed)])
    keep[far] = True
    seg_a = np.concatenate([starts, far])
    seg_b = np.concatenate([far, starts + lengths - 1])
    while len(seg_a):
        inner = seg_b - seg_a - 1
        has = inner > 0
        seg_a, seg_b, inner = seg_a[has], seg_b[has], inner[has]
        if not len(seg_a):
            break
        owner = np.repeat(np.arange(len(seg_a)), inner)
        offsets = np.arange(inner.sum()) - np.repeat(np.cumsum(inner) - inner, inner)
        idx = seg_a[owner] + 1 + offsets
        a, b = pts[seg_a][owner], pts[seg_b][owner]
        ab = b - a
        ap = pts[idx] - a
        norm = np.hypot(ab[:, 0], ab[:, 1])
        cross = np.abs(ab[:, 0] * ap[:, 1] - ab[:, 1] * ap[:, 0])
        dist = np.where(norm > 0, cross / np.where(norm > 0, norm, 1), np.hypot(ap[:, 0], ap[:, 1]))
        bounds = np.cumsum(inner) - inner
        best = np.maximum.reduceat(dist, bounds)
        split = best > tolerance
        if not split.any():
            break
        # The first index of each segment's farthest point.
        is_best = dist == best[owner]
        first = np.full(len(seg_a), -1)
        cand = np.nonzero(is_best & split[owner])[0]
        cand_owner = owner[cand]
        uniq, where = np.unique(cand_owner, return_index=True)
        first[uniq] = idx[cand[where]]
        s = np.nonzero(split)[0]
        mid = first[s]
        keep[mid] = True
        seg_a, seg_b = np.concatenate([seg_a[s], mid]), np.concatenate([mid, seg_b[s]])
    out = []
    for s, n, ring in zip(starts, lengths, rings):
        kept = pts[s : s + n - 1][keep[s : s + n - 1]]
        if len(kept) < 3:
            kept = ring[np.linspace(0, len(ring) - 1, 3).astype(int)] if len(ring) >= 3 else ring
        out.append(kept)
    return out


def trace(mask: np.ndarray, tolerance: float = TOLERANCE_PX) -> dict[int, list[np.ndarray]]:
    """Contours of a 3-D mask ``[k, j, i]``, per slice ``k`` that has any: polygons of (column, row)
    pixel coordinates, simplified within ``tolerance`` pixels. Work is limited to the mask's box."""
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    if not len(ks):
        return {}
    rows = np.nonzero(mask.any(axis=(0, 2)))[0]
    cols = np.nonzero(mask.any(axis=(0, 1)))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    offset = np.array([c0, r0], np.float64)
    traced: list[tuple[int, np.ndarray]] = []
    for k in ks:
        for poly in trace_slice(mask[k, r0:r1, c0:c1]):
            traced.append((int(k), poly + offset))
    simplified = simplify([p for _, p in traced], tolerance)
    out: dict[int, list[np.ndarray]] = {}
    for (k, _), poly in zip(traced, simplified):
        out.setdefault(k, []).append(poly)
    return out


def rasterise(polygons: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The pixels (rows x columns) whose centre is inside an odd number of ``polygons`` (each (n, 2)
    of (column, row)): the even-odd rule, the inverse of :func:`trace`. A scanline fill: for each row,
    the crossings of every polygon edge with the line through the pixel centres."""
    rows_n, cols_n = shape
    toggles = np.zeros((rows_n, cols_n + 1), np.int32)
    for poly in polygons:
        p = np.asarray(poly, np.float64)
        if len(p) < 3:
            continue
        x0, y0 = p[:, 0], p[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # Rows y with lo <= y < hi (half-open: a vertex on a scanline counts once).
        first = np.clip(np.ceil(lo).astype(np.int64), 0, rows_n)
        last = np.clip(np.ceil(hi).astype(np.int64), 0, rows_n)
        count = np.maximum(last - first, 0)
        if not count.any():
            continue
        edge = np.repeat(np.arange(len(p)), count)
        y = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
        t = (y - y0[edge]) / (y1[edge] - y0[edge])
        x = x0[edge] + t * (x1[edge] - x0[edge])
        # Pixel centres at column c are inside right of the crossing: toggle from ceil(x) on. The
        # toggles of all polygons add up; the parity of their running sum is the even-odd rule.
        c = np.clip(np.ceil(x).astype(np.int64), 0, cols_n)
        np.add.at(toggles, (y, c), 1)
    return (np.cumsum(toggles, axis=1)[:, :cols_n] % 2) == 1
