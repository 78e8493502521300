"""Remote workers with no shared folder: a real node (``segnode serve``), real Redis and real
``segnode worker --node`` processes on 127.0.0.1, each with its own data folder; series sent with
dcmtk's storescu; the SEG delivered to a folder destination.

The series and results travel over the node's ``/api/worker`` routes; a worker killed mid-job loses its
lease and the job finishes once on the other worker; a connection cut during a fetch and during an
upload costs a retry, not a second run; a GPU job waits in its own queue while only CPU workers exist.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.config import Settings
from node.jobs.remote import NodeClient, NodeUnreachable
from node.phantom import TINY, write_phantom
from tests.servers import (
    RedisServer, SegnodeServe, SegnodeWorker, free_port, self_signed_cert, storescu, wait_for,
)

pytestmark = pytest.mark.integration

TOKEN, WORKER_TOKEN = "user-token", "worker-token"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom(TINY, tmp_path_factory.mktemp("phantom"))["dicom"]


def copies(source: Path, out: Path, n: int) -> list[tuple[str, Path]]:
    """``n`` copies of a series, each with its own study, series and SOP instance UIDs."""
    made = []
    for index in range(n):
        folder = out / f"s{index}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for path in sorted(source.iterdir()):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
        made.append((series, folder))
    return made


def node_for(tmp_path: Path, redis: RedisServer, *, lease_s: float, device: str = "",
             tls: tuple[Path, Path] | None = None) -> SegnodeServe:
    (tmp_path / "node").mkdir(exist_ok=True)
    pipeline = f'device = "{device}"\n' if device else ""
    https = f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n' if tls else ""
    node = SegnodeServe(
        tmp_path / "node", token=TOKEN,
        rules=f'[[rule]]\nname = "ct"\ndestinations = ["out"]\n[rule.pipeline]\nengine = "threshold"\n{pipeline}',
        http=f'worker_tokens = {{ w = "{WORKER_TOKEN}" }}\n{https}',
        extra=f'[queue]\nbackend = "redis"\nredis_url = "{redis.url}"\nworkers = 0\nstale_after_s = {lease_s}\n'
              f'[[destinations]]\nname = "out"\nkind = "folder"\npath = "{tmp_path / "out"}"\n',
    )
    node.ca_bundle = tls[0] if tls else None
    return node


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., SegnodeServe]]:
    """Starts a node (and, through ``worker``, workers); stops them all by PID."""
    started: list[SegnodeServe | SegnodeWorker] = []

    def start_node(**kwargs: object) -> SegnodeServe:
        node = node_for(tmp_path, redis_server, **kwargs)  # type: ignore[arg-type]
        started.append(node)
        return node.start()

    def worker(name: str, url: str, **kwargs: object) -> SegnodeWorker:
        w = SegnodeWorker(tmp_path / name, node_url=url, token=WORKER_TOKEN, redis_url=redis_server.url,
                          **kwargs)  # type: ignore[arg-type]
        started.append(w)
        return w.start()

    start_node.worker = worker  # type: ignore[attr-defined]
    try:
        yield start_node
    finally:
        for process in reversed(started):  # kill -9: nothing here tests a stop (tests/integration/test_serve.py does)
            process.stop(signal.SIGKILL)


def segs(out: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(out.rglob("*.dcm"))]


def delivered_once(job: dict) -> bool:
    out = job["destinations"].get("out", {})
    return out.get("state") == "delivered"


def assert_no_node_path(worker: SegnodeWorker, node: SegnodeServe) -> None:
    """Nothing the worker wrote or logged names a path of the node's file system."""
    needle = str(node.data_dir).encode()
    for path in worker.workdir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path


def test_ten_series_two_remote_workers_each_once(cluster, tmp_path: Path, phantom: Path) -> None:
    node = cluster(lease_s=30)
    workers = [cluster.worker(f"w{i}", node.url) for i in range(2)]
    for w in workers:
        w.wait_ready()
    series = copies(phantom, tmp_path / "series", 10)

    storescu([folder for _, folder in series], "127.0.0.1", node.dicom_port, "SEGNODE")

    jobs = wait_for(lambda: (lambda js: len(js) == 10 and all(j["state"] == "done" and delivered_once(j)
                                                                  for j in js) and js)(node.api("/api/jobs")),
                      90, "ten jobs done and delivered",
                      lambda: "\n".join(f"{j['state']} {j['destinations']}" for j in node.api("/api/jobs"))
                      + "\n" + node.log(tail=4000))
    assert sorted(j["series_uid"] for j in jobs) == sorted(uid for uid, _ in series)
    for job in jobs:
        assert (job["attempts"], job["error"]) == (1, None)
        assert {k: job["destinations"]["out"][k] for k in ("instances", "delivered", "attempts")} == {
            "instances": 1, "delivered": 1, "attempts": 1}
        detail = node.api(f"/api/jobs/{job['id']}")
        assert [e["event"] for e in detail["history"]] == ["queued", "running", "done"]
        assert Path(detail["results"]).parent.parent == node.data_dir / "results"  # uploaded to the node
        assert detail["timings"]["fetch"] > 0 and detail["timings"]["upload"] > 0
        pid = int(detail["worker"].split(":")[1])
        assert pid in {w.pid for w in workers}
    delivered = segs(tmp_path / "out")
    assert sorted(str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in delivered) == sorted(
        uid for uid, _ in series)
    assert len({str(s.SOPInstanceUID) for s in delivered}) == 10
    for w in workers:  # inputs and results are removed after each job (results once "done" is answered)
        wait_for(lambda: not any(p.is_file() for p in w.data_dir.rglob("*")), 10, "worker folders emptied")
        assert_no_node_path(w, node)
    dashboard = httpx.get(f"{node.url}/api/dashboard", headers={"Authorization": f"Bearer {TOKEN}"},
                          trust_env=False).json()
    seen = {w["id"].split(":")[1]: w for w in dashboard["workers"]}
    assert set(seen) == {str(w.pid) for w in workers}
    assert sum(w["jobs"].get("done", 0) for w in seen.values()) == 10
    assert all(w["device"] == "cpu" and w["name"] == "w" and w["job"] is None for w in seen.values())
    metrics = httpx.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False).text
    assert 'segnode_worker_transfer_seconds_count{direction="fetch"} 10.0' in metrics
    assert 'segnode_worker_transfer_seconds_count{direction="upload"} 10.0' in metrics
    assert 'segnode_worker_jobs_total{state="done",worker="w"} 10.0' in metrics


def held_run(cluster, tmp_path: Path, phantom: Path) -> tuple[SegnodeServe, Path, str, str, SegnodeWorker,
                                                               SegnodeWorker]:
    """A node with a 2 s lease, two workers and one series whose run waits as its segment stage starts
    until the file ``hold`` exists: (node, hold, series UID, job id, the worker running it, the other)."""
    node = cluster(lease_s=2)
    hold = tmp_path / "release"
    workers = [cluster.worker(f"w{i}", node.url, env={"SEGNODE_TEST_HOLD_SEGMENT": str(hold)}) for i in range(2)]
    for w in workers:
        w.wait_ready()
    [(series_uid, folder)] = copies(phantom, tmp_path / "series", 1)
    storescu([folder], "127.0.0.1", node.dicom_port, "SEGNODE")
    marker = wait_for(lambda: next(iter(tmp_path.glob("release.*")), None), 30, "a run in its segment stage")
    running = next(w for w in workers if marker.name == f"release.{w.pid}")
    other = next(w for w in workers if w is not running)
    return node, hold, series_uid, marker.read_text(), running, other


def test_a_worker_killed_mid_job_loses_its_lease_and_the_other_finishes_it_once(
        cluster, tmp_path: Path, phantom: Path) -> None:
    node, hold, series_uid, job_id, victim, other = held_run(cluster, tmp_path, phantom)
    assert node.api(f"/api/jobs/{job_id}")["stage"] == "segment"  # fetched, inferring
    assert list((victim.data_dir / "inputs" / job_id).iterdir())  # the series it fetched

    victim.stop(signal.SIGKILL)
    hold.touch()

    job = node.wait_job(lambda j: j["id"] == job_id and j["state"] == "done" and delivered_once(j), timeout=60)
    events = [e["event"] for e in job["history"]]
    assert events == ["queued", "running", "requeued", "running", "done"]
    assert job["history"][2]["detail"] == "the worker's lease expired (no heartbeat for 2 s)"
    assert job["attempts"] == 2 and int(job["worker"].split(":")[1]) == other.pid
    assert job["destinations"]["out"]["delivered"] == 1 and job["destinations"]["out"]["attempts"] == 1
    assert [str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in segs(tmp_path / "out")] == [series_uid]

    victim.start().wait_ready()  # the killed worker, restarted: it holds nothing, delivers nothing
    assert not (victim.data_dir / "inputs").exists() and not (victim.data_dir / "results").exists()
    wait_for(lambda: len([w for w in node.api("/api/dashboard")["workers"]
                            if w["id"].split(":")[1] == str(victim.pid)]) == 1, 10, "the restarted worker says hello")
    time.sleep(2)  # a lease: what it would deliver would be there by now
    after = node.api(f"/api/jobs/{job_id}")
    assert [e["event"] for e in after["history"]] == events
    assert after["destinations"]["out"]["attempts"] == 1
    assert len(segs(tmp_path / "out")) == 1
    assert job_id not in (victim.workdir / "worker-2.log").read_text()  # the new process never touched it


def test_a_silent_worker_loses_its_lease_and_its_late_run_changes_nothing(
        cluster, tmp_path: Path, phantom: Path) -> None:
    """SIGSTOP (alive, silent): the lease expires, the other worker finishes the job; SIGCONT: the late
    run is told it lost the job (409), drops it and delivers nothing."""
    node, hold, series_uid, job_id, late, _ = held_run(cluster, tmp_path, phantom)
    late.process.send_signal(signal.SIGSTOP)
    hold.touch()
    job = node.wait_job(lambda j: j["id"] == job_id and j["state"] == "done" and delivered_once(j), timeout=60)
    events = [e["event"] for e in job["history"]]
    assert events == ["queued", "running", "requeued", "running", "done"]
    assert job["history"][2]["detail"] == "the worker's lease expired (no heartbeat for 2 s)"

    late.process.send_signal(signal.SIGCONT)
    wait_for(lambda: "lost the job" in late.log() or "taken from it meanwhile" in late.log(), 30,
               "the late run told it lost the job")
    wait_for(lambda: not any(p.is_file() for p in late.data_dir.rglob("*")), 10, "the late run's files removed")
    time.sleep(1)
    after = node.api(f"/api/jobs/{job_id}")
    assert [e["event"] for e in after["history"]] == events and after["results"] == job["results"]
    assert after["destinations"]["out"]["attempts"] == 1 and len(segs(tmp_path / "out")) == 1
    assert " 409" in node.log() and f"/api/worker/jobs/{job_id}/" in node.log()


class CuttingProxy:
    """A TCP forwarder between workers and the node that cuts, once each, the connection of a series
    fetch (after ``fetch_bytes`` of the answer) and of a result upload (in the middle of its body),
    and then refuses every connection for ``down_s`` seconds: the node's HTTP gone for a while."""

    def __init__(self, target_port: int, *, fetch_bytes: int, down_s: float) -> None:
        self.target_port, self.fetch_bytes, self.down_s = target_port, fetch_bytes, down_s
        self.port = free_port()
        self.cuts: list[str] = []
        self.refused = 0
        self._down_until = 0.0
        self._armed = {"fetch", "upload"}
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # a reset: nobody there
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            conn = {"client": client, "upstream": upstream, "fetching": False, "sent": 0, "put": None}
            threading.Thread(target=self._up, args=(conn,), daemon=True).start()
            threading.Thread(target=self._down, args=(conn,), daemon=True).start()

    def _cut(self, conn: dict, what: str) -> None:
        with self._lock:
            self.cuts.append(what)
            self._down_until = time.monotonic() + self.down_s
        for key in ("client", "upstream"):
            try:
                conn[key].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn[key].close()

    def _up(self, conn: dict) -> None:
        while True:
            try:
                data = conn["client"].recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            if b"GET /api/worker/jobs/" in data and b"/series?" in data:
                conn["fetching"] = "fetch" in self._armed
            if conn["put"] is None and b"PUT /api/worker/jobs/" in data and "upload" in self._armed:
                conn["put"] = b""
            if conn["put"] is not None:
                conn["put"] += data
                head, sep, body = conn["put"].partition(b"\r\n\r\n")
                if sep and len(body) >= 64:  # headers and some of the body are through: cut
                    self._armed.discard("upload")
                    try:
                        conn["upstream"].sendall(head + sep + body[: len(body) // 2])
                    except OSError:
                        pass
                    self._cut(conn, "upload")
                    return
                continue
            try:
                conn["upstream"].sendall(data)
            except OSError:
                return

    def _down(self, conn: dict) -> None:
        while True:
            try:
                data = conn["upstream"].recv(1 << 16)
            except OSError:
                return
            if not data:
                conn["client"].close()
                return
            if conn["fetching"]:
                conn["sent"] += len(data)
                if conn["sent"] > self.fetch_bytes and "fetch" in self._armed:
                    self._armed.discard("fetch")
                    try:
                        conn["client"].sendall(data[: len(data) // 2])
                    except OSError:
                        pass
                    self._cut(conn, "fetch")
                    return
            try:
                conn["client"].sendall(data)
            except OSError:
                return


def test_node_unreachable_during_fetch_and_upload_the_job_still_completes_once(
        cluster, tmp_path: Path, phantom: Path) -> None:
    node = cluster(lease_s=8)
    proxy = CuttingProxy(node.http_port, fetch_bytes=100_000, down_s=2.0)
    try:
        worker = cluster.worker("w0", proxy.url)
        worker.wait_ready()
        [(series_uid, folder)] = copies(phantom, tmp_path / "series", 1)

        storescu([folder], "127.0.0.1", node.dicom_port, "SEGNODE")

        job = node.wait_job(lambda j: j["state"] == "done" and delivered_once(j), timeout=60)
    finally:
        proxy.close()
    assert proxy.cuts == ["fetch", "upload"] and proxy.refused >= 1
    assert [e["event"] for e in job["history"]] == ["queued", "running", "done"] and job["attempts"] == 1
    assert job["destinations"]["out"]["delivered"] == 1 and job["destinations"]["out"]["attempts"] == 1
    assert [str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in segs(tmp_path / "out")] == [series_uid]
    log = worker.log()
    assert "fetch cut off" in log and "upload" in log and "node unreachable" in log
    assert "fetched 40 instance(s)" in log


def test_a_gpu_job_waits_for_a_gpu_worker(cluster, tmp_path: Path, phantom: Path, redis_server) -> None:
    from huey import RedisHuey

    node = cluster(lease_s=3, device="gpu")
    cpu = cluster.worker("cpu", node.url)
    cpu.wait_ready()
    [(series_uid, folder)] = copies(phantom, tmp_path / "series", 1)

    storescu([folder], "127.0.0.1", node.dicom_port, "SEGNODE")
    job = node.wait_job(lambda j: j["series_uid"] == series_uid, timeout=30)
    gpu_queue = RedisHuey(name="segnode-gpu", url=redis_server.url)
    wait_for(lambda: gpu_queue.pending_count() == 1, 10, "the job in the GPU queue")
    time.sleep(3)  # a lease: the CPU worker has said hello and waited on its queue meanwhile
    job = node.api(f"/api/jobs/{job['id']}")
    assert (job["state"], job["attempts"], job["waiting"]) == ("queued", 0, "waiting for a GPU worker")
    assert gpu_queue.pending_count() == 1
    row = next(r for r in node.api("/api/dashboard")["jobs"] if r["id"] == job["id"])
    assert row["waiting"] == "waiting for a GPU worker"
    assert [w["device"] for w in node.api("/api/dashboard")["workers"]] == ["cpu"]

    gpu = cluster.worker("gpu", node.url, device="gpu:0")
    done = node.wait_job(lambda j: j["id"] == job["id"] and j["state"] == "done" and delivered_once(j), timeout=60)
    assert int(done["worker"].split(":")[1]) == gpu.pid
    assert "waiting" not in done


def test_worker_and_node_over_tls_with_a_self_signed_certificate(cluster, tmp_path: Path, phantom: Path) -> None:
    """The node serves HTTPS itself ([http] tls_cert/tls_key); the worker verifies it with [worker]
    ca_bundle, and refuses it without (the system's CAs do not know a self-signed certificate)."""
    cert, key = self_signed_cert(tmp_path)
    node = cluster(lease_s=30, tls=(cert, key))
    assert node.url.startswith("https://")
    worker = cluster.worker("w0", node.url, extra=f'[worker]\nca_bundle = "{cert}"\n')
    untrusting = NodeClient(Settings(worker={"node_url": node.url, "token": WORKER_TOKEN}), "h:1:a")
    with pytest.raises(NodeUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        untrusting.hello()
    worker.wait_ready()
    [(series_uid, folder)] = copies(phantom, tmp_path / "series", 1)

    storescu([folder], "127.0.0.1", node.dicom_port, "SEGNODE")

    job = node.wait_job(lambda j: j["state"] == "done" and delivered_once(j), timeout=60)
    assert int(job["worker"].split(":")[1]) == worker.pid and job["attempts"] == 1
    assert [str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in segs(tmp_path / "out")] == [series_uid]
    with pytest.raises(httpx.RemoteProtocolError):  # no plain HTTP beside it
        httpx.get(f"http://127.0.0.1:{node.http_port}/healthz", trust_env=False)
