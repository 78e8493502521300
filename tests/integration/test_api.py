"""The HTTP API over real HTTP (uvicorn on a free loopback port): auth, job detail, retry, metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from node.config import Settings
from node.dicom.series import VolumeError
from node.jobs import Router, open_store
from node.jobs.worker import JobRunner
from node.rules import PipelineSpec, Rule
from node.web.app import AppContext, create_app
from tests.servers import serve_in_thread
from tests.unit.test_jobs import FakePipeline, series

pytestmark = pytest.mark.integration

TOKENS = {"alice": "a-secret-token", "bob": "another-token"}


@pytest.fixture
def node(tmp_path: Path):
    settings = Settings(node={"data_dir": tmp_path / "data", "rules": tmp_path / "none.toml"},
                        http={"tokens": TOKENS, "admin_users": ["alice"]}, queue={"max_attempts": 2, "retry_delay_s": 0},
                        destinations=[{"name": "pacs", "kind": "folder", "path": str(tmp_path / "out")}])
    store = open_store(settings)
    enqueued: list[str] = []
    pipeline = FakePipeline()
    runner = JobRunner(store, settings, pipeline=pipeline, request=lambda job, s: job.pipeline)
    rules = (Rule(name="ct", pipeline=PipelineSpec(engine="fake"), destinations=["*"]),)
    router = Router(settings, store, lambda job_id, delay: enqueued.append(job_id), rules=rules)
    app = create_app(AppContext(settings, store, lambda job_id, delay: enqueued.append(job_id)))
    with serve_in_thread(app) as url:
        yield url, router, runner, pipeline, enqueued
    store.close()


def client(url: str, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=url, trust_env=False, timeout=10, **kwargs)


def test_auth_required_everywhere_but_healthz(node) -> None:
    url = node[0]
    with client(url) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        for path in ("/api/jobs", "/api/series", "/metrics", "/api/jobs/nope"):
            response = http.get(path)
            assert (response.status_code, response.json()) == (401, {"error": "authentication required"})
            assert response.headers["www-authenticate"] == 'Basic realm="segnode", Bearer realm="segnode"'
        assert http.post("/dicomweb/studies").status_code == 401
        assert http.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/api/jobs", headers={"Authorization": "Bearer a-secret-token"}).status_code == 200
        assert http.get("/api/jobs", headers={"Authorization": "Bearer another-token"}).status_code == 200
        assert http.get("/api/jobs", auth=("alice", "a-secret-token")).status_code == 200
        assert http.get("/api/jobs", auth=("bob", "a-secret-token")).status_code == 401  # alice's token
        assert http.get("/api/jobs", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_job_detail_fields(node, tmp_path: Path) -> None:
    url, router, runner, _, enqueued = node
    job = router.on_series_ready(series(tmp_path))
    assert enqueued == [job.id]
    assert runner.run(job.id) == "done"
    with client(url, headers={"Authorization": "Bearer a-secret-token"}) as http:
        detail = http.get(f"/api/jobs/{job.id}").json()
        listed = http.get("/api/jobs").json()
        seen = http.get("/api/series").json()
        assert http.get("/api/jobs/unknown").status_code == 404
        assert http.get("/api/jobs?state=bogus").json() == {
            "error": "state must be one of queued, running, done, failed, superseded"}
        assert http.get("/api/jobs?limit=0").status_code == 400
        assert http.get("/api/jobs?state=failed").json() == []
    assert {k: detail[k] for k in ("id", "state", "stage", "progress", "error", "rule", "engine", "attempts",
                                   "series_uid", "generation", "instance_count")} == {
        "id": job.id, "state": "done", "stage": "done", "progress": 1.0, "error": None, "rule": "ct",
        "engine": "fake", "attempts": 1, "series_uid": job.series_uid, "generation": 1, "instance_count": 4}
    assert sorted(detail["timings"]) == ["load", "prepare", "segment", "write"]
    assert detail["destinations"] == {"pacs": {"state": "pending"}}
    assert [e["event"] for e in detail["history"]] == ["queued", "running", "done"]
    assert "key" not in detail and "version" not in detail
    assert [j["id"] for j in listed] == [job.id] and "history" not in listed[0]
    assert [(s["series_uid"], s["job_id"], s["rule"]) for s in seen] == [(job.series_uid, job.id, "ct")]


def test_retry_a_failed_job(node, tmp_path: Path) -> None:
    url, router, runner, pipeline, enqueued = node
    pipeline.script = [VolumeError("missing_slices", "slice 3 is missing")]
    job = router.on_series_ready(series(tmp_path))
    assert runner.run(job.id) == "failed"
    with client(url, auth=("alice", "a-secret-token")) as http:
        failed = http.get(f"/api/jobs/{job.id}").json()
        assert (failed["state"], failed["error"]) == (
            "failed", {"code": "missing_slices", "message": "slice 3 is missing"})
        retried = http.post(f"/api/jobs/{job.id}/retry")
        assert retried.status_code == 202
        assert (retried.json()["state"], retried.json()["error"], retried.json()["attempts"]) == ("queued", None, 0)
        assert retried.json()["history"][-1]["detail"] == "retried by alice"
        assert enqueued == [job.id, job.id]
        again = http.post(f"/api/jobs/{job.id}/retry")
        assert (again.status_code, again.json()) == (409, {"error": "job is queued; only failed jobs can be retried"})
        assert http.post("/api/jobs/unknown/retry").status_code == 404
        assert runner.run(job.id) == "done"
        metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'segnode_jobs{state="done"} 1.0' in text
    assert 'segnode_jobs{state="failed"} 0.0' in text
    assert 'segnode_stage_duration_seconds_count{stage="segment"}' in text
    for name in ("segnode_instances_received_total", "segnode_associations_total",
                 "segnode_series_completed_total"):
        assert f"# TYPE {name} counter" in text


def test_healthz_is_503_while_ingest_cannot_store(tmp_path: Path) -> None:
    settings = Settings(node={"data_dir": tmp_path / "data"})
    store = open_store(settings)
    problems = ["spool journal cannot retire segments: [Errno 28] No space left on device"]
    app = create_app(AppContext(settings, store, lambda *a: None, ingest_problem=lambda: problems[-1]))
    with serve_in_thread(app) as url, client(url) as http:
        response = http.get("/healthz")
        assert (response.status_code, response.json()) == (503, {"status": "error", "detail": problems[0]})
        problems.append(None)  # the disk has room again
        assert http.get("/healthz").json()["status"] == "ok"
    store.close()


def test_open_api_without_tokens(tmp_path: Path) -> None:
    settings = Settings(node={"data_dir": tmp_path / "data"})
    store = open_store(settings)
    with serve_in_thread(create_app(AppContext(settings, store, lambda *a: None))) as url, client(url) as http:
        assert http.get("/api/jobs").json() == []
    store.close()


def test_the_log_level_changes_by_api_for_admin_users_only(node) -> None:
    import logging

    url, before = node[0], logging.getLogger().level
    alice, bob = {"Authorization": "Bearer a-secret-token"}, {"Authorization": "Bearer another-token"}
    try:
        with client(url) as http:
            assert http.put("/api/log-level", json={"level": "DEBUG"}).status_code == 401
            refused = http.put("/api/log-level", json={"level": "DEBUG"}, headers=bob)
            assert (refused.status_code, refused.json()) == (
                403, {"error": "changing the log level needs an admin user ([http] admin_users)"})
            bad = http.put("/api/log-level", json={"level": "LOUD"}, headers=alice)
            assert bad.status_code == 400 and "unknown log level 'LOUD'" in bad.json()["error"]
            done = http.put("/api/log-level", json={"level": "debug"}, headers=alice)
            assert (done.status_code, done.json()) == (200, {"level": "DEBUG"})
            assert logging.getLogger().level == logging.DEBUG
            assert http.get("/api/log-level", headers=bob).json() == {"level": "DEBUG"}
    finally:
        logging.getLogger().setLevel(before)
