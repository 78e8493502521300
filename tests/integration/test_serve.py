"""``segnode serve`` as a subprocess: a series sent in becomes a job that finishes; ``kill -9`` in the
middle of a job, then a restart, completes that job exactly once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client import DICOMwebClient

from node.dicom.series import read_datasets
from node.phantom import PhantomSpec, write_phantom
from tests.servers import SegnodeServe, free_port, storescu

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "serve-test-token"
RULES = """
[[rule]]
name = "ct-threshold"
[rule.match]
modality = ["CT"]
image_type = ["ORIGINAL"]
[rule.pipeline]
engine = "threshold"
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SegnodeServe]:
    node = SegnodeServe(tmp_path, rules=RULES, token=TOKEN, extra="[queue]\nretry_delay_s = 1\n")
    yield node
    node.stop()


def phantom(tmp_path: Path, size: tuple[int, int, int], seed: int) -> Path:
    spec = PhantomSpec(size=size, spacing=tuple(f / n for f, n in zip((204.8, 204.8, 240.0), size, strict=True)), seed=seed)
    return write_phantom(spec, tmp_path / f"phantom-{seed}")["dicom"]


def test_a_series_sent_by_stow_becomes_a_finished_job(node: SegnodeServe, tmp_path: Path) -> None:
    series = phantom(tmp_path, (64, 64, 40), seed=1)
    node.start()
    session = requests.Session()
    session.trust_env = False
    client = DICOMwebClient(f"{node.url}/dicomweb", session=session, headers={"Authorization": f"Bearer {TOKEN}"})
    datasets = [ds for _, ds in read_datasets(series)[0]]
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 40
    job = node.wait_job(lambda j: j["state"] in ("done", "failed"))
    assert (job["state"], job["rule"], job["engine"], job["instance_count"], job["attempts"]) == (
        "done", "ct-threshold", "threshold", 40, 1)
    assert job["sender"] == {"via": "stow", "calling_aet": ""}
    detail = node.api(f"/api/jobs/{job['id']}")
    assert [e["event"] for e in detail["history"]] == ["queued", "running", "done"]  # type: ignore[index]
    assert {"load", "segment", "write"} <= set(detail["timings"])  # type: ignore[index]
    results = Path(detail["results"])  # type: ignore[index]
    assert {"labels.nii.gz", "classes.json", "stats.csv", "report.json"} <= {p.name for p in results.iterdir()}
    (seen,) = node.api("/api/series")  # type: ignore[misc]
    assert (seen["job_id"], seen["rule"], seen["via"]) == (job["id"], "ct-threshold", "stow")
    metrics = httpx.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False).text
    assert 'segnode_instances_received_total{via="stow"} 40.0' in metrics
    assert 'segnode_series_completed_total{reason="complete"} 1.0' in metrics
    assert 'segnode_jobs{state="done"} 1.0' in metrics
    assert node.stop() == 0  # SIGTERM: a clean shutdown


def test_kill_9_during_a_job_then_restart_completes_it_exactly_once(node: SegnodeServe, tmp_path: Path) -> None:
    series = phantom(tmp_path, (256, 256, 160), seed=2)  # a few seconds of segmentation
    node.start()
    storescu([series], "127.0.0.1", node.dicom_port, "SEGNODE", calling_aet="CT_SCANNER")
    running = node.wait_job(lambda j: j["state"] == "running" and j["stage"] == "segment")
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    assert node.process is None
    node.start()
    done = node.wait_job(lambda j: j["id"] == running["id"] and j["state"] in ("done", "failed"))
    assert (done["state"], done["attempts"], done["error"]) == ("done", 2, None)
    assert done["sender"] == {"via": "dimse", "calling_aet": "CT_SCANNER"}
    history = [e["event"] for e in node.api(f"/api/jobs/{done['id']}")["history"]]  # type: ignore[index]
    assert history == ["queued", "running", "requeued", "running", "done"]
    assert len(node.api("/api/jobs")) == 1  # type: ignore[arg-type]
    runs = list((node.data_dir / "results" / done["id"]).iterdir())
    assert runs == [Path(done["results"])]  # the killed run's folder is gone
    assert "jobs at start: 1 requeued (worker gone)" in node.log(tail=None)


def test_serve_refuses_an_open_api_off_loopback_and_a_second_node_on_one_folder(tmp_path: Path) -> None:
    from node.config import Settings
    from node.serve import ServeError, _check_http, _lock

    with pytest.raises(ServeError, match=r"\[http\] tokens are empty: the API would be open on 0\.0\.0\.0"):
        _check_http(Settings(http={"host": "0.0.0.0"}))
    _check_http(Settings(http={"host": "0.0.0.0", "tokens": {"a": "b"}}))
    _check_http(Settings(http={"host": "::1"}))
    held = _lock(tmp_path)
    try:
        with pytest.raises(ServeError, match="another segnode serve is using"):
            _lock(tmp_path)
    finally:
        held.close()
    _lock(tmp_path).close()
