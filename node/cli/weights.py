"""``segnode weights``: TotalSegmentator weights, what is installed and offline import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from node.cli.common import err, fail, out, settings

weights_app = typer.Typer(help="TotalSegmentator weights: what is installed; offline import.", no_args_is_help=True)


def _weights_home(weights_dir: Optional[Path]) -> Path:
    from node.segment.weights import home_dir

    return weights_dir if weights_dir is not None else home_dir(settings())


@weights_app.command("status")
def weights_status(
    weights_dir: Annotated[
        Optional[Path], typer.Option("--weights-dir", help="TotalSegmentator home (default: from the config).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List TotalSegmentator's tasks and modes with the dataset folders each needs, and which are present."""
    from dataclasses import asdict

    from node.segment.weights import (
        NO_CHECKSUM,
        WeightsError,
        installed_datasets,
        package_version,
        results_dir,
        task_status,
        weights_zip,
    )

    home = _weights_home(weights_dir)

    def dataset_id(folder: str) -> int:  # Dataset297_TotalSegmentator_total_3mm_1559subj -> 297
        return int(folder.rsplit("/", 1)[-1].split("_")[0].removeprefix("Dataset"))

    try:
        status = task_status(home)
        zips = {i: weights_zip(i) for s in status for m in s.modes for i in map(dataset_id, m.datasets)}
    except WeightsError as exc:
        raise fail(f"{exc} [{exc.code}]") from None
    checksums = next((z.checksum for z in zips.values() if z.checksum), None) or NO_CHECKSUM.format(
        version=package_version())
    if as_json:
        data = {
            "totalsegmentator_version": package_version(),
            "weights_dir": str(home),
            "installed": installed_datasets(home),
            "tasks": [{**asdict(s), "ready_modes": s.ready_modes, "zips": {
                m.mode: [zips[dataset_id(f)].zip for f in m.datasets] for m in s.modes}} for s in status],
            "zips": {str(i): asdict(z) for i, z in sorted(zips.items())},
            "checksums": checksums,
        }
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"TotalSegmentator {package_version()} weights in {results_dir(home)}", title_justify="left")
    for column in ("task", "mode", "modality", "licence", "datasets", "status"):
        table.add_column(column)

    def ids(folders) -> str:
        return " ".join(str(dataset_id(f)) for f in folders)

    ready, missing = 0, set()
    for s in status:
        for m in s.modes:
            ready += m.ready
            missing |= {dataset_id(f) for f in m.missing}
            state = "[green]ready[/green]" if m.ready else f"[red]missing {ids(m.missing)}[/red]"
            table.add_row(s.task, m.mode, s.modality, "yes" if s.license_required else "", ids(m.datasets), state)
    out.print(table)
    if missing:
        where = Table(title="Missing datasets: the zips TotalSegmentator distributes (from its weights table)",
                      title_justify="left")
        for column in ("dataset", "zip", "where"):
            where.add_column(column, overflow="fold")
        for i in sorted(missing):
            z = zips[i]
            where.add_row(str(i), z.zip or "-", z.release_page or z.where)
        out.print(where)
    modes = sum(len(s.modes) for s in status)
    out.print(f"{ready} of {modes} task modes ready; import weights with `segnode weights import ZIP|DIR` "
              f"({checksums})", highlight=False, soft_wrap=True)


@weights_app.command("import")
def weights_import(
    source: Annotated[
        Path, typer.Argument(help="A TotalSegmentator weights zip, a DatasetNNN_* folder, or a folder of them.")
    ],
    weights_dir: Annotated[
        Optional[Path], typer.Option("--weights-dir", help="TotalSegmentator home (default: from the config).")
    ] = None,
    sha256: Annotated[Optional[str], typer.Option(
        "--sha256", help="The zip's expected SHA-256 (TotalSegmentator records none): refused if it differs.")
    ] = None,
) -> None:
    """Install TotalSegmentator weights offline (idempotent: identical datasets are left as they are)."""
    from node.segment.weights import NO_CHECKSUM, WeightsError, import_weights, package_version, results_dir

    home = _weights_home(weights_dir)
    try:
        with err.status(f"Importing {source.name}"):
            imported = import_weights(source, home, expected_sha256=sha256)
    except WeightsError as exc:
        raise fail(f"{exc} [{exc.code}]", 2 if exc.code in ("not_found", "no_datasets", "bad_zip", "not_a_zip")
                   else 1) from None
    for item in imported:
        line = f"{item.action:>9}: {item.name}"
        out.print(line + (f"  ({item.note})" if item.note else ""), highlight=False, soft_wrap=True)
    for digest in dict.fromkeys(i.sha256 for i in imported if i.sha256):
        check = "as given with --sha256" if sha256 else f"{NO_CHECKSUM.format(version=package_version())}: " \
                                                        "compare it with a value you trust, or pass --sha256"
        out.print(f"   sha256: {digest} ({check})", highlight=False, soft_wrap=True)
    out.print(f"weights in {results_dir(home)}", highlight=False, soft_wrap=True)
