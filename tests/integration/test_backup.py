"""``segnode backup`` of a running node in the middle of deliveries (its PACS is down), ``segnode restore``
into a new data folder, a node started there: every job and pending delivery is there, and each
delivery completes exactly once."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from typer.testing import CliRunner

from node.backup import BackupError, restore
from node.cli import app
from node.dicom.series import read_datasets
from node.phantom import TINY, write_phantom
from tests.servers import THRESHOLD_SEG_RULES, SegnodeServe, StoreSCP, free_port, wait_for

pytestmark = pytest.mark.integration

TOKEN = "backup-test-token"
RULES = THRESHOLD_SEG_RULES


def make_node(workdir: Path, pacs_port: int, archive: Path) -> SegnodeServe:
    workdir.mkdir()
    extra = f"""
[outbox]
max_attempts = 10000
initial_delay_s = 0.2
max_delay_s = 0.5
poll_s = 0.2
[[destinations]]
name = "pacs"
kind = "cstore"
host = "127.0.0.1"
port = {pacs_port}
ae_title = "STORESCP"
[[destinations]]
name = "archive"
kind = "folder"
path = "{archive}"
"""
    return SegnodeServe(workdir, rules=RULES, token=TOKEN, ingest="fsync = false", extra=extra)


@pytest.fixture
def nodes() -> Iterator[list[SegnodeServe]]:
    started: list[SegnodeServe] = []
    yield started
    for node in started:
        node.stop()


def segnode(config: Path, *args: str):
    """The command line ``segnode --config CONFIG ARGS`` through the app, in this process."""
    return CliRunner().invoke(app, ["--config", str(config), *args])


def test_backup_while_delivering_then_restore_elsewhere_delivers_each_result_once(
    tmp_path: Path, nodes: list[SegnodeServe]
) -> None:
    archive = tmp_path / "archive"
    a = make_node(tmp_path / "a", free_port(), archive)  # its PACS: a port nobody listens on
    nodes.append(a)
    a.start()
    session = requests.Session()
    session.trust_env = False
    client = DICOMwebClient(
        f"{a.url}/dicomweb", session=session, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    series = write_phantom(TINY, tmp_path / "ct")
    client.store_instances([ds for _, ds in read_datasets(series["dicom"])[0]])

    def pending_at_pacs() -> list[dict] | None:
        jobs = [a.api(f"/api/jobs/{j['id']}") for j in a.api("/api/jobs")]
        ready = len(jobs) == 1 and all(
            j["state"] == "done"
            and j["destinations"].get("archive", {}).get("state") == "delivered"
            and j["destinations"].get("pacs", {}).get("attempts", 0) >= 1
            for j in jobs
        )
        return jobs if ready else None

    jobs_a = wait_for(
        pending_at_pacs, what="the job done, delivered to the archive, failing at the PACS", logs=a.log
    )
    assert {j["destinations"]["pacs"]["state"] for j in jobs_a} <= {"pending", "delivering"}

    backup = tmp_path / "node-a.tar"
    made = segnode(a.config, "backup", str(backup), "--results", "--spool")
    assert made.exit_code == 0, made.output
    with tarfile.open(backup) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        names = set(tar.getnames())
    assert manifest["format"] == 1 and manifest["data_dir"] == str(a.data_dir.resolve())
    assert {k: (v["schema_version"], v["release_schema_version"]) for k, v in manifest["stores"].items()} == {
        "jobs.db": (1, 1),
        "outbox.db": (1, 1),
        "annotations.sqlite": (1, 1),
    }
    assert manifest["stores"]["jobs.db"]["tables"]["jobs"] == 1
    assert manifest["jobs"] == {"done": 1}
    assert manifest["deliveries"].get("delivered") == 1
    assert manifest["deliveries"].get("pending", 0) + manifest["deliveries"].get("delivering", 0) == 1
    assert manifest["files"]["outbox"] == 1 and manifest["files"]["spool"] == 40
    assert manifest["files"]["results"] >= 5 and manifest["missing"] == []
    assert {"config/node.toml", "config/rules.toml", "data/jobs.db", "data/outbox.db"} <= names
    assert a.stop() == 0

    # The PACS comes up; a new node, with its own data folder, is restored from the backup.
    pacs = StoreSCP(workdir=tmp_path / "pacs", options=("+uf", "-pm", "+xa"))
    with pacs:
        restore_and_deliver(tmp_path, backup, archive, pacs, nodes, jobs_a)


def restore_and_deliver(
    tmp_path: Path, backup: Path, archive: Path, pacs: StoreSCP, nodes: list[SegnodeServe], jobs_a: list[dict]
) -> None:
    b = make_node(tmp_path / "b", pacs.port, archive)
    nodes.append(b)
    restored = segnode(b.config, "restore", str(backup), "--data-dir", str(b.data_dir))
    assert restored.exit_code == 0, restored.output
    assert f"into {b.data_dir.resolve()}" in " ".join(restored.output.split())
    with pytest.raises(BackupError, match="is not empty: restore into an empty folder, or give --force"):
        restore(backup, b.data_dir)
    b.start()

    def delivered_at_pacs() -> list[dict] | None:
        jobs = [b.api(f"/api/jobs/{j['id']}") for j in b.api("/api/jobs")]
        done = len(jobs) == 1 and all(j["destinations"]["pacs"]["state"] == "delivered" for j in jobs)
        return jobs if done else None

    jobs_b = wait_for(delivered_at_pacs, what="the restored node delivers to the PACS", logs=b.log)
    assert sorted(j["id"] for j in jobs_b) == sorted(j["id"] for j in jobs_a)
    for job in jobs_b:
        assert (job["state"], job["attempts"]) == ("done", 1)  # not run again
        assert job["destinations"]["archive"]["state"] == "delivered"
        assert job["destinations"]["archive"]["attempts"] == 1  # not sent again
        assert job["results"].startswith(str(b.data_dir.resolve()) + "/")  # paths moved to the new folder
        assert Path(job["results"], "seg.dcm").is_file()
    time.sleep(1.0)  # several delivery polls: nothing more may arrive
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received_files()]
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(
        str(pydicom.dcmread(Path(j["results"], "seg.dcm"), stop_before_pixels=True).SOPInstanceUID)
        for j in jobs_b
    )
    assert {str(ds.Modality) for ds in received} == {"SEG"}
    assert len(list(archive.rglob("*.dcm"))) == 1
    assert b.stop() == 0
