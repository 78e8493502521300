"""The job queue and records on a real Redis (RedisHuey + Redis job store): the same contract as
SQLite (tests/unit/test_jobs.py), plus what only Redis has to show."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.config import load_settings
from node.ingest import Sender, SeriesReady
from node.jobs import Router, open_store
from node.jobs.queue import JobQueue, make_huey
from node.jobs.store import RedisBackend
from node.phantom import TINY, write_phantom
from node.rules import PipelineSpec, Rule, read_facts
from tests.servers import RedisServer, _die_with_parent
from tests.unit.test_jobs import Env, QueueContract, make_env, series

pytestmark = pytest.mark.integration


class TestRedisQueue(QueueContract):
    @pytest.fixture
    def env(self, tmp_path: Path, redis_server: RedisServer) -> Iterator[Env]:
        yield from make_env(tmp_path, backend="redis", redis_url=redis_server.url)


def test_records_live_in_redis_for_every_worker(tmp_path: Path, redis_server: RedisServer) -> None:
    """A second node process (here: a second store on the same Redis) sees the same records."""
    for env in make_env(tmp_path, backend="redis", redis_url=redis_server.url):
        assert isinstance(env.store.backend, RedisBackend)
        job = env.router.on_series_ready(series(tmp_path))
        for other in make_env(tmp_path / "other", backend="redis", redis_url=redis_server.url):
            assert other.store.get(job.id).key == job.key
            assert other.router.on_series_ready(series(tmp_path)).id == job.id  # idempotent across nodes
            other.start()
            env.wait_state(job.id, "done")
        assert env.store.counts()["done"] == 1
        assert not (tmp_path / "data" / "queue.db").exists() and not (tmp_path / "data" / "jobs.db").exists()


def test_segnode_worker_runs_jobs_from_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    """``segnode worker`` on another "machine": a job enqueued here is run there, with the real pipeline."""
    repo = Path(__file__).resolve().parents[2]
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[queue]\nbackend = "redis"\nredis_url = "{redis_server.url}"\nworkers = 2\n')
    sqlite = tmp_path / "sqlite.toml"
    sqlite.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    refused = subprocess.run([sys.executable, "-m", "node", "--config", str(sqlite), "worker"], cwd=repo,
                             capture_output=True, text=True)
    assert (refused.returncode, refused.stderr.strip()) == (
        2, 'error: segnode worker needs [queue] backend = "redis"; with SQLite, raise [queue] workers')

    settings = load_settings(config)
    store = open_store(settings)
    router = Router(settings, store, JobQueue(make_huey(settings)).enqueue,
                    rules=(Rule(name="ct", pipeline=PipelineSpec(engine="threshold")),))
    folder = write_phantom(TINY, tmp_path / "phantom")["dicom"]
    facts = read_facts(folder)
    first = pydicom.dcmread(next(iter(sorted(folder.iterdir()))), stop_before_pixels=True)
    job = router.on_series_ready(SeriesReady(first.StudyInstanceUID, first.SeriesInstanceUID, folder,
                                             facts.instance_count, "complete", Sender("dimse", "CT1")))
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "node", "--config", str(config), "worker"], cwd=repo,
                              stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 60
        while store.get(job.id).state not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        done = store.get(job.id)
        assert (done.state, done.error, done.instance_count) == ("done", None, 40), (
            tmp_path / "worker.log").read_text()
        assert (Path(done.results) / "labels.nii.gz").is_file()
        assert done.worker.split(":")[1] == str(worker.pid)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        store.close()
    logged = (tmp_path / "worker.log").read_text()
    assert "node.serve: stopping (SIGTERM)" in logged and "node.serve: stop: no job running" in logged  # drained
    assert logged.rstrip().endswith("node.serve: stopped")
