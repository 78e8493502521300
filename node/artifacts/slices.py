"""PNG slice stacks of a CT (optionally with its labels over it), a contact sheet, and ``slices.json``.

Layout (``write_slices(ct, outdir)``)::

    outdir/axial/001.png ...      (or, flat, outdir/axial_001.png ...)
    outdir/coronal/001.png ...
    outdir/sagittal/001.png ...
    outdir/slices.json            where every PNG lies in patient space
    outdir/contact_sheet.png      one overview image (``contact_sheet=`` elsewhere, or off)

Display orientation is radiological, as a reading room shows it: axial with the patient's right on
the image's left and anterior up; coronal with right on the left and head up; sagittal with anterior
on the left and head up. Slices are numbered from 1 along +S (axial, feet to head), +P (coronal,
front to back) and +L (sagittal, right to left), whatever the order of the stored array: the array
axis nearest each patient axis is used (a tilted or oblique grid is shown along its own axes).

Pixels are square: the axis with the coarser spacing is resampled (bilinear for the CT, nearest for
labels) to the finer one's, so a coronal image of 0.8 x 3 mm voxels is not squashed.

Windowing: CT presets (width, level in HU) ``abdomen`` (400, 50), ``liver`` (150, 80), ``bone``
(1800, 400), ``lung`` (1500, -600), ``brain`` (80, 40), ``mediastinum`` (350, 50), or
``percentile``: the 1st to 99th percentile of the volume (what the older scripts did), also the
default for non-CT data.

``slices.json`` gives, per plane and slice, the file, the array index, and the plane's four corners
(top-left, top-right, bottom-right, bottom-left of the image: the outer edges of the edge voxels, at
the slice's centre) in RAS millimetres: the same coordinates as the meshes, so the Blender add-on
puts each image exactly where it belongs.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.classes import LabelVolume
from node.volume import Volume

PLANES = ("axial", "coronal", "sagittal")
#: (width, level) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 50.0),
    "liver": (150.0, 80.0),
    "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
}
SLICES_INDEX = "slices.json"
CONTACT_SHEET = "contact_sheet.png"

# Per plane, in LPS: the slice normal (numbering direction), the image's rightward and downward axes.
_PLANE_AXES = {
    "axial": ((0, 0, 1), (1, 0, 0), (0, 1, 0)),  # +S; right: +L; down: +P (anterior up)
    "coronal": ((0, 1, 0), (1, 0, 0), (0, 0, -1)),  # +P; right: +L; down: -S (head up)
    "sagittal": ((1, 0, 0), (0, 1, 0), (0, 0, -1)),  # +L; right: +P (anterior left); down: -S
}


@dataclass(frozen=True)
class SliceOptions:
    """What ``segnode slices`` and the ``slices`` output stage write."""

    planes: tuple[str, ...] = PLANES
    #: A preset name (:data:`WINDOWS`), ``percentile``, or ``"W,L"`` in HU.
    window: str = "abdomen"
    #: Write every n-th slice.
    every: int = 1
    #: All PNGs in one folder (``axial_001.png``) instead of a folder per plane.
    flat: bool = False
    #: Labels drawn over the CT (when labels are given); 0 = off.
    overlay_alpha: float = 0.4
    palette: str = "exact"
    contact_sheet: bool = True
    #: PNG zlib level (1: fast, a little bigger).
    compress_level: int = 1
    workers: int = 4

    def __post_init__(self) -> None:
        bad = [p for p in self.planes if p not in PLANES]
        if bad or not self.planes:
            raise ValueError(f"planes must be among {', '.join(PLANES)}, got {', '.join(self.planes) or 'none'}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        parse_window(self.window)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SliceOptions:
        known = set(cls.__dataclass_fields__)
        values = {k.replace("-", "_"): v for k, v in options.items() if k.replace("-", "_") in known}
        if isinstance(values.get("planes"), str):
            values["planes"] = tuple(p.strip() for p in values["planes"].split(",") if p.strip())
        elif "planes" in values:
            values["planes"] = tuple(values["planes"])
        return cls(**values)


def parse_window(window: str) -> tuple[float, float] | None:
    """(width, level) of a preset or ``"W,L"``; None for ``percentile``."""
    w = window.strip().lower()
    if w in ("percentile", "auto"):
        return None
    if w in WINDOWS:
        return WINDOWS[w]
    try:
        width, level = (float(x) for x in w.split(","))
    except ValueError:
        raise ValueError(
            f"window must be one of {', '.join(WINDOWS)}, percentile, or WIDTH,LEVEL; got {window!r}"
        ) from None
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return width, level


@dataclass(frozen=True)
class PlaneView:
    """How one plane is cut from a ``[k, j, i]`` array: which array axes are the slice, the image rows and
    columns, and whether each runs backwards."""

    plane: str
    slice_axis: int  # array axis (0 k, 1 j, 2 i)
    row_axis: int
    col_axis: int
    slice_flip: bool
    row_flip: bool
    col_flip: bool

    def image(self, array: np.ndarray, number: int) -> np.ndarray:
        """Slice ``number`` (0-based along the plane's numbering) as a [row, column] array."""
        n = array.shape[self.slice_axis]
        index = n - 1 - number if self.slice_flip else number
        sl: list[Any] = [slice(None)] * 3
        sl[self.slice_axis] = index
        img = array[tuple(sl)]
        # The two remaining axes keep their order; put rows first.
        rest = [a for a in range(3) if a != self.slice_axis]
        if rest.index(self.row_axis) != 0:
            img = img.T
        if self.row_flip:
            img = img[::-1]
        if self.col_flip:
            img = img[:, ::-1]
        return img

    def array_index(self, array_shape: tuple[int, ...], number: int) -> int:
        n = array_shape[self.slice_axis]
        return n - 1 - number if self.slice_flip else number


def plane_view(volume: Volume, plane: str) -> PlaneView:
    """The array axes nearest the plane's patient axes (see the module docstring)."""
    # Array axis a (0 k, 1 j, 2 i) runs along direction column 2 - a.
    cols = volume.geometry.direction_matrix
    axis_dir = {a: cols[:, 2 - a] for a in range(3)}
    normal, right, down = (np.array(v, float) for v in _PLANE_AXES[plane])

    def nearest(target: np.ndarray, exclude: set[int]) -> tuple[int, bool]:
        best = max((a for a in range(3) if a not in exclude), key=lambda a: abs(axis_dir[a] @ target))
        return best, bool(axis_dir[best] @ target < 0)

    slice_axis, slice_flip = nearest(normal, set())
    col_axis, col_flip = nearest(right, {slice_axis})
    row_axis = ({0, 1, 2} - {slice_axis, col_axis}).pop()
    row_flip = bool(axis_dir[row_axis] @ down < 0)
    return PlaneView(plane, slice_axis, row_axis, col_axis, slice_flip, row_flip, col_flip)


def _spacing_of_axis(volume: Volume, axis: int) -> float:
    return float(volume.geometry.spacing[2 - axis])


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.asarray(values, np.float32) - low) * (255.0 / max(high - low, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def window_range(volume: Volume, window: str) -> tuple[float, float]:
    """(low, high) values mapped to black and white."""
    preset = parse_window(window)
    if preset is not None:
        width, level = preset
        return level - width / 2.0, level + width / 2.0
    a = volume.array
    step = max(1, round((a.size / 2_000_000) ** (1 / 3)))  # a sample of ~2 M voxels is enough
    low, high = np.percentile(a[::step, ::step, ::step], (1, 99))
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def _corners_ras(volume: Volume, view: PlaneView, number: int) -> list[list[float]]:
    """Top-left, top-right, bottom-right, bottom-left image corners of a slice, RAS mm."""
    shape = volume.array.shape
    index = view.array_index(shape, number)
    corners = []
    for row_end, col_end in ((0, 0), (0, 1), (1, 1), (1, 0)):
        kji = [0.0, 0.0, 0.0]
        kji[view.slice_axis] = float(index)
        r_lo, r_hi = -0.5, shape[view.row_axis] - 0.5
        c_lo, c_hi = -0.5, shape[view.col_axis] - 0.5
        r = (r_hi if row_end else r_lo) if not view.row_flip else (r_lo if row_end else r_hi)
        c = (c_hi if col_end else c_lo) if not view.col_flip else (c_lo if col_end else c_hi)
        kji[view.row_axis] = r
        kji[view.col_axis] = c
        ijk = np.array([[kji[2], kji[1], kji[0], 1.0]])
        ras = (volume.geometry.affine_ras @ ijk.T).T[0, :3]
        corners.append([round(float(x), 4) for x in ras])
    return corners


def _overlay(gray: np.ndarray, labels: np.ndarray, lut: np.ndarray, alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    mask = labels > 0
    if alpha > 0 and mask.any():
        colors = lut[labels[mask]].astype(np.float32)
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colors
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _label_lut(labels: LabelVolume, palette: str) -> np.ndarray:
    from node.artifacts.palette import class_colors

    top = int(labels.array.max()) if labels.array.size else 0
    lut = np.zeros((max(top, max(labels.classes, default=0)) + 1, 3), np.uint8)
    for i, rgba in class_colors(labels.classes, palette).items():
        lut[i] = rgba[:3]
    for i in labels.present_ids():
        if i not in labels.classes:
            from node.artifacts.palette import distinct_color

            lut[i] = distinct_color(i)
    return lut


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if (w, h) == size:
        return img
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(img).resize(size, mode))


def write_slices(
    ct: Volume,
    outdir: Path | str,
    options: SliceOptions = SliceOptions(),
    labels: LabelVolume | None = None,
    contact_sheet: Path | str | None = None,
) -> dict[str, Any]:
    """Write the PNG stacks, ``slices.json`` and the contact sheet; returns the index.

    ``contact_sheet``: where the overview goes (default ``outdir/contact_sheet.png``).
    """
    from PIL import Image

    started = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if labels is not None and labels.array.shape != ct.array.shape:
        raise ValueError(f"labels {labels.array.shape} and CT {ct.array.shape} are not on the same grid")
    low, high = window_range(ct, options.window)
    lut = _label_lut(labels, options.palette) if labels is not None and options.overlay_alpha > 0 else None
    index: dict[str, Any] = {
        "version": 1, "space": "RAS", "units": "mm", "window": options.window,
        "window_range": [low, high], "overlay": lut is not None, "flat": options.flat,
        "shape_ijk": list(ct.shape_ijk), "spacing_mm": list(ct.geometry.spacing),
        "affine_ras": np.round(ct.geometry.affine_ras, 6).tolist(), "planes": {},
    }
    jobs = []
    for plane in options.planes:
        view = plane_view(ct, plane)
        n = ct.array.shape[view.slice_axis]
        row_mm, col_mm = _spacing_of_axis(ct, view.row_axis), _spacing_of_axis(ct, view.col_axis)
        pitch = min(row_mm, col_mm)
        rows, cols = ct.array.shape[view.row_axis], ct.array.shape[view.col_axis]
        size = (max(1, round(cols * col_mm / pitch)), max(1, round(rows * row_mm / pitch)))
        width = max(3, len(str(n)))
        entries = []
        for number in range(0, n, options.every):
            name = f"{plane}_{number + 1:0{width}d}.png" if options.flat else f"{plane}/{number + 1:0{width}d}.png"
            entries.append({
                "number": number + 1, "file": name, "index": view.array_index(ct.array.shape, number),
                "corners": _corners_ras(ct, view, number),
            })
            jobs.append((view, number, outdir / name, size))
        normal = np.array(_PLANE_AXES[plane][0], float) * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
        index["planes"][plane] = {
            "folder": "" if options.flat else plane, "count": n, "written": len(entries),
            "size_px": list(size), "pixel_mm": [cols * col_mm / size[0], rows * row_mm / size[1]],
            "array_axes": {"slice": "kji"[view.slice_axis], "rows": "kji"[view.row_axis], "cols": "kji"[view.col_axis]},
            "normal_ras": normal.tolist(), "slices": entries,
        }
        if not options.flat:
            (outdir / plane).mkdir(exist_ok=True)

    def render(view: PlaneView, number: int, size: tuple[int, int]) -> np.ndarray:
        gray = _resize(window_to_uint8(view.image(ct.array, number), low, high), size, nearest=False)
        if lut is None:
            return gray
        lab = _resize(np.ascontiguousarray(view.image(labels.array, number)).astype(np.int32), size, nearest=True)  # type: ignore[union-attr]
        return _overlay(gray, lab, lut, options.overlay_alpha)

    def one(job: tuple[PlaneView, int, Path, tuple[int, int]]) -> None:
        view, number, path, size = job
        Image.fromarray(render(view, number, size)).save(path, compress_level=options.compress_level)

    with ThreadPoolExecutor(max(1, options.workers)) as pool:
        list(pool.map(one, jobs))
    if options.contact_sheet:
        sheet_path = Path(contact_sheet) if contact_sheet is not None else outdir / CONTACT_SHEET
        make_contact_sheet(ct, sheet_path, render, options)
        index["contact_sheet"] = str(sheet_path.relative_to(outdir)) if sheet_path.is_relative_to(outdir) \
            else str(sheet_path)
    index["seconds"] = round(time.perf_counter() - started, 3)
    (outdir / SLICES_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def make_contact_sheet(ct: Volume, path: Path, render: Any, options: SliceOptions, tiles: int = 16,
                       tile_px: int = 256) -> Path:
    """One image: ``tiles`` axial slices evenly spread over the volume, then the middle coronal and
    sagittal slices, each with its plane and number written in a corner."""
    from PIL import Image, ImageDraw

    items: list[tuple[str, PlaneView, int]] = []
    axial = plane_view(ct, "axial")
    n = ct.array.shape[axial.slice_axis]
    count = min(tiles, n)
    for number in np.linspace(0, n - 1, count + 2)[1:-1].round().astype(int) if count < n else range(n):
        items.append(("axial", axial, int(number)))
    for plane in ("coronal", "sagittal"):
        view = plane_view(ct, plane)
        items.append((plane, view, ct.array.shape[view.slice_axis] // 2))
    columns = 6
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * tile_px, rows * tile_px), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for n_item, (plane, view, number) in enumerate(items):
        size_rows = ct.array.shape[view.row_axis] * _spacing_of_axis(ct, view.row_axis)
        size_cols = ct.array.shape[view.col_axis] * _spacing_of_axis(ct, view.col_axis)
        scale = tile_px / max(size_rows, size_cols)
        size = (max(1, int(size_cols * scale)), max(1, int(size_rows * scale)))
        img = Image.fromarray(render(view, number, size)).convert("RGB")
        x = (n_item % columns) * tile_px + (tile_px - size[0]) // 2
        y = (n_item // columns) * tile_px + (tile_px - size[1]) // 2
        sheet.paste(img, (x, y))
        draw.text(((n_item % columns) * tile_px + 4, (n_item // columns) * tile_px + 2),
                  f"{plane[:3].upper()} {number + 1}", fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, compress_level=6)
    return path


def slices_stage(ctx: Any) -> None:
    """Output stage ``slices``: ``slices/`` (PNG stacks + ``slices.json``) and ``contact_sheet.png`` in
    the run folder, the labels drawn over the CT. Options: :class:`SliceOptions` fields (``window``,
    ``planes``, ``every``, ``flat``, ``overlay_alpha``, ``palette``)."""
    options = SliceOptions.from_dict(ctx.options)
    outdir = Path(ctx.outdir) / "slices"
    sheet = Path(ctx.outdir) / CONTACT_SHEET
    if outdir.is_dir():  # an earlier run's slices in this run folder must not pass for this one's
        import shutil

        shutil.rmtree(outdir)
    index = write_slices(ctx.ct, outdir, options, labels=ctx.labels, contact_sheet=sheet)
    ctx.artifacts["slices"] = outdir
    if options.contact_sheet:
        ctx.artifacts["contact_sheet"] = sheet
    ctx.qc["slices"] = {"planes": {p: v["written"] for p, v in index["planes"].items()},
                        "window": options.window, "seconds": index["seconds"]}
