"""``segnode config``: show or check the node's configuration."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape

from node.cli.common import err, out, settings
from node.config import config_warnings, masked_dict

config_app = typer.Typer(help="Show or check the node's configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False,
) -> None:
    """Print the effective configuration (file + SEGNODE_* environment), secrets masked."""
    import tomli_w

    config = settings()
    data = masked_dict(config)
    if as_json:
        err.print(f"config: {escape(config.source.describe())}", highlight=False, soft_wrap=True)
        out.print_json(json.dumps(data))
        return

    def drop_none(value):
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value

    typer.echo(f"# config: {config.source.describe()}\n" + tomli_w.dumps(drop_none(data)), nl=False)


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration; exit 2 with the bad key and value if it is invalid. Names the file
    used and the data folder; warns (exit 0) about a DICOM listener open to anyone."""
    config = settings()
    for warning in config_warnings(config):
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
    out.print(escape(f"config ok: {config.source.describe()}; data_dir {config.node.data_dir}"), highlight=False,
              soft_wrap=True)
