"""The review sheet: one page a radiologist reads at a glance, as ``review.png`` and, in the study, as
an Encapsulated PDF instance (PS3.3 A.45.1, SOP Class 1.2.840.10008.5.1.4.1.1.104.1) that OHIF shows.

The page (A4 landscape at 150 dpi, 1754 x 1240 pixels):

* three orthogonal views (axial, coronal, sagittal) through the centre of the labelled voxels, CT in an
  abdomen window (W 400, L 40), each structure's voxels blended half-and-half with its colour, in the
  physical aspect of the grid (radiological convention: the patient's right on the image's left);
* for the liver vessels, a coronal projection of the portal (``portal_vein_branches``) and hepatic
  (``hepatic_veins``) trees over the liver's silhouette, when the labels have them;
* the legend and volume table (colour, name, mL, mean HU) of every structure;
* the engine, task, model and software versions, and the run's stage timings.

No patient name or ID is printed: the document lives in the patient's study, which says whose it is.
``review.json`` says where each view lies on the page and which slice it shows (for tests and tools).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from node.stages import PipelineContext

PNG_FILE, PDF_FILE, DICOM_FILE, INDEX_FILE = "review.png", "review.pdf", "review.dcm", "review.json"
PDF_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.104.1"
PAGE = (1754, 1240)
DPI = 150
WINDOW = (40.0, 400.0)  # level, width (HU)
ALPHA = 0.5
VIEW_BOX = 510
GAP = 30  # between views: room for each view's caption above it
VESSELS = ("portal_vein_branches", "hepatic_veins")


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def grey(values: np.ndarray) -> np.ndarray:
    """CT values in the abdomen window as 0..255."""
    level, width = WINDOW
    return (np.clip((values.astype(np.float32) - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


def view_size(shape: tuple[int, int], pixel_mm: tuple[float, float], box: int = VIEW_BOX) -> tuple[int, int]:
    """(width, height) of a (rows, columns) slice with (row, column) pixel size in mm, fit in ``box``."""
    rows, cols = shape
    scale = box / max(rows * pixel_mm[0], cols * pixel_mm[1])
    return max(1, round(cols * pixel_mm[1] * scale)), max(1, round(rows * pixel_mm[0] * scale))


def resample(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2-D array to (width, height): the input pixel under each output
    pixel's centre, ``floor((x + 1/2) n / w)`` in integers (no float ties)."""
    w, h = size
    rows = (2 * np.arange(h) + 1) * plane.shape[0] // (2 * h)
    cols = (2 * np.arange(w) + 1) * plane.shape[1] // (2 * w)
    return plane[rows][:, cols]


def views(ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float],
          centre: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The three planes through ``centre`` (k, j, i): CT and labels, oriented for display (superior up
    in coronal and sagittal), with their pixel sizes."""
    sx, sy, sz = spacing
    k, j, i = centre
    return [
        {"name": "axial", "axis": "k", "index": k, "ct": ct[k], "labels": labels[k], "pixel_mm": (sy, sx)},
        {"name": "coronal", "axis": "j", "index": j, "ct": ct[:, j, :][::-1], "labels": labels[:, j, :][::-1],
         "pixel_mm": (sz, sx)},
        {"name": "sagittal", "axis": "i", "index": i, "ct": ct[:, :, i][::-1], "labels": labels[:, :, i][::-1],
         "pixel_mm": (sz, sy)},
    ]


def blend(ct_plane: np.ndarray, label_plane: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """RGB: the windowed CT, each labelled pixel blended with its structure's colour (``colours[id]``)."""
    g = grey(ct_plane)
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
    inside = label_plane > 0
    rgb[inside] = (1 - ALPHA) * rgb[inside] + ALPHA * colours[label_plane[inside]]
    return np.round(rgb).astype(np.uint8)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The centre of the labelled voxels (the middle of the grid if none), from per-axis profiles."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = np.count_nonzero(labels, axis=other) if labels.ndim == 3 else None
        total = profile.sum()
        out.append(int(round(float((profile * np.arange(len(profile))).sum() / total))) if total
                   else labels.shape[axis] // 2)
    return out[0], out[1], out[2]


def render(ctx: PipelineContext) -> tuple[Any, dict[str, Any]]:
    """The page (a Pillow image) and its index (views' boxes and slices)."""
    from PIL import Image, ImageDraw

    labels, ct = ctx.labels, ctx.ct
    array = labels.array
    n = int(array.max()) + 1 if array.size else 1
    colours = np.zeros((max(n, 1), 3), np.float32)
    for i, c in labels.classes.items():
        if i < n:
            colours[i] = c.color
    page = Image.new("RGB", PAGE, "white")
    draw = ImageDraw.Draw(page)
    title, small, tiny = _font(30), _font(17), _font(14)
    identity = ct.source
    engine = ctx.request.segment
    draw.text((30, 20), "segnode review sheet", fill="black", font=title)
    what = identity.series_description if identity and identity.series_description else "series"
    draw.text((30, 62), f"{what} - {len(labels.classes)} structures - "
                        f"grid {' x '.join(str(s) for s in labels.shape_ijk)} - "
                        f"{' x '.join(f'{s:g}' for s in labels.geometry.spacing)} mm", fill="black", font=small)
    versions = {"segnode": _version("segnode")}
    if engine.engine == "totalsegmentator":
        versions["TotalSegmentator"] = _version("TotalSegmentator")
        versions["nnunetv2"] = _version("nnunetv2")
    model = f"task {engine.task}" + (" --fast" if engine.fast else "") + (" --fastest" if engine.fastest else "")
    draw.text((30, 88), f"engine {engine.engine}, {model}; "
                        + ", ".join(f"{k} {v}" for k, v in versions.items() if v), fill="black", font=small)
    timings = [(s["name"], s.get("seconds")) for s in ctx.stages_run if s.get("seconds") is not None]
    draw.text((30, 114), "timings: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in timings),
              fill="black", font=small)
    index: dict[str, Any] = {"page": list(PAGE), "alpha": ALPHA, "window": list(WINDOW), "views": []}
    slots = [(30, 160), (30 + VIEW_BOX + GAP, 160), (30, 160 + VIEW_BOX + GAP)]
    for (x, y), view in zip(slots, views(ct.array, array, labels.geometry.spacing, _centre(array))):
        size = view_size(view["labels"].shape, view["pixel_mm"])
        rgb = blend(resample(view["ct"], size), resample(view["labels"], size), colours)
        ox, oy = x + (VIEW_BOX - size[0]) // 2, y + (VIEW_BOX - size[1]) // 2
        page.paste(Image.fromarray(rgb), (ox, oy))
        draw.text((x, y - 24), f"{view['name']}, slice {view['axis']} = {view['index'] + 1}", fill="black",
                  font=small)
        index["views"].append({"name": view["name"], "axis": view["axis"], "index": view["index"],
                               "box": [ox, oy, ox + size[0], oy + size[1]]})
    _vessel_render(ctx, page, draw, slots[-1][0] + VIEW_BOX + GAP, slots[-1][1], colours, index, small)
    _table(ctx, draw, x0=30 + 2 * (VIEW_BOX + GAP) + 10, y0=160, font=tiny, header=small)
    return page, index


def _vessel_render(ctx: PipelineContext, page: Any, draw: Any, x: int, y: int, colours: np.ndarray,
                   index: dict[str, Any], font: Any) -> None:
    """Coronal projection of the portal and hepatic trees over the liver's silhouette."""
    from PIL import Image

    ids = {name: ctx.ids(name) for name in VESSELS}
    if not all(ids.values()):
        draw.text((x, y + VIEW_BOX // 2), "no portal/hepatic split in this run", fill="grey", font=font)
        return
    array = ctx.labels.array
    liver = np.isin(array, ctx.ids("liver", *VESSELS)).any(axis=1)[::-1]
    plane = np.zeros(liver.shape, np.int64)
    for name in VESSELS:  # the portal tree drawn over the hepatic where both project
        plane[np.isin(array, ids[name]).any(axis=1)[::-1]] = ids[name][0]
    sx, _, sz = ctx.labels.geometry.spacing
    size = view_size(plane.shape, (sz, sx))
    grey_plane = np.where(resample(liver, size), 200, 255).astype(np.uint8)
    rgb = np.repeat(grey_plane[..., None], 3, axis=2)
    vessels = resample(plane, size)
    rgb[vessels > 0] = colours[vessels[vessels > 0]].astype(np.uint8)
    ox, oy = x + (VIEW_BOX - size[0]) // 2, y + (VIEW_BOX - size[1]) // 2
    page.paste(Image.fromarray(rgb), (ox, oy))
    qc = (ctx.qc.get("liver_vessels") or {}).get("portal_hepatic_split_qc") or {}
    caption = "portal / hepatic veins (coronal projection)"
    if "portal_fraction" in qc:
        caption += f": portal {qc['portal_fraction']:.0%}, hepatic {qc['hepatic_fraction']:.0%}"
    draw.text((x, y - 24), caption, fill="black", font=font)
    index["views"].append({"name": "vessels", "axis": "j", "index": None, "box": [ox, oy, ox + size[0], oy + size[1]]})


def _table(ctx: PipelineContext, draw: Any, x0: int, y0: int, font: Any, header: Any) -> None:
    """Legend and volumes: colour, name, mL, mean HU; two columns, numbers right-aligned."""
    rows = [r for r in ctx.structures() if r["voxels"]]
    col_w = (PAGE[0] - x0 - 20) // 2
    per_col = max(1, -(-len(rows) // 2))
    line = min(26, max(14, (PAGE[1] - y0 - 50) // per_col))
    font = _font(17) if line >= 22 else font
    columns = ((16, None), (col_w - 62, "mL"), (col_w - 14, "HU"))  # name's x, numbers' right edges

    def right(x: int, y: int, text: str, f: Any) -> None:
        draw.text((x - draw.textlength(text, font=f), y), text, fill="black", font=f)

    for col in range(2 if len(rows) > 1 else 1):
        x = x0 + col * col_w
        draw.text((x + 16, y0 - 2), "structure", fill="black", font=header)
        for offset, name in columns[1:]:
            right(x + offset, y0 - 2, name or "", header)
    for n, r in enumerate(rows):
        col, row = divmod(n, per_col)
        x, y = x0 + col * col_w, y0 + 26 + row * line
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=tuple(int(v) for v in r["color"]), outline="black")
        draw.text((x + 16, y), r["name"][: 18 if line >= 22 else 22], fill="black", font=font)
        right(x + columns[1][0], y, f"{r['volume_ml']:.1f}", font)
        right(x + columns[2][0], y, "" if r["mean_hu"] is None else f"{r['mean_hu']:.0f}", font)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def pdf_instance(pdf: bytes, source: Any, identity: Any, *, seed: str | None, series_number: int | None = None) -> Any:
    """The Encapsulated PDF instance (Encapsulated Document Series, SC Equipment, Encapsulated Document)."""
    from node.dicom.derived import derived_header, derived_uid, encapsulate_document

    ds = derived_header(source, identity, kind="review", sop_class_uid=PDF_SOP_CLASS_UID, modality="DOC",
                        series_uid=derived_uid(seed, "review series"), sop_uid=derived_uid(seed, "review instance"),
                        series_number=series_number,
                        series_description=f"segnode review {identity.series_description}".strip())
    ds.ConversionType = "WSD"  # SC Equipment module: a workstation made it
    encapsulate_document(ds, pdf, "application/pdf", "segnode review sheet")
    return ds


def review_output(ctx: PipelineContext) -> None:
    """Output stage ``review``: ``review.png``, ``review.pdf``, ``review.json`` and, with a DICOM
    source, ``review.dcm`` (the PDF in the study; delivered). Options: ``uid_seed``, ``series_number``."""
    from node.stages import StageSkipped

    if not ctx.labels.classes:
        raise StageSkipped("no structure was found: no review sheet")
    page, index = render(ctx)
    out = ctx.outdir
    page.save(out / PNG_FILE, optimize=False, compress_level=3)
    page.save(out / PDF_FILE, "PDF", resolution=DPI)
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    ctx.artifacts["review_png"] = out / PNG_FILE
    ctx.artifacts["review_pdf"] = out / PDF_FILE
    ctx.artifacts["review_index"] = out / INDEX_FILE
    source = ctx.ct.source
    options = ctx.options
    if (ctx.source_path is not None or ctx.source_headers) and source is not None and source.instance_uids:
        from node.dicom.derived import source_header, write

        ds = pdf_instance((out / PDF_FILE).read_bytes(), source_header(ctx.source_headers, ctx.source_path),
                          source, seed=options.get("uid_seed"), series_number=options.get("series_number"))
        ctx.add_output("review", write(ds, out / DICOM_FILE))
    else:
        ctx.notes.append("review: the input has no DICOM source: PNG and PDF only, no DICOM instance")
    ctx.record(views=len(index["views"]))
