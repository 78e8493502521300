"""SQLite as the node's durable stores use it (jobs, outbox, annotation log, spool index).

Each store records the version of its schema in the file itself (``PRAGMA user_version``, SQLite's
header field meant for this). :func:`open_store` opens a store and brings it to the version this
release writes:

* a new, empty file gets the current schema;
* an older version (0 is the "unversioned" schema of segnode 0.1.0) is first copied aside with
  SQLite's online backup API (``<name>.v<old>.bak``, a consistent copy even while another process
  writes), then migrated step by step in one ``BEGIN IMMEDIATE`` transaction: a failed migration
  leaves the store as it was;
* a newer version is refused with :class:`SchemaError`, naming both versions and the release that
  wrote it: an older segnode must not write rows a newer one would misread.

``segnode_schema`` (from version 1 on) keeps one row per version a store has had, with the segnode
release that created or migrated it and when.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Created by every versioned schema: the store's history of versions and releases.
HISTORY_TABLE = (
    "CREATE TABLE IF NOT EXISTS segnode_schema (version INTEGER PRIMARY KEY, release TEXT NOT NULL, "
    "applied REAL NOT NULL, how TEXT NOT NULL)"
)


class SchemaError(RuntimeError):
    """A store this release cannot open (written by a newer release, or a migration failed)."""


@dataclass(frozen=True)
class Schema:
    """A store's schema at ``version`` and the steps from each older version to the next.

    ``create``: statements that make the current schema in an empty file (``IF NOT EXISTS``, so
    they also add the tables and indexes a migration leaves to them). ``migrations[n]``: statements
    that turn version ``n`` into ``n + 1``, run inside the migration's transaction (plain ``execute``,
    one statement each: ``executescript`` would commit half-way).
    """

    name: str  # for messages: "job store"
    version: int
    create: tuple[str, ...]
    migrations: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [n for n in range(self.version) if n not in self.migrations]
        if missing:
            raise ValueError(f"{self.name}: no migration from version(s) {missing}")


def statements(script: str) -> tuple[str, ...]:
    """A DDL script (no ``;`` or ``--`` inside literals) split into single statements, comments dropped."""
    script = re.sub(r"--[^\n]*", "", script)
    return tuple(s.strip() for s in script.split(";") if s.strip())


def connect_durable(path: Path) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with ``synchronous=FULL``: a committed row survives a
    power cut. One per thread (callers keep it in a ``threading.local``); waits up to 30 s on locks."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _release() -> str:
    from node import __version__

    return __version__


def written_by(db: sqlite3.Connection) -> str | None:
    """The release that last created or migrated this store (None before version 1)."""
    try:
        row = db.execute("SELECT release FROM segnode_schema ORDER BY version DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


def _too_new(path: Path, schema: Schema, found: int, db: sqlite3.Connection) -> SchemaError:
    by = written_by(db)
    return SchemaError(
        f"{path} has {schema.name} schema version {found}"
        + (f" (written by segnode {by})" if by else "")
        + f"; segnode {_release()} reads up to version {schema.version}. Run a release that knows version "
        f"{found}, or restore a backup made by segnode {_release()}."
    )


def backup_copy(source: Path | sqlite3.Connection, target: Path) -> Path:
    """A consistent copy of a SQLite database through the online backup API (readers and writers
    may go on meanwhile; the copy is one committed state). ``target`` is replaced if it exists."""
    target.unlink(missing_ok=True)
    src = (
        source
        if isinstance(source, sqlite3.Connection)
        else sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    )
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
    finally:
        if src is not source:
            src.close()
    return target


def ensure_schema(db: sqlite3.Connection, path: Path, schema: Schema) -> int | None:
    """Bring the store open on ``db`` (autocommit) to ``schema.version``; returns the version it
    migrated from, or None when there was nothing to migrate (current or newly created)."""
    found = user_version(db)
    if found == schema.version:
        return None
    if found > schema.version:
        raise _too_new(path, schema, found, db)
    db.execute("BEGIN IMMEDIATE")  # one writer: another process cannot migrate or write meanwhile
    try:
        found = user_version(db)
        if found > schema.version:
            raise _too_new(path, schema, found, db)
        if found == schema.version:
            db.execute("COMMIT")
            return None
        empty = (
            db.execute("SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchone()[0] == 0
        )
        if empty:
            how, migrated_from = "created", None
        else:
            # A second connection reads the committed state we are about to change (WAL: our
            # write lock does not block readers); the copy is the store as it was, to go back to.
            backup_copy(Path(path), Path(f"{path}.v{found}.bak"))
            for step in range(found, schema.version):
                for statement in schema.migrations[step]:
                    db.execute(statement)
            how, migrated_from = f"migrated from version {found}", found
        for statement in (*schema.create, HISTORY_TABLE):
            db.execute(statement)
        db.execute(
            "INSERT OR REPLACE INTO segnode_schema VALUES (?,?,?,?)",
            (schema.version, _release(), time.time(), how),
        )
        db.execute(f"PRAGMA user_version = {int(schema.version)}")
        db.execute("COMMIT")
    except BaseException as exc:
        db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise SchemaError(
                f"{path}: migrating the {schema.name} from version {found} to "
                f"{schema.version} failed ({exc}); the store is unchanged"
            ) from exc
        raise
    return migrated_from


def open_store(path: Path, schema: Schema) -> sqlite3.Connection:
    """A durable connection to the store at ``path``, its schema brought to ``schema.version``."""
    db = connect_durable(path)
    try:
        ensure_schema(db, path, schema)
    except BaseException:
        db.close()
        raise
    return db
