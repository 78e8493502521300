"""The cost of being remote: one 512x512x300 phantom CT (about 158 MB of DICOM) run by a remote worker
(``segnode worker --node``: the series fetched over HTTP as a tar stream, the results uploaded with
their SHA-256) and by a local worker on the same machine (``segnode worker`` reading the node's spool
folder, writing the node's results folder), in one run, against the same ``segnode serve`` (Redis
queue, threshold engine, SEG output). Both workers are separate processes started the same way.

Printed: each job's stage timings, the remote worker's fetch and upload seconds, the wall time of
each job (started -> finished, from the job record) and their difference, and each worker process's
peak RSS (VmHWM) next to the size of the series' pixel data: a worker holds one series in memory
(the Volume), never the DICOM files too.

    .venv/bin/python -m pytest tests/bench/bench_remote.py -m bench -s

Goal (issue 14): remote adds at most 1.5 s per job on loopback. Nothing is asserted on time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.phantom import PhantomSpec, write_phantom
from tests.integration.test_remote_workers import WORKER_TOKEN, copies, node_for
from tests.servers import REPO, RedisServer, SegnodeWorker, _die_with_parent, storescu

pytestmark = pytest.mark.bench

SPEC = PhantomSpec(size=(512, 512, 300), spacing=(0.7, 0.7, 1.0))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(node, folder: Path, series_uid: str) -> dict:
    storescu([folder], "127.0.0.1", node.dicom_port, "SEGNODE", timeout=600)
    return node.wait_job(lambda j: j["series_uid"] == series_uid and j["state"] in ("done", "failed"), timeout=600)


def test_bench_remote_worker_against_a_local_worker(tmp_path: Path, redis_server: RedisServer) -> None:
    t0 = time.perf_counter()
    source = write_phantom(SPEC, tmp_path / "phantom")["dicom"]
    size = sum(p.stat().st_size for p in source.iterdir())
    print(f"\nphantom {SPEC.size}: {len(list(source.iterdir()))} files, {size / 1e6:.1f} MB, "
          f"written in {time.perf_counter() - t0:.1f} s")
    (remote_series, remote_folder), (local_series, local_folder) = copies(source, tmp_path / "series", 2)
    node = node_for(tmp_path, redis_server, lease_s=120)
    node.config.write_text(node.config.read_text().replace('destinations = ["out"]', "destinations = []"))
    node.start()
    local = None
    try:
        remote = SegnodeWorker(tmp_path / "remote", node_url=node.url, token=WORKER_TOKEN,
                               redis_url=redis_server.url).start().wait_ready()
        remote_job = run_one(node, remote_folder, remote_series)
        remote_rss = peak_rss_mb(remote.pid)
        remote.stop()

        with open(tmp_path / "local-worker.log", "wb") as log:
            local = subprocess.Popen([sys.executable, "-m", "node", "--config", str(node.config), "worker"],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                     env={**os.environ, "SEGNODE_QUEUE__WORKERS": "1"})
        deadline = time.monotonic() + 60
        while " thread(s) on the Redis queue" not in (tmp_path / "local-worker.log").read_text():
            assert local.poll() is None and time.monotonic() < deadline, (tmp_path / "local-worker.log").read_text()
            time.sleep(0.05)
        local_job = run_one(node, local_folder, local_series)
        local_rss = peak_rss_mb(local.pid)
    finally:
        if local is not None and local.poll() is None:
            os.kill(local.pid, signal.SIGTERM)
            local.wait(30)
        node.stop()

    assert (remote_job["state"], local_job["state"]) == ("done", "done"), (remote_job["error"], local_job["error"])
    wall = {name: job["finished"] - job["started"] for name, job in (("remote", remote_job), ("local", local_job))}
    fetch, upload = remote_job["timings"]["fetch"], remote_job["timings"]["upload"]
    for name, job in (("remote", remote_job), ("local", local_job)):
        stages = ", ".join(f"{k} {v:.2f}" for k, v in job["timings"].items())
        print(f"{name:6s} job {wall[name]:6.2f} s  ({stages})")
    print(f"remote fetch {fetch:.2f} s ({size / 1e6 / fetch:.0f} MB/s) + upload {upload:.2f} s = "
          f"{fetch + upload:.2f} s per job (goal <= 1.5 s; a local worker: 0)")
    print(f"job wall time, remote - local: {wall['remote'] - wall['local']:+.2f} s")
    pixels = SPEC.size[0] * SPEC.size[1] * SPEC.size[2] * 2 / 2**20
    print(f"peak RSS: remote worker {remote_rss:.0f} MiB, local worker {local_rss:.0f} MiB "
          f"(the series' pixels: {pixels:.0f} MiB as int16)")
