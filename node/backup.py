"""``segnode backup`` and ``segnode restore``: a node's state in one tar file, taken while it runs.

What a backup holds (paths inside the tar):

* ``manifest.json``: the segnode release, the data folder it came from, each store's schema version
  (and the version this release writes), row counts, jobs by state, deliveries by state, file counts;
* ``data/jobs.db``, ``data/outbox.db``, ``data/annotations.sqlite``: copies through SQLite's online
  backup API (each one committed state, taken while the node writes), in that order: a job the copy
  of the job store shows done has its deliveries in the later copy of the outbox. A job still
  running in the copy is queued again when the restored node starts; a delivery in flight is checked
  at its destination before it is sent again (the outbox's rule for an interrupted delivery);
* ``data/outbox/``: the staged files of every delivery not yet final; ``data/corrections/``: the SEG
  versions the annotation log names;
* with ``--results``: ``data/results/``; with ``--spool``: ``data/spool/`` (the received instances;
  the index is rebuilt from them at start), which a job queued or running at backup time needs to run;
* ``config/``: the config file the node was started with and its routing rules, as they are.

Not in it: huey's ``queue.db`` (a message is only a job id, and every start sends the queued jobs
again) and the ingest journal (preallocated segments; an instance is in the spool's files a moment
after it is acknowledged). A job store in Redis (``[queue] backend = "redis"``) is Redis's to back up.

``restore`` unpacks into an empty data folder (or, with ``force``, replaces what a backup covers in a
folder no node is using), rewrites the paths the stores hold from the old data folder to the new one,
and refuses a backup whose stores are newer than this release reads. Older ones migrate when opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from node.config import Settings
from node.sqlite import Schema, backup_copy, user_version

#: The layout of the tar file; a later release may read older formats.
FORMAT = 1
MANIFEST = "manifest.json"
_TEMP_SUFFIXES = (".tmp", ".partial")


class BackupError(Exception):
    """A backup or restore that cannot be done; ``code`` is stable for programs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Store:
    """One SQLite store of the data folder and its current schema."""

    file: str
    schema: Schema


def stores() -> tuple[Store, ...]:
    """The stores a backup copies, in the order it copies them (jobs before outbox: see above)."""
    from node.export.outbox import SCHEMA as OUTBOX
    from node.jobs.store import SCHEMA as JOBS
    from node.web.annotations import SCHEMA as ANNOTATIONS

    return Store("jobs.db", JOBS), Store("outbox.db", OUTBOX), Store("annotations.sqlite", ANNOTATIONS)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    db = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {
            "schema_version": user_version(db),
            "tables": {t: db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables},
        }
    finally:
        db.close()


def _counts(path: Path, sql: str) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute(sql).fetchall())
    finally:
        db.close()


def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (sorted; temporary ones skipped); nothing if it does not exist."""
    if not root.is_dir():
        return
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if not name.endswith(_TEMP_SUFFIXES) and not name.startswith(".restore"):
                yield Path(folder) / name


class _Writer:
    """Adds files to the tar; a file that disappears meanwhile (delivered, cleaned up) is noted."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar, self.missing, self.count = tar, [], 0

    def add(self, path: Path, name: str) -> bool:
        try:
            with open(path, "rb") as f:
                stat = os.fstat(f.fileno())  # a plain file entry even for hard links (outbox, results)
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
                self.tar.addfile(info, f)
        except FileNotFoundError:
            self.missing.append(name)
            return False
        self.count += 1
        return True

    def add_bytes(self, data: bytes, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self.tar.addfile(info, io.BytesIO(data))


def backup(settings: Settings, out: Path, *, results: bool = False, spool: bool = False) -> dict[str, Any]:
    """Write a backup of the node configured by ``settings`` to ``out`` (a tar file); returns its manifest.

    Safe while the node runs: nothing is locked longer than SQLite's backup step of one store."""
    from node import __version__

    data = Path(settings.node.data_dir).resolve()
    if not data.is_dir():
        raise BackupError("not_found", f"the data folder {data} does not exist")
    out = Path(out).resolve()
    if out.is_relative_to(data):
        raise BackupError(
            "inside_data_dir", f"{out} is inside the data folder {data}: write the backup elsewhere"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "segnode": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "data_dir": str(data),
        "queue_backend": settings.queue.backend,
        "options": {"results": results, "spool": spool},
        "stores": {},
        "files": {},
        "config": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="segnode-backup-", dir=out.parent) as tmp,
        tarfile.open(partial, "w") as tar,
    ):
        writer = _Writer(tar)
        copies: dict[str, Path] = {}
        for store in stores():
            source = data / store.file
            if not source.exists() or (store.file == "jobs.db" and settings.queue.backend == "redis"):
                continue
            copy = backup_copy(source, Path(tmp) / store.file)
            copies[store.file] = copy
            manifest["stores"][store.file] = {
                **_describe(copy),
                "release_schema_version": store.schema.version,
                "sha256": _sha256(copy),
            }
            writer.add(copy, f"data/{store.file}")
        if "jobs.db" in copies:
            manifest["jobs"] = _counts(copies["jobs.db"], "SELECT state, count(*) FROM jobs GROUP BY state")
        before = writer.count
        if "outbox.db" in copies:
            manifest["deliveries"] = _counts(
                copies["outbox.db"], "SELECT state, count(*) FROM deliveries GROUP BY state"
            )
            db = sqlite3.connect(copies["outbox.db"])
            open_files = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT i.path FROM instances i JOIN deliveries d ON d.sop_uid = i.sop_uid "
                    "WHERE d.state NOT IN ('delivered', 'cancelled') ORDER BY 1"
                )
            ]
            db.close()
            for path in open_files:
                name = Path(path).name
                writer.add(data / "outbox" / name, f"data/outbox/{name}")
        manifest["files"]["outbox"] = writer.count - before
        folders = ["corrections"] + ["results"] * results + ["spool"] * spool
        for folder in folders:
            before = writer.count
            for file in _files(data / folder):
                if folder == "spool" and file.parent == data / "spool":
                    continue  # index.sqlite: derived, rebuilt from the files at start
                writer.add(file, f"data/{file.relative_to(data).as_posix()}")
            manifest["files"][folder] = writer.count - before
        source = settings.source.path
        if source is not None and Path(source).is_file():
            writer.add(Path(source), f"config/{Path(source).name}")
            manifest["config"]["file"] = {"source": str(source), "name": f"config/{Path(source).name}"}
        rules = Path(settings.node.rules)
        if rules.is_file():
            writer.add(rules, "config/rules.toml")
            manifest["config"]["rules"] = {"source": str(rules), "name": "config/rules.toml"}
        manifest["missing"] = writer.missing  # files deleted while the backup ran (final deliveries)
        writer.add_bytes(json.dumps(manifest, indent=2).encode(), MANIFEST)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, out)
    return manifest


# --- restore ------------------------------------------------------------------------------------


def read_manifest(archive: Path) -> dict[str, Any]:
    try:
        with tarfile.open(archive, "r") as tar:
            member = tar.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            return json.loads(member.read())
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise BackupError("not_a_backup", f"{archive} is not a segnode backup: {exc}") from None


def _check_versions(manifest: dict[str, Any]) -> None:
    from node import __version__

    if manifest.get("format", 0) > FORMAT:
        raise BackupError(
            "too_new",
            f"the backup's format {manifest['format']} is newer than segnode "
            f"{__version__} reads ({FORMAT}); restore it with segnode {manifest['segnode']}",
        )
    current = {s.file: s for s in stores()}
    for file, info in manifest.get("stores", {}).items():
        store = current.get(file)
        if store is not None and info["schema_version"] > store.schema.version:
            raise BackupError(
                "too_new",
                f"the backup's {store.schema.name} ({file}) has schema version {info['schema_version']} "
                f"(segnode {manifest['segnode']}); segnode {__version__} reads up to version "
                f"{store.schema.version}: restore it with segnode {manifest['segnode']} or later",
            )


def _clear(data_dir: Path) -> None:
    """What a restore replaces: the stores (and their WAL files), the folders a backup holds, the
    queue and the journal (which would replay old instances into the restored spool)."""
    for entry in data_dir.iterdir():
        if entry.is_dir() and entry.name in (
            "outbox",
            "corrections",
            "results",
            "spool",
            "journal",
            "config",
        ):
            shutil.rmtree(entry)
        elif entry.is_file() and entry.name.startswith(
            ("jobs.db", "outbox.db", "annotations.sqlite", "queue.db")
        ):
            entry.unlink()


def _rebase(data_dir: Path, old: str, new: str) -> dict[str, int]:
    """Paths the stores hold under the old data folder, moved to the new one."""
    changed = {"jobs": 0, "annotations": 0, "outbox": 0}
    if old == new:
        return changed

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return new + value[len(old) :]
        return value

    jobs = data_dir / "jobs.db"
    if jobs.exists():
        db = sqlite3.connect(jobs)
        with db:
            for job_id, doc in db.execute("SELECT id, doc FROM jobs").fetchall():
                record = json.loads(doc)
                updated = {
                    **record,
                    "folder": moved(record.get("folder")),
                    "results": moved(record.get("results")),
                }
                if updated != record:
                    db.execute(
                        "UPDATE jobs SET doc = ? WHERE id = ?",
                        (json.dumps(updated, separators=(",", ":")), job_id),
                    )
                    changed["jobs"] += 1
        db.close()
    for file, table, key, column in (
        ("annotations.sqlite", "annotations", "id", "path"),
        ("outbox.db", "instances", "sop_uid", "path"),
    ):
        path = data_dir / file
        if not path.exists():
            continue
        db = sqlite3.connect(path)
        with db:
            for row_id, value in db.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                if moved(value) != value:
                    db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (moved(value), row_id))
                    changed[table if table != "instances" else "outbox"] += 1
        db.close()
    return changed


def restore(archive: Path, data_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Unpack ``archive`` into ``data_dir``; returns the manifest with what was done (``restored``)."""
    manifest = read_manifest(archive)
    _check_versions(manifest)
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if any(data_dir.iterdir()):
        if not force:
            raise BackupError(
                "not_empty",
                f"{data_dir} is not empty: restore into an empty folder, or give "
                "--force to replace what the backup holds",
            )
        from node.serve import ServeError, _lock

        try:
            held = _lock(data_dir)
        except ServeError:
            raise BackupError("in_use", f"a segnode serve is using {data_dir}: stop it first") from None
        try:
            _clear(data_dir)
        finally:
            held.close()
    files = 0
    with tarfile.open(archive, "r") as tar:
        for member in tar.getmembers():
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or not member.isfile():
                raise BackupError("unsafe", f"{archive}: refusing the entry {member.name!r}")
            if name.parts[0] == "data":
                target = data_dir.joinpath(*name.parts[1:])
            elif name.parts[0] == "config":
                target = data_dir.joinpath("config", *name.parts[1:])
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with open(target, "wb") as f:
                shutil.copyfileobj(source, f)
                os.fsync(f.fileno())
            files += 1
    for store, info in manifest.get("stores", {}).items():
        if _sha256(data_dir / store) != info["sha256"]:
            raise BackupError("corrupt", f"{archive}: {store} does not match its checksum")
    manifest["restored"] = {
        "data_dir": str(data_dir),
        "files": files,
        "rebased": _rebase(data_dir, manifest["data_dir"], str(data_dir)),
    }
    return manifest
