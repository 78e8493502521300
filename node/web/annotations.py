"""The annotation log: one row per saved correction, in SQLite (``<data_dir>/annotations.sqlite``),
downloadable as CSV (``GET /api/annotations.csv``).

Each row says who saved which SEG version of which series, based on what, which slices were edited
and which labels changed there. It is also the node's record of correction versions: the editor asks
it for a series' latest version (to load it) and the next version number (to write one).

Columns, in CSV order (:data:`COLUMNS`): ``time`` (UTC, ISO 8601), ``user``, ``study_uid``,
``series_uid`` (the source image series), ``seg_uid`` (SOPInstanceUID of the new SEG),
``seg_series_uid``, ``version``, ``base`` (what the edit started from), ``slices`` (edited slice
indices, 0-based along the slice normal, ``;``-separated), ``source_instances`` (the SOP instance UIDs
of those slices), ``labels`` (names of the labels whose voxels changed on them), ``voxels_changed``,
``path`` (the SEG file kept under ``<data_dir>/corrections``) and ``delivery`` (where it was sent).
"""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.sqlite import Schema, connect_durable, open_store, statements

#: ``annotations.sqlite``. Version 0: segnode 0.1.0 (unversioned); 1: the same table, versioned.
SCHEMA = Schema("annotation log", 1, statements("""
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    user TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    seg_uid TEXT NOT NULL,
    seg_series_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    base TEXT NOT NULL,
    slices TEXT NOT NULL,
    source_instances TEXT NOT NULL,
    labels TEXT NOT NULL,
    voxels_changed INTEGER NOT NULL,
    path TEXT NOT NULL,
    delivery TEXT NOT NULL,
    UNIQUE (series_uid, version)
);
CREATE INDEX IF NOT EXISTS annotations_series ON annotations (series_uid, version);
"""), migrations={0: ()})


@dataclass(frozen=True)
class Annotation:
    """One saved correction."""

    user: str
    study_uid: str
    series_uid: str
    seg_uid: str
    seg_series_uid: str
    version: int
    base: str
    slices: tuple[int, ...]
    source_instances: tuple[str, ...]
    labels: tuple[str, ...]
    voxels_changed: int
    path: str
    delivery: str
    time: str = ""


COLUMNS = ("time", *(f.name for f in fields(Annotation) if f.name != "time"))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VersionTaken(Exception):
    """Another save recorded this version of the series first."""


class AnnotationLog:
    """Thread-safe; one connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._local.db = open_store(self.path, SCHEMA)
        self._local.db.row_factory = sqlite3.Row

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect_durable(self.path)
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def append(self, entry: Annotation) -> dict[str, Any]:
        """Record ``entry`` (its ``time`` set now if empty); :class:`VersionTaken` if the version exists."""
        row = asdict(entry)
        row["time"] = row["time"] or now_iso()
        row["slices"] = ";".join(str(k) for k in entry.slices)
        row["source_instances"] = ";".join(entry.source_instances)
        row["labels"] = ";".join(entry.labels)
        try:
            self._db().execute(
                f"INSERT INTO annotations ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [row[c] for c in COLUMNS])
        except sqlite3.IntegrityError:
            raise VersionTaken(f"version {entry.version} of series {entry.series_uid} exists") from None
        return {c: row[c] for c in COLUMNS}

    def rows(self, series_uid: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        """Oldest first."""
        where, args = ("WHERE series_uid = ?", [series_uid]) if series_uid else ("", [])
        found = self._db().execute(
            f"SELECT {', '.join(COLUMNS)} FROM annotations {where} ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [dict(r) for r in found]

    def latest(self, series_uid: str) -> dict[str, Any] | None:
        """The newest version saved for a series, or None."""
        row = self._db().execute(
            f"SELECT {', '.join(COLUMNS)} FROM annotations WHERE series_uid = ? ORDER BY version DESC LIMIT 1",
            (series_uid,)).fetchone()
        return dict(row) if row else None

    def csv(self, series_uid: str | None = None) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows(series_uid))
        return buffer.getvalue()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
