"""XNAT export speed: a 300-slice 512 x 512 CT with a 10-segment stacked SEG to NIfTI, against its floor.

The case is XNAT-style (``SCANS/2/DICOM`` + catalog, ``ASSESSORS/SEG_.../SEG``): ten ellipsoids of
different sizes, their frames stacked segment after segment, only non-empty frames, per-frame
source references re-assigned (so every frame is placed by ImagePositionPatient). Measured, best of
two runs each (``--overwrite``):

* ``segnode xnat export`` (``node.xnat.export.run``): inventory, series read, frame placement,
  ``2.nii.gz`` and ten ``2_ON_<object>_FN_<seg>.nii.gz``;
* the floor, what any converter has to do: read the series (``read_series``) and write it as NIfTI.

    .venv/bin/python -m pytest tests/bench/bench_xnat.py -m bench -s

Goal (issue 7): the export in under 15 s. Nothing is asserted on time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo
from node.nifti import write_nifti
from node.volume import Geometry, Volume
from node.xnat.export import ExportOptions, object_file, run
from tests.xnat_fixtures import SegObject, write_scan, write_seg

pytestmark = pytest.mark.bench

SLICES, SIZE, SEGMENTS, ROUNDS = 300, 512, 10, 2


def _case(root: Path) -> tuple[Path, Volume, list[SegObject]]:
    rng = np.random.default_rng(11)
    array = rng.integers(-1000, 1500, size=(SLICES, SIZE, SIZE), dtype=np.int16)
    ct = Volume(array, Geometry((-200.0, -180.0, -300.0), (0.78, 0.78, 1.0)))
    case = root / "2072"
    scan = write_scan(case, "2", ct, SeriesInfo(uid_seed="bench-xnat", series_number=2))
    kk = np.arange(SLICES)[:, None, None]
    jj = np.arange(SIZE)[None, :, None]
    ii = np.arange(SIZE)[None, None, :]
    objects = []
    for n in range(SEGMENTS):
        ck, cj, ci = 40 + 22 * n, 120 + 27 * n, 380 - 25 * n
        rk, rj, ri = 20 + 6 * n, 25 + 4 * n, 30 + 3 * n  # 41..95 slices each
        mask = ((kk - ck) / rk) ** 2 + ((jj - cj) / rj) ** 2 + ((ii - ci) / ri) ** 2 <= 1.0
        objects.append(SegObject(f"object_{n + 1}", mask, (20 * n, 255 - 20 * n, 128)))
    write_seg(case, "SEG_20240118_235251_213_S2", scan, objects, name="bench")
    return case, ct, objects


def test_bench_xnat_export(tmp_path: Path) -> None:
    started = time.perf_counter()
    case, _ct, objects = _case(tmp_path / "in")
    frames = sum(int(o.mask.any(axis=(1, 2)).sum()) for o in objects)
    print(f"\ncase built in {time.perf_counter() - started:.1f} s: {SLICES} slices of {SIZE}x{SIZE}, "
          f"SEG with {SEGMENTS} segments stacked in {frames} frames")

    export, floor = [], []
    for n in range(ROUNDS):
        started = time.perf_counter()
        (report,) = run(case, tmp_path / "out", ExportOptions(overwrite=True))
        export.append(time.perf_counter() - started)
        started = time.perf_counter()
        write_nifti(read_series(case / "SCANS" / "2" / "DICOM"), tmp_path / "floor" / f"ct{n}.nii.gz")
        floor.append(time.perf_counter() - started)

    (seg,) = report["segmentations"].values()
    assert seg["error"] is None and seg["placement"]["method"] == "position"
    assert [o["voxels"] for o in seg["objects"]] == [int(o.mask.sum()) for o in objects]
    from node.nifti import read_nifti

    last = objects[-1]
    path = tmp_path / "out" / "2072" / "Curated_Output" / object_file("2", last.label, "SEG_20240118_235251_213_S2")
    assert np.array_equal(read_nifti(path).array.astype(bool), last.mask)

    best, best_floor = min(export), min(floor)
    print(f"segnode xnat export: {best:.2f} s (runs {', '.join(f'{t:.2f}' for t in export)}); "
          f"goal < 15 s")
    print(f"floor (read_series + series NIfTI): {best_floor:.2f} s; export / floor = {best / best_floor:.2f}")
