"""``segnode outbox``: deliveries of results to the destinations, their state, retry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from node.cli.common import fail, out, settings

outbox_app = typer.Typer(help="Deliveries of results to the destinations: state, retry.", no_args_is_help=True)


def _open_outbox(with_jobs: bool = False):
    """The node's outbox (``<data_dir>/outbox.db``), safe beside a running ``serve`` (no recovery)."""
    from node.export.outbox import Outbox

    config = settings()
    if not (Path(config.node.data_dir) / "outbox.db").exists():
        raise fail(f"no outbox in {config.node.data_dir} (nothing was queued yet)")
    store = None
    if with_jobs:
        from node.jobs import open_store

        store = open_store(config)
    return Outbox.from_settings(config, on_change=store.set_destinations if store else None, recover=False), store


@outbox_app.command("status")
def outbox_status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Deliveries per destination: pending, delivering, delivered, failed, cancelled; next attempt, last error."""
    import datetime as dt

    from node.export.outbox import STATES

    config = settings()
    if not (Path(config.node.data_dir) / "outbox.db").exists():  # nothing queued yet: not an error
        rows = [{"destination": d.name, "kind": d.kind, **{s: 0 for s in STATES}, "next_attempt": None,
                 "last_error": None} for d in config.destinations]
    else:
        outbox, _ = _open_outbox()
        try:
            rows = outbox.status()
        finally:
            outbox.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="outbox", title_justify="left")
    for column in ("destination", "kind", "pending", "delivering", "delivered", "failed", "cancelled",
                   "next attempt"):
        table.add_column(column)
    table.add_column("last error", overflow="fold")
    for r in rows:
        nxt = dt.datetime.fromtimestamp(r["next_attempt"]).strftime("%H:%M:%S") if r["next_attempt"] else ""
        table.add_row(escape(r["destination"]), r["kind"], *(str(r[k]) for k in
                      ("pending", "delivering", "delivered", "failed", "cancelled")), nxt,
                      escape(r["last_error"] or ""))
    out.print(table)


@outbox_app.command("retry")
def outbox_retry(
    destination: Annotated[Optional[str], typer.Option(help="Only this destination.")] = None,
    job: Annotated[Optional[str], typer.Option(help="Only this job's deliveries.")] = None,
) -> None:
    """Failed deliveries are due again, with fresh attempts (a running node sends them within a second)."""
    outbox, store = _open_outbox(with_jobs=True)
    try:
        count = outbox.retry(destination=destination, job_id=job)
    finally:
        outbox.close()
        if store is not None:
            store.close()
    out.print(f"{count} failed deliver{'y' if count == 1 else 'ies'} queued again", highlight=False)
