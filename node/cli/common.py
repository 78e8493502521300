"""What every ``segnode`` command shares: the consoles, the settings, errors, progress, volume loading."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from node.config import ConfigError, Settings, load_settings

class _Console(Console):
    """Rich's console, except that output to a file or pipe is not cut at 80 columns: tables keep their
    natural width there (``COLUMNS`` still sets a width)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if not self.is_terminal and self._width is None and "COLUMNS" not in self._environ:
            return ConsoleDimensions(UNCUT_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


#: Columns for output that is not a terminal: as wide as any table needs.
UNCUT_WIDTH = 1000
out = _Console()
err = _Console(stderr=True)


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


def positional_or_option(positional: Optional[Path], option: Optional[Path], name: str, flag: str) -> Path:
    """One value given either way: ``run INPUT OUTDIR`` or TotalSegmentator's ``-i INPUT -o OUTDIR``,
    ``blender MESHDIR OUT.blend`` or the seed importer's ``--stl-dir MESHDIR --save OUT.blend``."""
    if positional is not None and option is not None and positional != option:
        raise fail(f"{name} given twice: {positional} and {flag} {option}", 2)
    if positional is None and option is None:
        raise fail(f"missing {name}: give it after the command or as {flag}", 2)
    return positional or option  # type: ignore[return-value]


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


def _start_logging(config: Settings | None = None) -> None:
    """Logging for this command (:mod:`node.logs`). ``config`` given (the long-running commands):
    its ``[node] log_*`` settings, reloaded on SIGHUP. None (every command, before it runs): from
    the config file if it is valid (a command that needs it reports it otherwise), at WARNING or
    above, so that one-shot commands print warnings and errors but not the libraries' progress."""
    from node import logs

    least = None
    if config is None:
        least = "WARNING"
        try:
            config = load_settings(_State.config_path)
        except ConfigError:
            config = None
    logs.setup(config, reload_settings=lambda: load_settings(_State.config_path), least=least)


def _load_volume(path: Path, series: Optional[str]):
    from node.dicom.series import VolumeError, read_series
    from node.logs import register_path
    from node.nifti import read_nifti

    if path.name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    register_path(path)  # its patient's values are scrubbed from logs and console (node.logs)
    try:
        with progress_bar(f"Reading {path.name}") as update:
            return read_series(
                path, series, spacing_tolerance=settings().volume.spacing_tolerance, progress=update
            )
    except VolumeError as exc:
        raise fail(f"{path}: {exc} [{exc.code}]") from None
