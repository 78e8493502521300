"""DICOM-SEG writer: segnode's fast path against highdicom's plain use, 117 classes on 512 x 512 x 200.

    .venv/bin/python -m pytest tests/bench/bench_seg.py -m bench -s

The label map: 117 ellipsoids (every TotalSegmentator ``total`` class present) of random size and place
on a 512 x 512 x 200 grid (0.78 x 0.78 x 1.5 mm), seed 0; the source: 200 CT headers (no pixel data)
on that grid. Each writer runs in a fresh process: ``write_seg(labels, datasets, path)`` BINARY, fast
path (``segnode``) or ``SegOptions(fast=False)``, which is ``highdicom.seg.Segmentation(datasets,
label_map, "BINARY", ...)`` then ``dcmwrite`` (``highdicom``). Per row: wall time of the call (the file
written), the process's peak RSS (``VmHWM``) and its growth during the call (VmHWM reset once the
inputs are loaded). The ratio is against highdicom in the same run. Goal (issue 5): <= 1.5 s and
<= 700 MB for BINARY with identical decoded labels; nothing is asserted on time.

Afterwards the two files are compared: the same attributes (volatile creation times aside), the same
pixel data bytes, and segnode's reader and highdicom's decoding give back the label map.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.unit.test_seg import differences

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]
SHAPE = (200, 512, 512)
SPACING = (0.78, 0.78, 1.5)
CLASSES = 117


def make_labels(shape: tuple[int, int, int] = SHAPE, n: int = CLASSES, seed: int = 0) -> np.ndarray:
    """``n`` ellipsoids, larger ones painted first so that every class keeps voxels."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    array = np.zeros(shape, np.uint8)
    specs = []
    for label in range(1, n + 1):
        radii = (rng.uniform(3, 40), rng.uniform(6, 70), rng.uniform(6, 70))
        centre = (rng.uniform(radii[0] / 2, nk - radii[0] / 2), rng.uniform(80, nj - 80),
                  rng.uniform(80, ni - 80))
        specs.append((float(np.prod(radii)), label, centre, radii))
    for _, label, (cz, cy, cx), (rz, ry, rx) in sorted(specs, reverse=True):
        box = tuple(slice(max(0, int(c - r)), min(s, int(c + r) + 1)) for c, r, s in
                    zip((cz, cy, cx), (rz, ry, rx), shape))
        z, y, x = np.ogrid[box]
        inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        array[box][inside] = label
    return array


def source_datasets(shape: tuple[int, int, int] = SHAPE):
    """The CT headers of the grid (deterministic UIDs), without pixel data, and the grid."""
    from node.dicom.writer import SeriesInfo, series_datasets
    from node.volume import Geometry, Volume

    geometry = Geometry(origin=(-200.0, -200.0, -300.0), spacing=SPACING)
    small = Volume(np.zeros((shape[0], 8, 8), np.int16), geometry)  # headers only: pixels are not referenced
    datasets = series_datasets(small, SeriesInfo(uid_seed="bench-seg"))
    for ds in datasets:
        del ds.PixelData
        ds.Rows, ds.Columns = shape[1], shape[2]
    return datasets, geometry


_MEASURE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    from tests.bench.bench_seg import source_datasets
    from node.classes import LabelVolume
    from node.dicom.seg import SegOptions, write_seg
    import highdicom, scipy.ndimage  # imported before the clock starts, as in a running node

    def peak_rss_mb():  # VmHWM; ru_maxrss would carry the parent's peak over fork + exec
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

    array = np.load(sys.argv[1])
    datasets, geometry = source_datasets(array.shape)
    labels = LabelVolume(array, geometry)
    options = SegOptions(fast=sys.argv[2] == "segnode", segmentation_type=sys.argv[5],
                         series_uid="1.2.826.0.1.3680043.8.498.1",
                         sop_uid="1.2.826.0.1.3680043.8.498.2", content_date="20260101",
                         content_time="120000")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to what is resident now: the inputs
        f.write("5")
    before = peak_rss_mb()
    start = time.perf_counter()
    write_seg(labels, datasets, sys.argv[3], options=options)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "rss_peak_mb": peak_rss_mb()}))
""")


def test_binary_seg_time_and_memory_117_classes(tmp_path: Path) -> None:
    array = make_labels()
    np.save(tmp_path / "labels.npy", array)
    present = len(np.unique(array)) - 1
    print(f"\nBINARY SEG of {present} classes on {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} "
          f"({array.size / 1e6:.0f} M voxels); one fresh process per row")
    print(f"{'writer':>10} {'time s':>8} {'x highdicom':>12} {'peak RSS MB':>12} {'growth MB':>10} "
          f"{'frames':>7} {'file MB':>8}")
    rows = {}
    for mode in ("highdicom", "segnode"):
        out = tmp_path / f"{mode}.dcm"
        result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "labels.npy"), mode, str(out),
                                 str(REPO), "BINARY"], cwd=REPO, check=True, capture_output=True, text=True)
        rows[mode] = r = json.loads(result.stdout.strip().splitlines()[-1])
        frames = int(pydicom.dcmread(out, stop_before_pixels=True).NumberOfFrames)
        print(f"{mode:>10} {r['seconds']:8.2f} {r['seconds'] / rows['highdicom']['seconds']:12.2f} "
              f"{r['rss_peak_mb']:12.0f} {r['rss_peak_mb'] - r['rss_before_mb']:10.0f} {frames:7d} "
              f"{out.stat().st_size / 1e6:8.1f}", flush=True)

    # Identical objects, identical decoded labels.
    fast, plain = pydicom.dcmread(tmp_path / "segnode.dcm"), pydicom.dcmread(tmp_path / "highdicom.dcm")
    assert differences(fast, plain) == []
    assert fast.PixelData == plain.PixelData
    from node.dicom.seg import read_seg

    datasets, geometry = source_datasets()
    from node.classes import LabelVolume
    from node.volume import SeriesIdentity

    identity = SeriesIdentity("", "", "", "CT", "", instance_uids=tuple(ds.SOPInstanceUID for ds in datasets))
    source = LabelVolume(np.zeros(SHAPE, np.uint8), geometry, source=identity)
    np.testing.assert_array_equal(read_seg(tmp_path / "segnode.dcm", source).array, array)
    import highdicom as hd

    numbers = hd.seg.segread(tmp_path / "segnode.dcm").get_pixels_by_source_instance(
        list(identity.instance_uids), combine_segments=True)
    np.testing.assert_array_equal(numbers, array)  # segment numbers are the label ids here (1..117)
    print(f"same attributes and pixel data; segnode's reader and highdicom decode the label map exactly; "
          f"ratio {rows['segnode']['seconds'] / rows['highdicom']['seconds']:.2f} in time, "
          f"{rows['segnode']['rss_peak_mb'] / rows['highdicom']['rss_peak_mb']:.2f} in peak RSS")

    # The same labels as LABELMAP (what the node's AUTO type writes for them), by size and time.
    out = tmp_path / "labelmap.dcm"
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "labels.npy"), "segnode", str(out),
                             str(REPO), "LABELMAP"], cwd=REPO, check=True, capture_output=True, text=True)
    r = json.loads(result.stdout.strip().splitlines()[-1])
    binary_mb, labelmap_mb = (tmp_path / "segnode.dcm").stat().st_size / 1e6, out.stat().st_size / 1e6
    print(f"LABELMAP: {r['seconds']:.2f} s, {labelmap_mb:.1f} MB = {labelmap_mb / binary_mb:.2f} x BINARY's "
          f"{binary_mb:.1f} MB")
    np.testing.assert_array_equal(read_seg(out, source).array, array)
