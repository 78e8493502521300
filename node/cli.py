"""The ``segnode`` command: one Typer app for every task the node offers."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node import __version__
from node.config import ConfigError, Settings, load_settings, masked_dict

app = typer.Typer(
    name="segnode",
    help="A DICOM segmentation node: receive series, segment them, send DICOM-SEG back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check the node's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)


class _State:
    config_path: Optional[Path] = None


def settings() -> Settings:
    """The effective settings; an invalid config ends the command with one line and exit 2."""
    try:
        return load_settings(_State.config_path)
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar; yields ``update(done, total)``."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _version(value: bool) -> None:
    if value:
        out.print(f"segnode {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="TOML config file (default: configs/node.toml).")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _State.config_path = config


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False,
) -> None:
    """Print the effective configuration (file + SEGNODE_* environment), secrets masked."""
    import tomli_w

    data = masked_dict(settings())
    if as_json:
        out.print_json(json.dumps(data))
        return

    def drop_none(value):
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value

    typer.echo(tomli_w.dumps(drop_none(data)), nl=False)


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration; exit 2 with the bad key and value if it is invalid."""
    settings()
    out.print("config ok")


@app.command("phantom")
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Folder for dicom/, labels.nii.gz, ct.nii.gz, classes.json.")],
    size: Annotated[str, typer.Option(help="Columns,rows,slices.")] = "256,256,160",
    spacing: Annotated[str, typer.Option(help="Millimetres along columns,rows,slices.")] = "0.8,0.8,1.5",
    seed: Annotated[int, typer.Option(help="Same seed, same phantom (pixels and UIDs).")] = 0,
    tiny: Annotated[bool, typer.Option("--tiny", help="64x64x40 at 3.2x3.2x6 mm, for quick checks.")] = False,
) -> None:
    """Write a synthetic contrast-enhanced abdominal CT series with its exact label map."""
    from node.phantom import TINY, PhantomSpec, write_phantom

    try:
        if tiny:
            spec = PhantomSpec(size=TINY.size, spacing=TINY.spacing, seed=seed)
        else:
            spec = PhantomSpec(
                size=tuple(int(v) for v in size.split(",")),
                spacing=tuple(float(v) for v in spacing.split(",")),
                seed=seed,
            )
    except ValueError as exc:
        raise fail(f"--size/--spacing need three comma-separated numbers: {exc}", 2) from None
    with err.status("Building phantom"):
        paths = write_phantom(spec, out_dir)
    for kind, path in paths.items():
        out.print(f"{kind:>8}: {path}")


@app.command("volume-info")
def volume_info(
    path: Annotated[Path, typer.Argument(help="A folder, zip or file of DICOM, or a NIfTI file.")],
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Build the volume from PATH and print its geometry, or say exactly why it is refused."""
    volume = _load_volume(path, series)
    g = volume.geometry
    info = {
        "shape_ijk": list(volume.shape_ijk),
        "dtype": str(volume.array.dtype),
        "origin_lps": list(g.origin),
        "spacing": list(g.spacing),
        "direction": [list(r) for r in g.direction],
        "affine_ras": g.affine_ras.round(6).tolist(),
        "value_range": [float(volume.array.min()), float(volume.array.max())],
        "series_uid": volume.source.series_uid if volume.source else None,
        "modality": volume.source.modality if volume.source else None,
        "notes": volume.notes,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command("convert")
def convert(
    path: Annotated[Path, typer.Argument(help="A folder, zip or file of DICOM.")],
    output: Annotated[Path, typer.Argument(help="Output .nii or .nii.gz file.")],
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
) -> None:
    """Convert a DICOM series to NIfTI with its exact geometry."""
    from node.nifti import write_nifti

    if not output.name.endswith((".nii", ".nii.gz")):
        raise fail(f"output must end in .nii or .nii.gz, got {output.name}", 2)
    volume = _load_volume(path, series)
    write_nifti(volume, output)
    out.print(f"wrote {output} ({'x'.join(map(str, volume.shape_ijk))}, {volume.array.dtype})")


def _load_volume(path: Path, series: Optional[str]):
    from node.dicom.series import VolumeError, read_series
    from node.nifti import read_nifti

    if path.name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    try:
        with progress_bar(f"Reading {path.name}") as update:
            return read_series(
                path, series, spacing_tolerance=settings().volume.spacing_tolerance, progress=update
            )
    except VolumeError as exc:
        raise fail(f"{path}: {exc} [{exc.code}]") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
