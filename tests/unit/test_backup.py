"""``node.backup`` on local folders: a backup of segnode 0.1.0's stores restores elsewhere with its paths
moved and migrates when opened; a backup from a newer release, or with an unsafe entry, is refused.
(The running node, mid-delivery: tests/integration/test_backup.py.)"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest

from node import __version__
from node.backup import BackupError, backup, read_manifest, restore
from node.config import Settings
from node.jobs.store import JobStore, SqliteBackend
from node.web.annotations import AnnotationLog

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"
OLD = "/var/lib/segnode-fixture"


@pytest.fixture
def old_node(tmp_path: Path) -> Settings:
    """A data folder with 0.1.0's stores, whose rows name ``OLD`` as their data folder."""
    data = tmp_path / "old"
    (data / "corrections" / "1.2.3.4").mkdir(parents=True)
    (data / "corrections" / "1.2.3.4" / "v1.dcm").write_bytes(b"seg v1")
    for name in ("jobs.db", "outbox.db", "annotations.sqlite"):
        shutil.copy(FIXTURES / name, data / name)
    return Settings(node={"data_dir": str(data), "rules": str(tmp_path / "no-rules.toml")})


def test_a_0_1_0_backup_restores_elsewhere_with_its_paths_moved(old_node: Settings, tmp_path: Path) -> None:
    manifest = backup(old_node, tmp_path / "b.tar")
    assert (manifest["segnode"], manifest["format"]) == (__version__, 1)
    assert {k: (v["schema_version"], v["release_schema_version"]) for k, v in manifest["stores"].items()} == {
        "jobs.db": (0, 1),
        "outbox.db": (0, 1),
        "annotations.sqlite": (0, 1),
    }
    assert manifest["jobs"] == {"queued": 1} and manifest["deliveries"] == {"pending": 1}
    # The fixture's staged SEG is not on disk here: the backup says so rather than failing.
    assert manifest["files"] == {"outbox": 0, "corrections": 1} and manifest["missing"] == [
        "data/outbox/1.2.3.4.5.6.dcm"
    ]
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert sorted(tar.getnames()) == [
            "data/annotations.sqlite",
            "data/corrections/1.2.3.4/v1.dcm",
            "data/jobs.db",
            "data/outbox.db",
            "manifest.json",
        ]

    # Rows written at OLD: a restore moves them to the new folder (as if the backup came from there).
    manifest["data_dir"] = OLD
    rewritten = tmp_path / "from-old.tar"
    with tarfile.open(tmp_path / "b.tar") as src, tarfile.open(rewritten, "w") as dst:
        for member in src.getmembers():
            data = (
                json.dumps(manifest).encode()
                if member.name == "manifest.json"
                else src.extractfile(member).read()
            )
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    new = tmp_path / "new"
    done = restore(rewritten, new)["restored"]
    assert done == {"data_dir": str(new), "files": 4, "rebased": {"jobs": 1, "annotations": 1, "outbox": 1}}
    store = JobStore(SqliteBackend(new / "jobs.db"))
    assert store.get("0123456789abcdef").folder == f"{new}/spool/1.2.3/1.2.3.4"  # type: ignore[union-attr]
    store.close()
    log = AnnotationLog(new / "annotations.sqlite")
    assert log.rows()[0]["path"] == f"{new}/corrections/1.2.3.4/v1.dcm"
    log.close()
    assert (new / "corrections/1.2.3.4/v1.dcm").read_bytes() == b"seg v1"
    db = sqlite3.connect(new / "outbox.db")
    assert db.execute("select path from instances").fetchall() == [(f"{new}/outbox/1.2.3.4.5.6.dcm",)]
    db.close()
    with pytest.raises(BackupError, match="is not empty"):
        restore(rewritten, new)
    assert restore(rewritten, new, force=True)["restored"]["files"] == 4


def _tar(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_backup_from_a_newer_release_or_with_unsafe_entries_is_refused(tmp_path: Path) -> None:
    newer = {
        "format": 1,
        "segnode": "0.9.0",
        "data_dir": "/x",
        "config": {},
        "stores": {"outbox.db": {"schema_version": 3, "sha256": ""}},
    }
    with pytest.raises(BackupError) as refused:
        restore(_tar(tmp_path / "n.tar", {"manifest.json": json.dumps(newer).encode()}), tmp_path / "a")
    assert (refused.value.code, str(refused.value)) == (
        "too_new",
        (
            f"the backup's outbox (outbox.db) has schema version 3 (segnode 0.9.0); segnode {__version__} reads up "
            "to version 1: restore it with segnode 0.9.0 or later"
        ),
    )
    fine = {**newer, "stores": {}}
    evil = _tar(tmp_path / "e.tar", {"manifest.json": json.dumps(fine).encode(), "data/../../escape": b"x"})
    with pytest.raises(BackupError, match=r"refusing the entry 'data/\.\./\.\./escape'"):
        restore(evil, tmp_path / "b")
    assert not (tmp_path / "escape").exists()
    with pytest.raises(BackupError, match="is not a segnode backup") as not_one:
        read_manifest(_tar(tmp_path / "x.tar", {"other": b""}))
    assert not_one.value.code == "not_a_backup"
