"""Per-structure statistics of a run: what ``stats.csv``, ``report.json``, the measurements SR and the
review sheet show, computed once (:meth:`node.stages.PipelineContext.structures`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from node.classes import Code, LabelVolume
from node.volume import Volume


def structure_stats(labels: LabelVolume, ct: Volume) -> list[dict[str, Any]]:
    """Per class: voxels, volume (voxels x voxel volume), mean and SD of the image values, border contact."""
    a = labels.array
    n = int(a.max()) + 1 if a.size else 1
    counts = np.zeros(n, np.int64)
    sums, squares = np.zeros(n), np.zeros(n)
    background = 0 not in labels.classes  # no row for it: its (mostly) many voxels are left out
    # About a million voxels at a time: whole-volume float64 copies of the image (and of its squares)
    # cost seconds of allocation on a 512 x 512 x 300 CT, and short numpy calls let the outbox thread,
    # sending the SEG meanwhile, have the GIL. The sums of integer HU are exact either way.
    step = max(1, (1 << 20) // max(1, a[0].size))
    for start in range(0, a.shape[0], step):
        ids, values = a[start : start + step], ct.array[start : start + step]
        if background:
            inside = ids != 0
            ids, values = ids[inside], values[inside]
        ids, values = ids.ravel(), values.ravel().astype(np.float64)
        counts += np.bincount(ids, minlength=n)
        sums += np.bincount(ids, weights=values, minlength=n)
        squares += np.bincount(ids, weights=values * values, minlength=n)
    faces = (a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1])
    on_border = set(np.unique(np.concatenate([f.ravel() for f in faces])).tolist())
    sx, sy, sz = labels.geometry.spacing
    voxel_mm3 = sx * sy * sz
    rows = []
    for i, c in sorted(labels.classes.items()):
        count = int(counts[i]) if i < n else 0
        mean = float(sums[i] / count) if count else None
        std = float(np.sqrt(max(squares[i] / count - mean**2, 0.0))) if mean is not None else None
        rows.append({
            "id": i, "name": c.name, "category": c.category, "color": list(c.color),
            "property_type": code_dict(c.property_type),
            "voxels": count,
            "volume_ml": count * voxel_mm3 / 1000.0,  # exactly voxels x voxel volume
            "mean_hu": None if mean is None else round(mean, 2),
            "std_hu": None if std is None else round(std, 2),
            "touches_border": i in on_border,
        })
    return rows


def code_dict(code: Code | None) -> dict[str, str] | None:
    return None if code is None else {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}
