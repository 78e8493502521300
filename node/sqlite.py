"""SQLite as the node's durable stores use it (jobs, outbox, annotation log)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect_durable(path: Path) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with ``synchronous=FULL``: a committed row survives a
    power cut. One per thread (callers keep it in a ``threading.local``); waits up to 30 s on locks."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
