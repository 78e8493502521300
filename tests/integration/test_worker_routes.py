"""The node's routes for remote workers over real HTTP (uvicorn on loopback, SQLite job store): roles,
who holds a job, the series stream, idempotent uploads with checksums, and a late worker refused."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.config import Settings
from node.jobs import open_store
from node.jobs.store import Job, JobStore, new_job_id
from node.jobs.worker import JobRunner
from node.jobs.workers import WorkerRegistry
from node.phantom import TINY, write_phantom
from node.web.app import AppContext, create_app
from tests.servers import serve_in_thread

pytestmark = pytest.mark.integration

USER, W1, W2 = "user-token", "worker-one", "worker-two"


class Env:
    def __init__(self, url: str, store: JobStore, folder: Path, data: Path, calls: dict[str, list]) -> None:
        self.url, self.store, self.folder, self.data, self.calls = url, store, folder, data, calls

    def request(self, method: str, path: str, token: str | None = W1, **kwargs) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, self.url + path, headers=headers, trust_env=False, timeout=10, **kwargs)

    def job(self, device: str | None = None) -> Job:
        job = Job(id=new_job_id(), key=new_job_id(), series_uid="1.2.3", study_uid="1.2", generation=1,
                  folder=str(self.folder), instance_count=3, rule="ct",
                  pipeline={"engine": "threshold", **({"device": device} if device else {})},
                  pipeline_version="v", engine="threshold", created=time.time())
        return self.store.submit(job)[0]

    def claim(self, job: Job, token: str = W1, device: str = "cpu") -> str:
        response = self.request("POST", f"/api/worker/jobs/{job.id}/claim", token,
                                json={"worker": f"host:{hash(token) % 1000}:abc", "device": device})
        assert response.status_code == 200, response.text
        return response.json()["run_id"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom(TINY, tmp_path_factory.mktemp("phantom"))["dicom"]


@pytest.fixture
def env(tmp_path: Path, phantom: Path) -> Iterator[Env]:
    folder = tmp_path / "spool" / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    for path in sorted(phantom.iterdir())[:3]:
        shutil.copy(path, folder / f"{path.stem}.dcm")
    settings = Settings(node={"data_dir": tmp_path / "data"}, http={"tokens": {"u": USER},
                        "worker_tokens": {"one": W1, "two": W2}}, queue={"stale_after_s": 30})
    store = open_store(settings)
    calls: dict[str, list] = {"output": [], "done": [], "enqueue": []}
    runner = JobRunner(store, settings, enqueue=lambda job_id, delay: calls["enqueue"].append(job_id),
                       hooks=(lambda job, outdir: calls["done"].append((job.id, outdir)),),
                       on_output=(lambda job, name, path: calls["output"].append((job.id, name, path.read_bytes())),))
    app = create_app(AppContext(settings, store, runner.enqueue or (lambda *_: None), runner=runner,
                                workers=WorkerRegistry()))
    with serve_in_thread(app) as url:
        yield Env(url, store, folder, tmp_path / "data", calls)
    store.close()


def digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def worker_routes(job_id: str) -> list[tuple[str, str]]:
    return [("POST", "/api/worker/hello"), ("POST", f"/api/worker/jobs/{job_id}/claim"),
            ("POST", f"/api/worker/jobs/{job_id}/heartbeat"), ("GET", f"/api/worker/jobs/{job_id}/series"),
            ("PUT", f"/api/worker/jobs/{job_id}/results/seg.dcm"), ("POST", f"/api/worker/jobs/{job_id}/done"),
            ("POST", f"/api/worker/jobs/{job_id}/fail")]


def test_every_worker_route_needs_a_worker_token_and_workers_get_nothing_else(env: Env) -> None:
    job = env.job()
    for method, path in worker_routes(job.id):
        assert env.request(method, path, None).status_code == 401, path
        assert env.request(method, path, "wrong").status_code == 401, path
        refused = env.request(method, path, USER)
        assert (refused.status_code, refused.json()) == (403, {"error": "/api/worker/ routes need a worker token"})
    for path in ("/api/jobs", f"/api/jobs/{job.id}", "/metrics", "/api/dashboard", "/api/series"):
        refused = env.request("GET", path, W1)
        assert (refused.status_code, refused.json()) == (403, {"error": "worker tokens may only use /api/worker/ routes"})
    assert env.request("POST", f"/api/jobs/{job.id}/retry", W1).status_code == 403
    assert env.request("GET", "/api/jobs", USER).status_code == 200
    assert env.store.get(job.id).state == "queued"  # nothing above touched it


def test_a_worker_fetches_only_what_it_holds_as_a_tar_stream(env: Env) -> None:
    job = env.job()
    claimed = env.request("POST", f"/api/worker/jobs/{job.id}/claim", json={"worker": "h:1:a", "device": "cpu"})
    assert claimed.status_code == 200
    body = claimed.json()
    run_id = body["run_id"]
    assert body["lease_s"] == 30 and body["job"]["id"] == job.id and body["job"]["run_id"] == run_id
    assert "folder" not in body["job"] and "results" not in body["job"]
    assert str(env.folder.parent.parent) not in claimed.text  # no path of the node
    assert env.store.get(job.id).worker == "h:1:a:one"

    again = env.request("POST", f"/api/worker/jobs/{job.id}/claim", W2, json={"worker": "h:2:b"})
    assert (again.status_code, again.json()["state"]) == (409, "running")
    for token, run in ((W2, run_id), (W2, "0" * 12), (W1, "0" * 12), (W1, "")):
        refused = env.request("GET", f"/api/worker/jobs/{job.id}/series", token, params={"run_id": run})
        assert refused.status_code == 409, (token, run)
    assert env.request("GET", f"/api/worker/jobs/{'f' * 16}/series", params={"run_id": run_id}).status_code == 404

    fetched = env.request("GET", f"/api/worker/jobs/{job.id}/series", params={"run_id": run_id})
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "application/x-tar"
    assert int(fetched.headers["content-length"]) == len(fetched.content)
    files = sorted(env.folder.iterdir())
    assert (fetched.headers["x-segnode-files"], fetched.headers["x-segnode-bytes"]) == (
        "3", str(sum(p.stat().st_size for p in files)))
    with tarfile.open(fileobj=io.BytesIO(fetched.content), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [p.name for p in files]
        assert [tar.extractfile(m).read() for m in members] == [p.read_bytes() for p in files]


def test_uploads_are_checked_idempotent_and_a_seg_goes_out_at_once(env: Env) -> None:
    job = env.job()
    run_id = env.claim(job)
    url = f"/api/worker/jobs/{job.id}/results"
    seg, report = b"DICM-seg-bytes" * 100, b'{"ok": true}'
    assert env.request("PUT", f"{url}/seg.dcm", params={"run_id": run_id}, content=seg).status_code == 400
    bad = env.request("PUT", f"{url}/seg.dcm", params={"run_id": run_id}, content=seg,
                      headers={"content-digest": digest(b"other")})
    assert (bad.status_code, bad.json()["error"]) == (422, "the body does not match its Content-Digest")
    for name in (".hidden", "a/.x", "a//b"):
        assert env.request("PUT", f"{url}/{name}", params={"run_id": run_id}, content=seg,
                           headers={"content-digest": digest(seg)}).status_code == 400, name
    headers = {"content-digest": digest(seg), "x-segnode-output": "seg"}
    first = env.request("PUT", f"{url}/seg.dcm", params={"run_id": run_id}, content=seg, headers=headers)
    second = env.request("PUT", f"{url}/seg.dcm", params={"run_id": run_id}, content=seg, headers=headers)
    assert (first.status_code, first.json(), second.status_code, second.json()) == (
        201, {"path": "seg.dcm", "stored": True}, 200, {"path": "seg.dcm", "stored": False})
    assert env.calls["output"] == [(job.id, "seg", seg)] * 2  # the outbox is idempotent per SOP instance
    assert env.request("PUT", f"{url}/meshes/liver.stl", params={"run_id": run_id}, content=report,
                       headers={"content-digest": digest(report)}).status_code == 201
    run_dir = env.data / "results" / job.id / run_id
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == ["meshes", "meshes/liver.stl",
                                                                                     "seg.dcm"]

    files = {"seg.dcm": len(seg), "meshes/liver.stl": len(report), "report.json": 12}
    missing = env.request("POST", f"/api/worker/jobs/{job.id}/done", json={"run_id": run_id, "files": files})
    assert (missing.status_code, missing.json()["missing"]) == (422, ["report.json"])
    del files["report.json"]
    done = env.request("POST", f"/api/worker/jobs/{job.id}/done", json={
        "run_id": run_id, "worker": "h:1:a", "files": files, "timings": {"fetch": 0.5, "segment": 1.0, "upload": 0.2}})
    assert (done.status_code, done.json()) == (200, {"state": "done"})
    stored = env.store.get(job.id)
    assert (stored.state, stored.results, stored.timings) == (
        "done", str(run_dir), {"fetch": 0.5, "segment": 1.0, "upload": 0.2})
    assert env.calls["done"] == [(job.id, run_dir)]
    again = env.request("POST", f"/api/worker/jobs/{job.id}/done", json={"run_id": run_id, "files": files})
    assert again.status_code == 409 and env.calls["done"] == [(job.id, run_dir)]


def test_a_late_worker_is_refused_everything_and_changes_nothing(env: Env) -> None:
    job = env.job()
    run_id = env.claim(job)
    assert env.request("POST", f"/api/worker/jobs/{job.id}/heartbeat", json={"run_id": run_id}).status_code == 200
    assert env.store.orphaned(job.id, "lease expired").state == "queued"  # what the node's watcher does
    newer = env.claim(job, W2)
    seg = b"late"
    for method, path, kwargs in (
            ("POST", "heartbeat", {"json": {"run_id": run_id}}),
            ("GET", "series", {"params": {"run_id": run_id}}),
            ("PUT", "results/seg.dcm", {"params": {"run_id": run_id}, "content": seg,
                                        "headers": {"content-digest": digest(seg), "x-segnode-output": "seg"}}),
            ("POST", "done", {"json": {"run_id": run_id, "files": {}}}),
            ("POST", "fail", {"json": {"run_id": run_id, "code": "io_error", "message": "x"}})):
        refused = env.request(method, f"/api/worker/jobs/{job.id}/{path}", **kwargs)
        assert (refused.status_code, refused.json()["error"]) == (409, "this run does not hold the job (it is running)")
    current = env.store.get(job.id)
    assert (current.state, current.run_id, current.attempts) == ("running", newer, 2)
    assert env.calls == {"output": [], "done": [], "enqueue": []}
    assert not (env.data / "results" / job.id / run_id).exists()

    failed = env.request("POST", f"/api/worker/jobs/{job.id}/fail", W2, json={
        "run_id": newer, "code": "io_error", "message": "disk full"})
    assert (failed.status_code, failed.json()) == (200, {"state": "queued"})  # a retry: the node enqueues it
    assert env.calls["enqueue"] == [job.id]


def test_a_cpu_worker_cannot_claim_a_gpu_job(env: Env) -> None:
    job = env.job(device="gpu")
    refused = env.request("POST", f"/api/worker/jobs/{job.id}/claim", json={"worker": "h:1:a", "device": "cpu"})
    assert (refused.status_code, refused.json()["error"]) == (409, "this job needs a GPU worker")
    assert env.store.get(job.id).state == "queued"
    assert env.claim(job, device="gpu:1")
    waiting = env.request("GET", f"/api/jobs/{env.job(device='gpu').id}", USER).json()
    assert waiting["waiting"] is None  # a GPU worker was seen just now


def test_the_worker_client_runs_a_job_through_the_routes(env: Env, tmp_path: Path) -> None:
    """NodeClient (what ``segnode worker --node`` uses) against the routes: claim, fetch into its own
    folder, the SEG delivered at once, the rest uploaded with "done"; a series gone from the spool is
    bad input (not retried)."""
    from node.jobs.remote import NodeClient, SeriesGone

    settings = Settings(node={"data_dir": tmp_path / "worker"}, worker={"node_url": env.url, "token": W1})
    client = NodeClient(settings, "h:9:w")
    assert client.hello() == 30
    job = client.claim(env.job().id, "h:9:w")
    assert job is not None and job.folder == "" and env.store.get(job.id).worker == "h:9:w:one"
    with client.inputs(job) as folder:
        assert folder.parent.parent == tmp_path / "worker" / "inputs"
        assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted(p.read_bytes() for p in env.folder.iterdir())
    assert not (tmp_path / "worker" / "inputs" / job.id).exists()
    outdir = tmp_path / "worker" / "results" / job.id / job.run_id
    (outdir / "meshes").mkdir(parents=True)
    (outdir / "seg.dcm").write_bytes(b"seg")
    (outdir / "meshes" / "liver.stl").write_bytes(b"solid")
    client.deliver(job, "seg", outdir / "seg.dcm")
    assert env.calls["output"] == [(job.id, "seg", b"seg")]
    failed = {"rtstruct": {"code": "rtstruct_failed", "message": "no contour"}}  # the labels still count
    assert client.finish(job.id, job.run_id, str(outdir), {"fetch": 0.1}, failed)
    stored = env.store.get(job.id)
    assert stored.state == "done" and set(stored.timings) == {"fetch", "upload"}
    assert stored.failed_outputs == failed
    assert stored.history[-1]["detail"] == "attempt 1, 1 output failed: rtstruct [rtstruct_failed]"
    assert (Path(stored.results) / "meshes" / "liver.stl").read_bytes() == b"solid"
    assert env.calls["done"] == [(job.id, Path(stored.results))]
    assert not client.heartbeat(job.id, job.run_id)  # the run is over here too

    other = client.claim(env.job().id, "h:9:w")
    for path in env.folder.iterdir():
        path.unlink()
    with pytest.raises(SeriesGone, match="no longer has the series"):
        with client.inputs(other):
            pass
