"""``segnode xnat``: XNAT case folders, inventory, per-object NIfTI and clean DICOM-SEG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from node.cli.common import fail, out, progress_bar

xnat_app = typer.Typer(
    help="XNAT case folders (SCANS + ASSESSORS): inventory, per-object NIfTI, clean DICOM-SEG.",
    no_args_is_help=True,
)


_XnatPath = Annotated[Path, typer.Argument(help="A case folder or a parent of case folders.")]
_XnatOut = Annotated[Path, typer.Argument(help="Output folder (a sub-folder per case).")]
_XnatNames = Annotated[
    Optional[list[str]], typer.Option("--name", help="SEG name or folder (repeatable).")
]
_XnatSheet = Annotated[
    Optional[Path], typer.Option("--sheet", help="CSV/XLSX: case and name(s) columns.")
]
_XnatCaseCol = Annotated[Optional[str], typer.Option("--case-column", help="Sheet column: case.")]
_XnatNameCol = Annotated[Optional[str], typer.Option("--name-column", help="Sheet column: names.")]
_XnatSheetName = Annotated[Optional[str], typer.Option("--sheet-name", help="XLSX worksheet.")]
_XnatMerge = Annotated[
    Optional[list[str]], typer.Option("--merge", help="NEW=A+B+C (repeatable).")
]
_XnatOverw = Annotated[bool, typer.Option("--overwrite", help="Rewrite existing outputs.")]
_XnatJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@xnat_app.command("inventory")
def xnat_inventory(path: _XnatPath, out_dir: _XnatOut, as_json: _XnatJson = False) -> None:
    """Write StudySeries_info.json and Segmentations_info.json per case (headers and catalogs only)."""
    from node.xnat.inventory import XnatError, run_inventory

    try:
        with progress_bar("XNAT inventory") as update:
            summaries = run_inventory(path, out_dir, progress=lambda done, total, _case: update(done, total))
    except XnatError as exc:
        raise fail(f"{exc} [{exc.code}]", 2) from None
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    table = Table(title=f"XNAT inventory of {path} in {out_dir}", title_justify="left")
    for column in ("case", "series", "segmentations", "problems"):
        table.add_column(column)
    for s in summaries:
        problems = "; ".join(f"{p.get('where', '')} {p['code']}".strip() for p in s["problems"])
        table.add_row(s["case"], str(s["series"]), str(s["segmentations"]), escape(problems))
    out.print(table)


def _xnat_run(mode: str, path: Path, out_dir: Path, names: Optional[list[str]], sheet: Optional[Path],
              case_column: Optional[str], name_column: Optional[str], sheet_name: Optional[str],
              merge: Optional[list[str]], overwrite: bool, as_json: bool) -> None:
    from node.xnat.export import ExportError, ExportOptions, failed, parse_merge, run
    from node.xnat.inventory import XnatError
    from node.logs import register_path
    from node.xnat.select import Selection, SelectionError, read_sheet

    register_path(path)  # one header per folder: every case's patient
    try:
        table = read_sheet(sheet, case_column, name_column, sheet_name) if sheet is not None else None
        merges = tuple(parse_merge(m) for m in merge or [])
        options = ExportOptions(Selection(tuple(names or ()), table), merges, overwrite)
        with progress_bar(f"XNAT {mode}") as update:
            # Outbox hook: run(..., deliver=callable(seg_path, report)) is called for each SEG written.
            reports = run(path, out_dir, options, mode=mode, progress=lambda d, t, _case: update(d, t))
    except (SelectionError, ExportError, XnatError) as exc:
        raise fail(f"{exc} [{exc.code}]", 2) from None
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
    else:
        shown = Table(title=f"XNAT {mode}: {path} -> {out_dir}", title_justify="left")
        for column in ("case", "segmentation", "name", "series", "placement", "objects", "result"):
            shown.add_column(column, overflow="fold")
        messages = []
        for report in reports:
            for p in report.get("problems", []):
                messages.append(f"{report['case']}: {p['code']}: {p['message']}")
            for folder, s in report["segmentations"].items():
                objects = s.get("objects", [])
                statuses = sorted({o.get("status", s.get("status", "")) for o in objects} - {""})
                result = ", ".join(statuses or [s.get("status", "")])
                if s.get("error"):
                    result = f"[red]{escape(s['error']['code'])}[/red]"
                    messages.append(f"{report['case']}/{folder}: {s['error']['code']}: {s['error']['message']}")
                shown.add_row(report["case"], folder, escape(str(s.get("name") or "")),
                              str(s.get("series_folder") or ""), (s.get("placement") or {}).get("method", ""),
                              str(len(objects)), result)
        out.print(shown)
        for message in messages:
            out.print(escape(message), highlight=False, soft_wrap=True)
    if failed(reports):
        raise typer.Exit(1)


@xnat_app.command("export")
def xnat_export(path: _XnatPath, out_dir: _XnatOut, name: _XnatNames = None, sheet: _XnatSheet = None,
                case_column: _XnatCaseCol = None, name_column: _XnatNameCol = None,
                sheet_name: _XnatSheetName = None, merge: _XnatMerge = None, overwrite: _XnatOverw = False,
                as_json: _XnatJson = False) -> None:
    """Selected SEGs as NIfTI: {series}.nii.gz, {series}_ON_{object}_FN_{segfolder}.nii.gz per object."""
    _xnat_run("export", path, out_dir, name, sheet, case_column, name_column, sheet_name, merge, overwrite,
              as_json)


@xnat_app.command("to-seg")
def xnat_to_seg(path: _XnatPath, out_dir: _XnatOut, name: _XnatNames = None, sheet: _XnatSheet = None,
                case_column: _XnatCaseCol = None, name_column: _XnatNameCol = None,
                sheet_name: _XnatSheetName = None, merge: _XnatMerge = None, overwrite: _XnatOverw = False,
                as_json: _XnatJson = False) -> None:
    """Selected SEGs as standard DICOM-SEG: <case>/SEG/{series}_SEG_FN_{segfolder}.dcm.

    Send them to the archive with `segnode send OUT/<case>/SEG --to HOST:PORT`.
    """
    _xnat_run("to-seg", path, out_dir, name, sheet, case_column, name_column, sheet_name, merge, overwrite,
              as_json)
