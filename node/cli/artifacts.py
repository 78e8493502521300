"""3D and 2D artifacts from labels: ``mesh``, ``slices`` and ``blender``.

Top-level commands: ``node/cli/__init__.py`` registers them on the app, in ``--help``'s order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from node.cli.common import _load_volume, fail, out, positional_or_option, progress_bar

_LabelsArg = Annotated[Path, typer.Argument(
    help="A label NIfTI (classes: --classes, <name>.classes.json or <name>.json beside it, the table in its NIfTI header (TotalSegmentator's), classes.json, or TotalSegmentator's --task map) "
         "or a run folder with labels.nii.gz.")]
_ClassesOpt = Annotated[Optional[Path], typer.Option("--classes", help="Class table JSON (names, colours).")]
_TaskOpt = Annotated[str, typer.Option("--task", help="TotalSegmentator task whose class map names the ids.")]
_SmoothOpt = Annotated[int, typer.Option("--mesh-smooth-iters", help="Taubin smoothing iterations; 0: exact voxel surface.")]


def _labels_for_artifacts(path: Path, classes: Optional[Path], task: str):
    from node.artifacts import load_labels
    from node.segment import SegmentationError

    try:
        return load_labels(path, classes, task)
    except (OSError, ValueError, SegmentationError) as exc:
        raise fail(str(exc), 2) from None


def mesh_command(
    labels: _LabelsArg,
    outdir: Annotated[Path, typer.Argument(help="Folder for <structure>.<format> files and meshes.json.")],
    export_format: Annotated[str, typer.Option("--export-format", help="stl | obj | ply")] = "stl",
    units: Annotated[str, typer.Option("--units", help="mm | m")] = "mm",
    space: Annotated[str, typer.Option("--space", help="RAS (NIfTI, Slicer, Blender) | LPS (DICOM)")] = "RAS",
    mesh_smooth_iters: _SmoothOpt = 10,
    decimate: Annotated[Optional[float], typer.Option("--decimate", help="Fraction of faces to keep, e.g. 0.1.")] = None,
    write_empty: Annotated[bool, typer.Option("--write-empty", help="Empty files for expected structures with no voxel.")] = False,
    classes: _ClassesOpt = None,
    task: _TaskOpt = "total",
    workers: Annotated[int, typer.Option("--workers", help="Processes meshing side by side (0: one per core).")] = 0,
) -> None:
    """One closed, manifold mesh per structure, in patient space (RAS by default), named after it."""
    from node.artifacts.mesh import MeshOptions, export_meshes

    try:
        options = MeshOptions(smooth_iters=mesh_smooth_iters, decimate=decimate, space=space.upper(),  # type: ignore[arg-type]
                              units=units, export_format=export_format.lower(), write_empty=write_empty,  # type: ignore[arg-type]
                              workers=workers)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    volume, table = _labels_for_artifacts(labels, classes, task)
    with progress_bar("Meshing") as update:
        index = export_meshes(volume, outdir, options, expected=table if write_empty else None, progress=update)
    result = Table(title=f"{len(index['meshes'])} meshes in {outdir} ({index['seconds']:.1f} s)", title_justify="left")
    for column in ("name", "faces", "closed", "volume/voxels"):
        result.add_column(column, justify="left" if column == "name" else "right")
    for e in index["meshes"]:
        ratio = f"{e['mesh_volume_ml'] / e['voxel_volume_ml']:.3f}" if e["voxel_volume_ml"] else "-"
        result.add_row(escape(e["name"]), str(e["faces"]), "empty" if e["empty"] else ("yes" if e["watertight"] else "NO"),
                       ratio)
    out.print(result)
    if any(not e["empty"] and not e["watertight"] for e in index["meshes"]):
        raise fail("some meshes are not closed and manifold (see meshes.json)")


def slices_command(
    input: Annotated[Path, typer.Argument(help="A CT: DICOM folder/zip/file or NIfTI.")],
    outdir: Annotated[Path, typer.Argument(help="Folder for axial/, coronal/, sagittal/, slices.json, contact_sheet.png.")],
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Label NIfTI (or run folder) drawn over the CT.")] = None,
    window: Annotated[str, typer.Option("--window", help="abdomen | liver | bone | lung | brain | mediastinum | percentile | W,L")] = "abdomen",
    planes: Annotated[str, typer.Option("--planes", help="Comma-separated: axial,coronal,sagittal.")] = "axial,coronal,sagittal",
    every: Annotated[int, typer.Option("--every", help="Write every n-th slice.")] = 1,
    flat: Annotated[bool, typer.Option("--flat", help="All PNGs in one folder (axial_001.png ...).")] = False,
    overlay_alpha: Annotated[float, typer.Option("--overlay-alpha", help="Label opacity over the CT (0: none).")] = 0.4,
    palette: Annotated[str, typer.Option("--palette", help="exact | auto (overlay colours)")] = "exact",
    contact_sheet: Annotated[bool, typer.Option("--contact-sheet/--no-contact-sheet")] = True,
    classes: _ClassesOpt = None,
    task: _TaskOpt = "total",
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
) -> None:
    """PNG slices in radiological orientation with square pixels, their plane corners (slices.json), a contact sheet."""
    from node.artifacts.slices import SliceOptions, write_slices

    try:
        options = SliceOptions(planes=tuple(p.strip() for p in planes.split(",") if p.strip()), window=window,
                               every=every, flat=flat, overlay_alpha=overlay_alpha, palette=palette,
                               contact_sheet=contact_sheet)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    ct = _load_volume(input, series)
    overlay = None
    if labels is not None:
        from node.segment.labelmap import place_on_grid

        overlay, _ = _labels_for_artifacts(labels, classes, task)
        if overlay.array.shape != ct.array.shape or not overlay.geometry.same_grid(ct.geometry):
            try:
                overlay.array, _ = place_on_grid(overlay, ct.geometry, ct.array.shape)
            except Exception as exc:
                raise fail(f"{labels}: cannot place the labels on the CT's grid: {exc}", 2) from None
            overlay.geometry = ct.geometry
    index = write_slices(ct, outdir, options, labels=overlay)
    counts = ", ".join(f"{p} {v['written']}" for p, v in index["planes"].items())
    out.print(f"{counts} PNGs in {outdir} ({index['seconds']:.1f} s)", highlight=False)


def blender_command(
    source_arg: Annotated[Optional[Path], typer.Argument(
        metavar="SOURCE", show_default=False, help="A mesh folder (segnode mesh, or STL/OBJ/PLY files), or labels "
                                                   "(a label NIfTI or run folder: meshes are made first); or --stl-dir.")
    ] = None,
    output_arg: Annotated[Optional[Path], typer.Argument(
        metavar="OUT.blend", show_default=False, help="The .blend to write; or --save.")] = None,
    stl_dir: Annotated[Optional[Path], typer.Option(
        "--stl-dir", show_default=False, help="SOURCE as the seed importer takes it: a folder of meshes.")] = None,
    save: Annotated[Optional[Path], typer.Option(
        "--save", show_default=False, help="OUT.blend as the seed importer takes it.")] = None,
    palette: Annotated[str, typer.Option("--palette", help="exact (the classes' DICOM colours) | auto (semantic)")] = "exact",
    mapping_json: Annotated[Optional[Path], typer.Option("--mapping-json", help="JSON name -> colour overrides.")] = None,
    collection: Annotated[str, typer.Option("--collection", help="The collection holding the structures.")] = "Organs",
    group_categories: Annotated[bool, typer.Option("--group-categories", help="Sub-collections Bone, Muscle, ... Vessel, Other.")] = False,
    scale: Annotated[float, typer.Option("--scale", help="Uniform scale after mm -> m.")] = 1.0,
    units: Annotated[Optional[str], typer.Option("--units", help="Units of a mesh folder without meshes.json: mm | m.")] = None,
    rotate_x_deg: Annotated[float, typer.Option("--rotate-x-deg", help="Rotate about X (degrees).")] = 0.0,
    mirror_x: Annotated[bool, typer.Option("--mirror-x", help="Mirror across X.")] = False,
    remesh: Annotated[str, typer.Option("--remesh", help="none | voxel | quad | smooth | sharp | blocks")] = "none",
    voxel_size: Annotated[Optional[float], typer.Option("--voxel-size", help="Remesh voxel size (Blender units).")] = None,
    slices: Annotated[Optional[Path], typer.Option(
        "--image-dir", "--slices", help="PNG slice folder (segnode slices) for the slice add-on.")] = None,
    blender: Annotated[Optional[str], typer.Option("--blender", help="Blender >= 4.2 binary or a Python with bpy.")] = None,
    mesh_smooth_iters: _SmoothOpt = 10,
    decimate: Annotated[float, typer.Option("--decimate", help="From labels: fraction of faces to keep.")] = 0.1,
    classes: _ClassesOpt = None,
    task: _TaskOpt = "total",
) -> None:
    """A Blender scene: one object per structure, coloured, grouped, framed by a camera; the slice add-on."""
    source = positional_or_option(source_arg, stl_dir, "SOURCE", "--stl-dir")
    output = positional_or_option(output_arg, save, "OUT.blend", "--save")
    from node.artifacts.blender import BlenderError, SceneOptions, build_scene
    from node.artifacts.mesh import MeshOptions, label_meshes

    try:
        options = SceneOptions(palette=palette, mapping_json=str(mapping_json) if mapping_json else None,
                               collection=collection, group_categories=group_categories, scale=scale,
                               rotate_x_deg=rotate_x_deg, mirror_x=mirror_x, remesh=remesh, voxel_size=voxel_size,
                               blender=blender)
        mesh_options = MeshOptions(smooth_iters=mesh_smooth_iters, decimate=decimate if decimate < 1 else None)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    is_labels = source.name.endswith((".nii", ".nii.gz")) or (source.is_dir() and (source / "labels.nii.gz").is_file()
                                                             and not any(source.glob("*.stl")))
    table = None
    if is_labels:
        volume, _ = _labels_for_artifacts(source, classes, task)
        with progress_bar("Meshing") as update:
            meshes: object = label_meshes(volume, mesh_options, progress=update)
        table = volume.classes
    elif source.is_dir():
        meshes = source
    else:
        raise fail(f"{source}: give a mesh folder, a label NIfTI or a run folder", 2)
    try:
        result = build_scene(meshes, output, options, slices=slices, classes=table, units=units)  # type: ignore[arg-type]
    except (BlenderError, ValueError) as exc:
        raise fail(str(exc), 2 if getattr(exc, "code", "") == "no_blender" else 1) from None
    runner = result["runner"]
    out.print(f"{output}: {len(result['objects'])} objects (Blender {result['blender']}, {runner['kind']}, "
              f"{runner['seconds']:.1f} s)" + (f"; skipped: {', '.join(result['skipped'])}" if result["skipped"] else ""),
              highlight=False)
