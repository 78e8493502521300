"""The ``segnode`` command: one Typer app for every task the node offers.

The commands live in one module per sub-app (``config``, ``rules``, ``weights``, ``xnat``, ``seg``,
``outbox``) or per family of top-level commands (``volumes``, ``network``, ``artifacts``); their shared
helpers in ``common``. This module builds the app and registers them all, in the order ``--help`` lists
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from node import __version__
from node.cli.admin import doctor_command, install_service_command
from node.cli.artifacts import blender_command, mesh_command, slices_command
from node.cli.backup import backup_command, restore_command
from node.cli.common import _start_logging, _State, fail, out
from node.cli.config import config_app
from node.cli.flags import FlagsGroup, install
from node.cli.network import listen_command, send_command, serve_command, viewer_command, worker_command
from node.cli.outbox import outbox_app
from node.cli.rules import rules_app
from node.cli.seg import seg_app
from node.cli.volumes import convert, phantom, run, volume_info
from node.cli.weights import weights_app
from node.cli.xnat import xnat_app

def hoist_config(args: list[str]) -> list[str]:
    """``--config FILE`` (or ``--config=FILE``) anywhere before ``--`` moves to the front, where the
    app's option is parsed: ``segnode serve --config x.toml`` works as ``segnode --config x.toml serve``."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--config" and i + 1 < len(args):
            front += args[i : i + 2]
            i += 2
            continue
        (front if arg.startswith("--config=") else rest).append(arg)
        i += 1
    if len([a for a in front if a.startswith("--config")]) > 1:
        raise typer.BadParameter("given more than once", param_hint="--config")
    return front + rest


class _Segnode(FlagsGroup):
    """The app's group: ``--config`` anywhere; the seed tools' spellings (:mod:`node.cli.flags`)."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        install(self)

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        return super().parse_args(ctx, hoist_config(list(args)))

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        from node.sqlite import SchemaError

        try:
            return super().invoke(ctx)
        except SchemaError as exc:  # a store of a newer release: one line, and no restart helps (exit 2)
            raise fail(str(exc), 2) from None


app = typer.Typer(
    cls=_Segnode,
    name="segnode",
    help="A DICOM segmentation node: receive series, segment them, send DICOM-SEG back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"segnode {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", show_default=False, help=(
            "TOML config file, here or after the command (default: $SEGNODE_CONFIG, else ./configs/node.toml, "
            "else /etc/segnode/node.toml, else built-in defaults)."))
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _State.config_path = config
    _start_logging()  # every command logs through node.logs: scrubbed, warnings included


app.command("phantom")(phantom)
app.command("volume-info")(volume_info)
app.command("convert")(convert)
app.command("send")(send_command)
app.command("listen")(listen_command)
app.command("run")(run)
app.command("serve")(serve_command)
app.command("worker")(worker_command)
app.command("viewer")(viewer_command)
app.command("mesh")(mesh_command)
app.command("slices")(slices_command)
app.command("blender")(blender_command)
app.command("install-service")(install_service_command)
app.command("doctor")(doctor_command)
app.command("backup")(backup_command)
app.command("restore")(restore_command)

app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")
app.add_typer(weights_app, name="weights")
app.add_typer(xnat_app, name="xnat")
app.add_typer(seg_app, name="seg")
app.add_typer(outbox_app, name="outbox")


def main() -> None:
    import sys

    app(args=sys.argv[1:])

