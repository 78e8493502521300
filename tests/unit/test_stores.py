"""Schema versions of the node's SQLite stores: stores written by segnode 0.1.0 (tests/fixtures/stores/)
are migrated (a backup copy first, one transaction), newer ones are refused, a failed migration leaves
the store as it was."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from node import __version__
from node.config import Destination
from node.export.outbox import SCHEMA as OUTBOX_SCHEMA
from node.export.outbox import Outbox
from node.jobs.store import SCHEMA as JOBS_SCHEMA
from node.jobs.store import JobStore, SqliteBackend
from node.sqlite import Schema, SchemaError, open_store, statements, user_version
from node.web.annotations import SCHEMA as ANNOTATIONS_SCHEMA
from node.web.annotations import AnnotationLog

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"
JOB_ID = "0123456789abcdef"
SEG_UID = "1.2.3.4.5.6"


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return user_version(db)
    finally:
        db.close()


def _rows(path: Path, table: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"select * from {table} order by 1").fetchall()
    finally:
        db.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder holding the three stores as segnode 0.1.0 wrote them."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("jobs.db", "outbox.db", "annotations.sqlite"):
        shutil.copy(FIXTURES / name, folder / name)
        assert _version(folder / name) == 0
    return folder


def _history(path: Path) -> list[tuple]:
    return _rows(path, "segnode_schema")


def test_the_current_schemas_are_version_1() -> None:
    assert (JOBS_SCHEMA.version, OUTBOX_SCHEMA.version, ANNOTATIONS_SCHEMA.version) == (1, 1, 1)


def test_the_0_1_0_job_store_is_migrated_after_a_backup_copy(data: Path) -> None:
    before = _rows(data / "jobs.db", "jobs")
    store = JobStore(SqliteBackend(data / "jobs.db"))
    job = store.get(JOB_ID)
    assert job is not None
    assert (job.state, job.series_uid, job.instance_count, job.rule, job.folder) == (
        "queued",
        "1.2.3.4",
        40,
        "ct-threshold",
        "/var/lib/segnode-fixture/spool/1.2.3/1.2.3.4",
    )
    assert [s["series_uid"] for s in store.series()] == ["1.2.3.4"]
    store.close()
    assert _version(data / "jobs.db") == 1
    ((version, release, applied, how),) = _history(data / "jobs.db")
    assert (version, release, how) == (1, __version__, "migrated from version 0")
    assert abs(applied - time.time()) < 60
    backup = data / "jobs.db.v0.bak"
    assert _version(backup) == 0 and _rows(backup, "jobs") == before
    assert _rows(data / "jobs.db", "jobs") == before
    # Opened again: nothing more to do, no second copy.
    backup.unlink()
    JobStore(SqliteBackend(data / "jobs.db")).close()
    assert not backup.exists() and len(_history(data / "jobs.db")) == 1


def test_the_0_1_0_outbox_gets_relative_paths_and_still_delivers(data: Path, tmp_path: Path) -> None:
    (row,) = _rows(data / "outbox.db", "instances")
    assert row[5] == f"/var/lib/segnode-fixture/outbox/{SEG_UID}.dcm"  # version 0: absolute
    # The staged file, where the node keeps it (the data folder moved since 0.1.0 wrote the row).
    (data / "outbox").mkdir()
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", SEG_UID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.9", "SEG"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(data / "outbox" / f"{SEG_UID}.dcm", enforce_file_format=True)
    pacs = tmp_path / "pacs"
    box = Outbox(data, [Destination(name="pacs", kind="folder", path=str(pacs))])
    try:
        (row,) = _rows(data / "outbox.db", "instances")
        assert row[5] == f"{SEG_UID}.dcm"
        assert _version(data / "outbox.db") == 1 and _version(data / "outbox.db.v0.bak") == 0
        assert box.job_destinations(JOB_ID)["pacs"]["state"] == "pending"
        box.start()
        deadline = time.monotonic() + 20
        while box.job_destinations(JOB_ID)["pacs"]["state"] != "delivered" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.job_destinations(JOB_ID)["pacs"]["state"] == "delivered"
    finally:
        box.close()
    assert [p.name for p in pacs.rglob("*.dcm")] == [f"{SEG_UID}.dcm"]


def test_the_0_1_0_annotation_log_is_migrated(data: Path) -> None:
    log = AnnotationLog(data / "annotations.sqlite")
    try:
        (row,) = log.rows()
        assert (row["user"], row["version"], row["slices"], row["labels"], row["time"]) == (
            "reader",
            1,
            "3;4",
            "liver",
            "2026-12-01T10:00:00.000Z",
        )
        assert log.latest("1.2.3.4")["seg_uid"] == "1.2.3.4.7"  # type: ignore[index]
    finally:
        log.close()
    assert _version(data / "annotations.sqlite") == 1
    assert _version(data / "annotations.sqlite.v0.bak") == 0


def test_a_store_of_a_newer_release_is_refused_naming_both_versions(data: Path) -> None:
    JobStore(SqliteBackend(data / "jobs.db")).close()
    db = sqlite3.connect(data / "jobs.db")
    db.execute("insert into segnode_schema values (2, '0.9.0', 0, 'migrated from version 1')")
    db.execute("pragma user_version = 2")
    db.commit()
    db.close()
    with pytest.raises(SchemaError) as refused:
        SqliteBackend(data / "jobs.db")
    assert str(refused.value) == (
        f"{data / 'jobs.db'} has job store schema version 2 (written by segnode 0.9.0); segnode "
        f"{__version__} reads up to version 1. Run a release that knows version 2, or restore a backup made "
        f"by segnode {__version__}."
    )
    assert _version(data / "jobs.db") == 2


def test_a_failing_migration_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = sqlite3.connect(path)
    db.execute("create table t (a)")
    db.execute("insert into t values (1)")
    db.commit()
    db.close()
    broken = Schema(
        "test store",
        2,
        statements("create table if not exists t (a, b)"),
        migrations={0: ("alter table t add column b",), 1: ("update t set nope = 1",)},
    )
    with pytest.raises(
        SchemaError,
        match=r"migrating the test store from version 0 to 2 failed \(no such "
        r"column: nope\); the store is unchanged",
    ):
        open_store(path, broken)
    assert _version(path) == 0 and _rows(path, "t") == [(1,)]
    good = Schema(
        "test store",
        2,
        statements("create table if not exists t (a, b)"),
        migrations={0: ("alter table t add column b",), 1: ("update t set b = a * 10",)},
    )
    open_store(path, good).close()
    assert _version(path) == 2 and _rows(path, "t") == [(1, 10)]


def test_a_new_store_is_created_at_the_current_version_without_a_copy(tmp_path: Path) -> None:
    SqliteBackend(tmp_path / "jobs.db").close()
    assert _version(tmp_path / "jobs.db") == 1
    assert [h[3] for h in _history(tmp_path / "jobs.db")] == ["created"]
    assert sorted(p.name for p in tmp_path.iterdir() if ".bak" in p.name) == []


def test_the_spool_index_is_stamped_and_a_newer_one_rebuilt(tmp_path: Path) -> None:
    from node.ingest.spool import INDEX_VERSION, Spool

    Spool(tmp_path, fsync=False).close()
    assert _version(tmp_path / "spool" / "index.sqlite") == INDEX_VERSION == 1
    db = sqlite3.connect(tmp_path / "spool" / "index.sqlite")
    db.execute("create table from_the_future (x)")
    db.execute("pragma user_version = 7")
    db.commit()
    db.close()
    Spool(tmp_path, fsync=False).close()
    names = [r[1] for r in _rows(tmp_path / "spool" / "index.sqlite", "sqlite_master")]
    assert "from_the_future" not in names and "instances" in names
    assert _version(tmp_path / "spool" / "index.sqlite") == 1


def test_a_command_meeting_a_newer_store_says_so_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "outbox.db")
    db.execute("create table deliveries (x)")
    db.execute("pragma user_version = 4")
    db.commit()
    db.close()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    result = CliRunner().invoke(app, ["--config", str(config), "outbox", "status"])
    assert result.exit_code == 2  # as a config error: restarting cannot help
    assert " ".join(result.output.split()) == (
        f"error: {data / 'outbox.db'} has outbox schema version 4; segnode {__version__} reads up to "
        f"version 1. Run a release that knows version 4, or restore a backup made by segnode {__version__}."
    )
