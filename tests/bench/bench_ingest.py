"""C-STORE ingest speed: segnode's listener against dcmtk storescp and Orthanc, in one run.

The same 500 CT slices of 512 x 512 (16-bit, 256 MiB) go from dcmtk ``storescu`` (one association,
``TCP_NODELAY=1``) to each receiver on loopback; the wall time of storescu is the measure. Each
receiver gets a fresh storage folder in each of three interleaved rounds (``os.sync()`` before each
run); the best round counts. segnode runs as its own
process (``segnode listen``), with fsync (as in production) and without (for reference). storescp
does not fsync; Orthanc syncs its storage area (``SyncStorageArea``, default true). "segnode UL
alone" is segnode's listener (its own Upper Layer and DIMSE code, in this process) with a receiver
that only counts: the floor that the network code sets.

    .venv/bin/python -m pytest tests/bench/bench_ingest.py -m bench -s

Goal (issue 3): segnode with fsync <= 2x storescp, faster than Orthanc. Nothing is asserted on time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from node.config import DicomSection
from node.dicom.writer import SeriesInfo, write_series
from node.ingest.instance import InstanceInfo
from node.ingest.scp import Listener
from node.ingest.spool import StoreResult
from node.volume import Geometry, Volume
from tests.servers import HOST, OrthancServer, StoreSCP, free_port, port_is_open, storescu

pytestmark = pytest.mark.bench

SLICES, SIZE, ROUNDS = 500, 512, 3
REPO = Path(__file__).resolve().parents[2]


def _series(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 1500, size=(SLICES, SIZE, SIZE), dtype=np.int16)
    write_series(Volume(array, Geometry((0.0, 0.0, 0.0), (0.7, 0.7, 1.0))), folder, SeriesInfo(uid_seed="bench"))
    return folder


def _timed_store(folder: Path, port: int, aet: str) -> float:
    started = time.perf_counter()
    storescu([folder], HOST, port, aet, timeout=600)
    return time.perf_counter() - started


class _Segnode:
    """``segnode listen`` as a child process on a free port, stopped by its PID."""

    def __init__(self, data: Path, fsync: bool) -> None:
        self.data, self.port = data, free_port()
        env = {**os.environ, "SEGNODE_NODE__DATA_DIR": str(data), "SEGNODE_DICOM__HOST": HOST,
               "SEGNODE_INGEST__FSYNC": str(fsync).lower(), "SEGNODE_NODE__LOG_LEVEL": "WARNING",
               "PYTHONPATH": str(REPO)}  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "listen", "--port", str(self.port), "--aet", "SEGNODE"],
            cwd=data.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not port_is_open(self.port):
            assert self.process.poll() is None and time.monotonic() < deadline, "segnode listen did not start"
            time.sleep(0.05)

    def received(self) -> int:
        return sum(1 for _ in (self.data / "spool").rglob("*.dcm"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class _CountingReceiver:
    """Stands in for the receiver: counts C-STORE data sets, writes nothing."""

    def __init__(self) -> None:
        self.count = 0

    def new_session(self, kind: str = "session") -> str:
        return kind

    def store(self, dataset, sender, **kwargs) -> StoreResult:
        self.count += 1
        return StoreResult(0x0000, "", _INFO)

    def reserve(self, study_uid: str, series_uid: str) -> None:
        return None

    def end_session(self, session: str, *, clean: bool = True) -> list:
        return []


_INFO = InstanceInfo("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")


class _ULAlone:
    """segnode's listener (its own Upper Layer and DIMSE code) with a receiver that only counts: the
    floor that the network code sets, with no spool, index or completion behind it."""

    def __init__(self) -> None:
        self.receiver = _CountingReceiver()
        self.listener = Listener(DicomSection(host=HOST), self.receiver, port=0).start()  # type: ignore[arg-type]
        self.port = self.listener.port

    @property
    def count(self) -> int:
        return self.receiver.count

    def stop(self) -> None:
        self.listener.stop()


def _run(start, received, work: Path, folder: Path) -> float:
    os.sync()  # every receiver starts with no dirty pages of the previous one to write back
    server, port, aet = start(work)
    try:
        elapsed = _timed_store(folder, port, aet)
        assert received(server) == SLICES, f"{work.name} stored {received(server)} of {SLICES}"
    finally:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return elapsed


def test_ingest_speed(tmp_path: Path) -> None:
    folder = _series(tmp_path / "series")
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20

    def segnode(fsync: bool):
        def start(work: Path):
            work.mkdir()
            node = _Segnode(work / "data", fsync)
            return node, node.port, "SEGNODE"

        return start

    def storescp(work: Path):
        server = StoreSCP(workdir=work).start()
        return server, server.port, server.aet

    def floor(work: Path):
        server = _ULAlone()
        return server, server.port, "SEGNODE"

    def orthanc(work: Path):
        server = OrthancServer(workdir=work, extra_config={"Plugins": []}).start()
        return server, server.dicom_port, server.aet

    receivers = {
        "segnode (fsync)": (segnode(True), lambda s: s.received()),
        "segnode (no fsync)": (segnode(False), lambda s: s.received()),
        "dcmtk storescp": (storescp, lambda s: len(s.received_files())),
        "Orthanc": (orthanc, lambda s: s.instance_count()),
        "segnode UL alone": (floor, lambda s: s.count),
    }
    results: dict[str, list[float]] = {name: [] for name in receivers}
    for n in range(ROUNDS):  # interleaved, so a slow moment of the machine hits every receiver alike
        for name, (start, received) in receivers.items():
            results[name].append(_run(start, received, tmp_path / f"{name.split()[0]}-{n}", folder))
    best = {name: min(times) for name, times in results.items()}
    print(f"\n{SLICES} slices of {SIZE}x{SIZE} ({size_mb:.0f} MiB) with storescu, best of {ROUNDS}:")
    for name, times in results.items():
        rounds = ", ".join(f"{t:.2f}" for t in times)
        print(f"  {name:<20} {best[name]:6.2f} s  {SLICES / best[name]:6.0f} inst/s  (rounds: {rounds})")
    ours = best["segnode (fsync)"]
    print(f"  segnode (fsync) / storescp: {ours / best['dcmtk storescp']:.2f}x  (goal <= 2)")
    print(f"  segnode (fsync) / Orthanc:  {ours / best['Orthanc']:.2f}x  (goal < 1)")
    print(f"  segnode (no fsync) / storescp: {best['segnode (no fsync)'] / best['dcmtk storescp']:.2f}x")
    print(f"  segnode UL alone / storescp: {best['segnode UL alone'] / best['dcmtk storescp']:.2f}x  (the floor)")
    shutil.rmtree(folder, ignore_errors=True)
