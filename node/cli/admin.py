"""Running the node as a service: ``install-service`` (systemd units, user, folders) and ``doctor``.

Top-level commands: ``node/cli/__init__.py`` registers them on the app, in ``--help``'s order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from node.cli.common import _State, err, fail, out


def install_service_command(
    user: Annotated[str, typer.Option(help="The system user (and group) the node runs as.")] = "segnode",
    root: Annotated[
        Path,
        typer.Option(
            help="Write under this folder instead of / (packaging, tests): no user, no owners, no reload."
        ),
    ] = Path("/"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the units and what would be done.")
    ] = False,
) -> None:
    """Install systemd units for `serve` and per-GPU `worker@N` (config: --config, default
    /etc/segnode/node.toml; a starter one is written if it does not exist)."""
    import os

    from node.config import ConfigError, load_settings, setting_variables
    from node.service import (
        DEFAULT_CONFIG,
        DEFAULT_DATA_DIR,
        STARTER_CONFIG,
        ServiceError,
        install,
        next_steps,
        plan,
        render_serve,
        render_worker,
    )

    config = Path(_State.config_path or DEFAULT_CONFIG).absolute()
    root = root.absolute()
    on_disk = config if config.is_file() else root / config.relative_to(config.anchor)
    starter = None
    try:
        if on_disk.is_file():
            settings = load_settings(on_disk, environment=False)
        else:
            starter = STARTER_CONFIG.format(data_dir=DEFAULT_DATA_DIR)
            with tempfile.TemporaryDirectory() as folder:
                draft = Path(folder) / "node.toml"
                draft.write_text(starter, encoding="utf-8")
                settings = load_settings(draft, environment=False)
        service = plan(settings, config, user=user)
        if dry_run:
            typer.echo(f"# {root / 'etc/systemd/system/segnode.service'}\n{render_serve(service)}")
            typer.echo(f"# {root / 'etc/systemd/system/segnode-worker@.service'}\n{render_worker(service)}")
        done = install(service, root, starter_config=starter, dry_run=dry_run)
    except (ConfigError, ServiceError) as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:
        raise fail(f"cannot install: {exc}") from None
    for line in done:
        out.print(escape(line), highlight=False, soft_wrap=True)
    ignored = [name for name in os.environ if name.upper() in setting_variables()]
    if ignored:
        err.print(
            escape(
                f"note: {', '.join(sorted(ignored))} in this shell is not part of the service; put "
                "it in the config file or a drop-in (systemctl edit segnode)"
            ),
            highlight=False,
            soft_wrap=True,
        )
    if not dry_run:
        out.print("next:", highlight=False)
        for line in next_steps(service):
            out.print(escape(f"  {line}"), highlight=False, soft_wrap=True)


def doctor_command(
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of text.")] = False,
) -> None:
    """Check what an administrator would: config, data folder, disk, ports, TLS, destinations, Orthanc,
    Redis, weights, torch's device, Blender. One line each, ok/warn/fail with the fix; exit 1 on a fail."""
    import json

    from node.config import ConfigError, load_settings
    from node.doctor import Finding, run_checks

    try:
        findings = run_checks(load_settings(_State.config_path))
    except ConfigError as exc:
        findings = [Finding("fail", "config", str(exc), "fix the config (segnode config check)")]
    width = max(len(f.check) for f in findings)
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    for f in findings:
        if as_json:
            typer.echo(json.dumps(f.as_dict()))
            continue
        out.print(
            f"[{colour[f.status]}]{f.status:<4}[/] {escape(f.check.ljust(width))}  {escape(f.detail)}",
            highlight=False,
            soft_wrap=True,
        )
        if f.fix and f.status != "ok":
            out.print(escape(f"     {' ' * width}  fix: {f.fix}"), highlight=False, soft_wrap=True)
    if any(f.status == "fail" for f in findings):
        raise typer.Exit(1)
