"""The body envelope: the box nnU-Net's sliding window needs to cover on a CT, the rest is air.

A CT's field of view is mostly air around the patient; TotalSegmentator's networks label it
background, yet nnU-Net's sliding window runs tiles over all of it. The envelope is the bounding box
of the body (voxels above :data:`BODY_HU`, the connected components at least
:data:`MIN_COMPONENT_SHARE` of the largest one's size, so a separate arm or the table stay in), grown
by a margin in mm and to at least one network patch per axis where the image allows (so nnU-Net never
pads the box with values that are not the patient's air). Only for CT-normalised models: their
normalisation is per voxel (fixed clip, mean and std from the plans), so the voxels inside the box see
the same network input as in the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Air is about -1000 HU, lung -900..-500, fat about -100: above this is body (or table, clothing).
BODY_HU = -500.0
#: Components smaller than this share of the largest one are noise, not body.
MIN_COMPONENT_SHARE = 0.05


@dataclass(frozen=True)
class Envelope:
    """A box ``[lo, hi)`` per axis in an array's own index order."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.lo, self.hi))

    def covers(self, shape: Sequence[int]) -> bool:
        return all(a == 0 for a in self.lo) and tuple(self.hi) == tuple(shape)


def body_envelope(
    array: np.ndarray,
    spacing: Sequence[float],
    margin_mm: float,
    min_extent: Sequence[int] = (0, 0, 0),
    threshold: float = BODY_HU,
) -> Envelope | None:
    """The body's bounding box in ``array`` (any axis order; ``spacing`` in the same order), grown by
    ``margin_mm`` and to ``min_extent`` voxels per axis (clipped to the array); None when nothing is
    above ``threshold`` (no body found: the caller runs the whole image)."""
    from scipy import ndimage

    body = array > threshold
    if not body.any():
        return None
    labels, n = ndimage.label(body)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= MIN_COMPONENT_SHARE * sizes.max()) + 1
        body = np.isin(labels, keep)
    lo: list[int] = []
    hi: list[int] = []
    for axis, size in enumerate(array.shape):
        other = tuple(a for a in range(array.ndim) if a != axis)
        where = np.flatnonzero(body.any(axis=other))
        margin = int(math.ceil(margin_mm / float(spacing[axis]))) if margin_mm > 0 else 0
        a, b = int(where[0]) - margin, int(where[-1]) + 1 + margin
        need = int(min_extent[axis]) - (b - a)
        if need > 0:  # grow to one patch, evenly, then against the border
            a -= need // 2
            b += need - need // 2
            if a < 0:
                b, a = b - a, 0
            if b > size:
                a, b = a - (b - size), size
        lo.append(max(0, a))
        hi.append(min(size, b))
    return Envelope(tuple(lo), tuple(hi))
