"""``segnode seg``: describe a DICOM-SEG, or convert it to NIfTI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from node.cli.common import fail, out

seg_app = typer.Typer(help="DICOM-SEG: describe one, or convert it to NIfTI.", no_args_is_help=True)


@seg_app.command("info")
def seg_info(
    seg: Annotated[Path, typer.Argument(help="A DICOM-SEG file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Segments (number, label, codes, colour, frame count), type and referenced series of SEG."""
    from node.dicom.seg import SegError, describe_seg
    from node.logs import register_path

    register_path(seg)
    try:
        info = describe_seg(seg)
    except SegError as exc:
        raise fail(f"{seg}: {exc} [{exc.code}]") from None
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    out.print(f"{info['segmentation_type']} SEG, {info['frames']} frame(s) of "
              f"{info['columns']}x{info['rows']}, series {info['series_number']} "
              f"{escape(info['series_description'])} ({escape(info['manufacturer'])})", highlight=False)
    for uid, count in info["referenced_series"].items():
        out.print(f"references series {uid} ({count} instance(s))", highlight=False)
    table = Table()
    for column in ("#", "id", "label", "type", "category", "colour", "frames", "algorithm"):
        table.add_column(column, overflow="fold")

    def code(c):
        return "" if c is None else f"{c['meaning']} ({c['scheme']} {c['value']})"

    for s in info["segments"]:
        modifier = f", {s['type_modifier']['meaning']}" if s["type_modifier"] else ""
        colour = "#{:02x}{:02x}{:02x}".format(*s["color"]) if s["color"] else ""
        table.add_row(str(s["number"]), str(s["label_id"]), escape(s["label"]),
                      escape(code(s["type"]) + modifier), escape(code(s["category"])), colour,
                      "" if s["frames"] is None else str(s["frames"]), escape(s["algorithm"]))
    out.print(table)
    for note in info["notes"]:
        out.print(f"note: {escape(note)}", highlight=False)


@seg_app.command("to-nifti")
def seg_to_nifti_command(
    seg: Annotated[Path, typer.Argument(help="A DICOM-SEG file.")],
    output: Annotated[Path, typer.Argument(help="Output .nii/.nii.gz label map (<name>.classes.json beside it).")],
    source: Annotated[Optional[Path], typer.Option(
        help="The source series (folder/zip): the label map gets its grid. Default: the SEG's planes.")] = None,
) -> None:
    """Convert SEG to a multilabel NIfTI on the source's grid, with <name>.classes.json beside it."""
    from node.dicom.seg import SegError, seg_to_nifti
    from node.logs import register_path

    register_path(seg)
    register_path(source)
    if not output.name.endswith((".nii", ".nii.gz")):
        raise fail(f"output must end in .nii or .nii.gz, got {output.name}", 2)
    try:
        result = seg_to_nifti(seg, output, source)
    except SegError as exc:
        raise fail(f"{seg}: {exc} [{exc.code}]") from None
    out.print(f"wrote {result['nifti']} ({'x'.join(map(str, result['shape_ijk']))}, "
              f"{len(result['labels'])} label(s)) and {result['classes']}", highlight=False)
    for note in result["notes"]:
        out.print(f"note: {escape(note)}", highlight=False)
