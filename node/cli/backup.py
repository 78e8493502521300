"""``segnode backup`` and ``segnode restore``: the node's stores, staged deliveries, corrections and config
in one tar file, taken while it runs (see :mod:`node.backup`).

Top-level commands: ``node/cli/__init__.py`` registers them on the app, in ``--help``'s order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import err, fail, out, settings


def backup_command(
    archive: Annotated[Path, typer.Argument(help="The tar file to write (outside the data folder).")],
    results: Annotated[bool, typer.Option("--results", help="Also the results folders of the jobs.")] = False,
    spool: Annotated[
        bool, typer.Option("--spool", help="Also the received instances (queued jobs need them).")
    ] = False,
) -> None:
    """A consistent copy of the job store, outbox, annotation log and config while the node runs
    (SQLite's online backup API), with a manifest of versions and schema versions."""
    from node.backup import BackupError, backup

    config = settings()
    try:
        with err.status(f"Backing up {config.node.data_dir}"):
            manifest = backup(config, archive, results=results, spool=spool)
    except BackupError as exc:
        raise fail(f"{exc} [{exc.code}]", 2 if exc.code in ("not_found", "inside_data_dir") else 1) from None
    for name, info in manifest["stores"].items():
        tables = ", ".join(f"{t} {n}" for t, n in info["tables"].items() if t != "segnode_schema")
        out.print(f"{name}: schema {info['schema_version']}, {tables}", highlight=False, soft_wrap=True)
    files = ", ".join(f"{k} {v}" for k, v in manifest["files"].items())
    out.print(
        f"files: {files}; jobs {manifest.get('jobs', {})}; deliveries {manifest.get('deliveries', {})}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"wrote {archive} (segnode {manifest['segnode']}, from {manifest['data_dir']})",
        highlight=False,
        soft_wrap=True,
    )


def restore_command(
    archive: Annotated[Path, typer.Argument(help="A tar file written by `segnode backup`.")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="The data folder to restore into (empty).")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace what the backup holds in a non-empty folder no node is using."),
    ] = False,
) -> None:
    """Bring a node back from a backup into DATA_DIR; its paths are moved to the new folder."""
    from node.backup import BackupError, restore

    try:
        manifest = restore(archive, data_dir, force=force)
    except BackupError as exc:
        raise fail(f"{exc} [{exc.code}]", 2 if exc.code in ("not_a_backup", "not_empty") else 1) from None
    done = manifest["restored"]
    out.print(
        f"restored {done['files']} files of a backup by segnode {manifest['segnode']} ({manifest['created']}) "
        f"into {done['data_dir']}; jobs {manifest.get('jobs', {})}, deliveries {manifest.get('deliveries', {})}",
        highlight=False,
        soft_wrap=True,
    )
    if "file" in manifest["config"]:
        out.print(
            f"its config is in {done['data_dir']}/{manifest['config']['file']['name']}: point [node] data_dir "
            f"at {done['data_dir']} (or SEGNODE_NODE__DATA_DIR) before `segnode serve`",
            highlight=False,
            soft_wrap=True,
        )
