"""Commands on one volume: ``phantom``, ``volume-info``, ``convert`` and ``run`` (segment it).

Top-level commands: ``node/cli/__init__.py`` registers them on the app, in ``--help``'s order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node.cli.common import _load_volume, err, fail, out, positional_or_option, settings


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


def run(
    input_arg: Annotated[Optional[Path], typer.Argument(
        metavar="INPUT", show_default=False, help="A DICOM folder, zip or file, or a NIfTI file (or -i).")] = None,
    outdir_arg: Annotated[Optional[Path], typer.Argument(
        metavar="OUTDIR", show_default=False,
        help="Folder for labels.nii.gz, classes.json, stats.csv, report.json (or -o).")] = None,
    input_opt: Annotated[Optional[Path], typer.Option(
        "-i", "--input", show_default=False, help="INPUT, as TotalSegmentator takes it.")] = None,
    output_opt: Annotated[Optional[Path], typer.Option(
        "-o", "--output", show_default=False, help="OUTDIR, as TotalSegmentator takes it.")] = None,
    engine: Annotated[
        Optional[str], typer.Option(help="threshold | labelmap | totalsegmentator (default: config segmentation.engine).")
    ] = None,
    task: Annotated[Optional[str], typer.Option(help="TotalSegmentator task (default: config segmentation.task).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="TotalSegmentator's 3 mm model.")] = False,
    fastest: Annotated[bool, typer.Option("--fastest", help="TotalSegmentator's 6 mm model.")] = False,
    roi_subset: Annotated[
        Optional[list[str]],
        typer.Option("--roi_subset", "--roi-subset", help="Keep only these classes: --roi_subset liver aorta."),
    ] = None,
    robust_crop: Annotated[bool, typer.Option("--robust_crop", "--robust-crop",
                                              help="TotalSegmentator's robust ROI crop.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu | gpu | gpu:N | mps (default: config segmentation.device).")] = None,
    labels: Annotated[
        Optional[Path], typer.Option("--labels", help="labelmap engine: a label NIfTI or a folder of per-class masks.")
    ] = None,
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
    mode: Annotated[Optional[str], typer.Option(
        "--mode", help="enhanced_liver: the liver vessel pipeline (as --post liver_vessels), as "
                       "TotalSegmentatorEnhanced's --mode.")] = None,
    post: Annotated[
        Optional[list[str]], typer.Option("--post", help="Post-processing stage by name (repeatable).")
    ] = None,
    option: Annotated[
        Optional[list[str]], typer.Option("--option", help="Engine option KEY=VALUE, e.g. vessel_hu=120 (repeatable).")
    ] = None,
    output_kind: Annotated[
        Optional[list[str]],
        typer.Option("--output-kind", help="Extra output by name (repeatable): seg, rtstruct, sr, review, dicom_mesh, "
                                           "meshes, slices, blender."),
    ] = None,
    export_mesh: Annotated[bool, typer.Option("--export-mesh", help="Meshes too (the meshes output, in OUTDIR/meshes).")
                           ] = False,
    export_format: Annotated[Optional[str], typer.Option("--export-format", help="Meshes: stl | obj | ply.")] = None,
    units: Annotated[Optional[str], typer.Option("--units", help="Meshes: mm | m.")] = None,
    mesh_smooth_iters: Annotated[Optional[int], typer.Option(
        "--mesh-smooth-iters", help="Meshes: Taubin smoothing iterations (0: the exact voxel surface).")] = None,
    write_empty: Annotated[bool, typer.Option(
        "--write-empty", help="Meshes: an empty file for each expected structure with no voxel.")] = False,
    split_portal_hepatic: Annotated[
        bool, typer.Option("--split_portal_hepatic", "--split-portal-hepatic",
                           help="Liver vessels: split into portal and hepatic trees.")
    ] = False,
    min_component_size: Annotated[
        Optional[int], typer.Option("--min_component_size", "--min-component-size",
                                    help="Liver vessels: drop smaller components (voxels).")
    ] = None,
    no_fallback_full_liver: Annotated[
        bool, typer.Option("--no_fallback_full_liver", "--no-fallback-full-liver",
                           help="Liver vessels: fail without a liver.")
    ] = False,
    split_support_dir: Annotated[
        Optional[Path], typer.Option("--split_support_dir", "--split-support-dir",
                                     help="Liver vessels: per-class masks or a segnode run folder.")
    ] = None,
    generate_split_support: Annotated[
        bool, typer.Option("--generate_split_support", "--generate-split-support",
                           help="Liver vessels: make missing support labels.")
    ] = False,
    no_skeleton: Annotated[
        bool, typer.Option("--no_skeleton", "--no-skeleton", help="Liver vessels: split without the skeleton graph.")
    ] = False,
    min_split_component_size: Annotated[
        Optional[int], typer.Option("--min_split_component_size", "--min-split-component-size",
                                    help="Liver vessels: merge smaller pieces.")
    ] = None,
) -> None:
    """Segment a series: load, engine, post-processing; labels, classes, stats and report.json in OUTDIR."""
    import re

    from rich.progress import SpinnerColumn

    from node.logs import register_path
    from node.pipeline import ProgressEvent, request_from_settings, run_pipeline
    from node.segment.registry import ENGINES

    input = positional_or_option(input_arg, input_opt, "INPUT", "-i/--input")
    outdir = positional_or_option(outdir_arg, output_opt, "OUTDIR", "-o/--output")
    config = settings()
    register_path(input)  # its patient's values are scrubbed from logs and console (node.logs)
    engine = (engine or config.segmentation.engine).lower()
    if engine not in ENGINES:
        raise fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}", 2)
    if device is not None and not re.fullmatch(r"cpu|gpu|gpu:\d+|mps", device):
        raise fail(f"--device must be cpu, gpu, gpu:N or mps, got {device!r}", 2)
    if engine == "labelmap" and labels is None:
        raise fail("--engine labelmap needs --labels: a label NIfTI or a folder of per-class masks", 2)
    options: dict[str, object] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise fail(f"--option takes KEY=VALUE, got {item!r}", 2)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    # The liver vessel pipeline's own flags; any of them turns the liver_vessels stage on.
    vessel_flags = {
        "split_portal_hepatic": split_portal_hepatic or None, "min_component_size": min_component_size,
        "no_fallback_full_liver": no_fallback_full_liver or None, "split_support_dir": split_support_dir,
        "generate_split_support": generate_split_support or None, "no_skeleton": no_skeleton or None,
        "min_split_component_size": min_split_component_size,
    }
    vessel_options = {k: str(v) if isinstance(v, Path) else v for k, v in vessel_flags.items() if v is not None}
    post = list(post or [])
    if mode is not None and mode not in ("enhanced_liver", "total"):
        raise fail(f"--mode must be enhanced_liver (the liver vessel pipeline) or total, got {mode!r}", 2)
    if (vessel_options or mode == "enhanced_liver") and "liver_vessels" not in post:
        post.append("liver_vessels")
    # The mesh chain's flags (TotalSegmentatorImproved's); any of them asks for the meshes output.
    mesh_flags = {"export_format": export_format, "units": units, "mesh_smooth_iters": mesh_smooth_iters,
                  "write_empty": write_empty or None}
    mesh_options = {k: v for k, v in mesh_flags.items() if v is not None}
    outputs = list(output_kind or [])
    if (export_mesh or mesh_options) and "meshes" not in outputs:
        outputs.append("meshes")
    stage_options = {name: opts for name, opts in (("liver_vessels", vessel_options), ("meshes", mesh_options))
                     if opts}
    request = request_from_settings(
        config, engine=engine, task=task, fast=fast or None, fastest=fastest or None,
        roi_subset=[n for value in roi_subset or [] for n in value.replace(",", " ").split()],
        robust_crop=robust_crop or None, device=device, labels_path=labels, options=options,
        post=post, series_uid=series, outputs=outputs, stage_options=stage_options or None,
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=not err.is_terminal,
    ) as progress:
        tasks: dict[str, object] = {}

        def show(event: ProgressEvent) -> None:
            if event.status == "output":  # an output is ready to deliver: the stage's line says it
                return
            if event.status == "started":
                tasks[event.stage] = progress.add_task(event.stage, total=None)
            elif event.status == "progress":
                progress.update(tasks[event.stage], completed=event.done, total=event.total)  # type: ignore[arg-type]
            else:
                mark = {"done": "[green]done[/green]", "skipped": "[yellow]skipped[/yellow]"}.get(
                    event.status, "[red]failed[/red]"
                )
                line = f"{event.stage}: {mark} ({event.seconds or 0:.2f} s)"
                if event.message and event.status == "skipped":
                    line += f": {escape(event.message)}"
                progress.update(tasks[event.stage], description=line, completed=1, total=1)  # type: ignore[arg-type]
                if progress.disable:  # not a terminal (logs, CI): one line per stage
                    err.print(line, highlight=False, soft_wrap=True)

        result = run_pipeline(input, outdir, request, progress=show)
    if not result.ok:
        assert result.error is not None
        report = f" (report: {result.paths['report']})" if "report" in result.paths else ""
        raise fail(f"{result.error.message} [{result.error.code}]{report}")
    table = Table(title=f"{engine} on {input.name}", title_justify="left")
    for column in ("id", "name", "voxels", "ml", "mean HU"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for s in result.report["structures"]:
        table.add_row(str(s["id"]), s["name"], str(s["voxels"]), f"{s['volume_ml']:.1f}", str(s["mean_hu"]))
    out.print(table)
    for note in result.report.get("notes", []):
        out.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    total = result.report["timings_s"]["total"]
    out.print(f"wrote {', '.join(p.name for p in result.paths.values())} in {outdir} ({total:.2f} s)", highlight=False,
              soft_wrap=True)
    if result.failed_outputs:  # the labels are written; an output asked for is not: say which, exit 1
        for name, error in result.failed_outputs.items():
            err.print(f"[red]output {name} failed:[/red] {escape(error.message)} [{error.code}]", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(1)
