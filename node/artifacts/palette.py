"""Colours of structures for meshes, the Blender scene and slice overlays.

Two palettes, the names users of the DICOM-to-Blender tool chain know (``--palette exact|auto``):

* ``exact``: each class's own colour, as the label table gives it; for TotalSegmentator's classes that
  is the DICOM colour of TotalSegmentator's SNOMED mapping (what OHIF shows for our DICOM-SEG).
* ``auto``: semantic colours: arteries red, veins blue, portal veins deep blue, hepatic veins blue-violet,
  bones cream, cartilage pale, muscles dark red, the spinal cord yellow, known organs their usual colours
  (liver red-brown, spleen purple, kidneys maroon, ...), other structures distinct hues by id.

A JSON mapping file overrides both: ``{"liver": [0.35, 0.05, 0.04], "aorta": "#d03020",
"hepatic_veins": [20, 0, 95, 255]}``; lists of 0..1 floats or 0..255 ints (RGB or RGBA), or ``#rrggbb``.
A list of ``{"name": ..., "color": ...}`` rows (a class table) works too.

Colours here are sRGB, 0..255 ints; the Blender script converts them to Blender's linear space.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from node.classes import LabelClass

RGB = tuple[int, int, int]
PALETTES = ("exact", "auto")

ARTERY: RGB = (200, 40, 40)
VEIN: RGB = (40, 80, 200)
PORTAL: RGB = (20, 30, 140)
HEPATIC_VEIN: RGB = (70, 40, 170)
BONE: RGB = (235, 222, 190)
CARTILAGE: RGB = (215, 225, 235)
MUSCLE: RGB = (150, 45, 40)
NERVE: RGB = (240, 210, 60)

#: Usual organ colours (sRGB), by a word of the structure's name; first match wins.
ORGANS: tuple[tuple[str, RGB], ...] = (
    ("liver", (160, 70, 50)),
    ("spleen", (130, 60, 130)),
    ("kidney_cyst", (230, 220, 120)),
    ("kidney", (130, 30, 40)),
    ("adrenal", (230, 170, 60)),
    ("gallbladder", (70, 140, 60)),
    ("pancreas", (235, 190, 120)),
    ("stomach", (220, 140, 120)),
    ("esophagus", (210, 130, 110)),
    ("duodenum", (225, 160, 120)),
    ("small_bowel", (235, 175, 140)),
    ("colon", (200, 150, 110)),
    ("urinary_bladder", (230, 200, 90)),
    ("prostate", (200, 130, 150)),
    ("lung", (230, 170, 170)),
    ("trachea", (180, 220, 230)),
    ("heart", (180, 40, 50)),
    ("atrial_appendage", (190, 60, 70)),
    ("thyroid", (170, 90, 120)),
    ("brain", (230, 200, 190)),
    ("spinal_cord", NERVE),
    ("skull", BONE),
)

_ARTERY_WORDS = ("artery", "arteries", "aorta", "aortic", "brachiocephalic_trunk", "celiac_trunk")
_VEIN_WORDS = ("vein", "vena", "venous")


def _hex(text: str) -> RGB:
    h = text.strip().lstrip("#")
    if len(h) != 6:
        raise ValueError(f"not a #rrggbb colour: {text!r}")
    return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))


def parse_color(value: Any) -> tuple[int, int, int, int]:
    """RGBA 0..255 from ``#rrggbb``, or 3/4 numbers: all <= 1 (and any float) read as 0..1 floats."""
    if isinstance(value, str):
        return (*_hex(value), 255)
    if isinstance(value, dict):
        value = value.get("color", value.get("rgb"))
        return parse_color(value)
    values = [float(v) for v in value]
    if len(values) not in (3, 4):
        raise ValueError(f"a colour has 3 or 4 components, got {value!r}")
    unit = all(v <= 1.0 for v in values) and any(isinstance(v, float) for v in value)
    scaled = [round(v * 255) if unit else round(v) for v in values]
    if any(not 0 <= v <= 255 for v in scaled):
        raise ValueError(f"colour components out of range: {value!r}")
    if len(scaled) == 3:
        scaled.append(255)
    return (scaled[0], scaled[1], scaled[2], scaled[3])


def load_mapping(path: Path | str) -> dict[str, tuple[int, int, int, int]]:
    """A colour mapping file (see the module docstring) as name -> RGBA 0..255."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON colour mapping ({exc})") from None
    rows: Iterable[tuple[str, Any]]
    if isinstance(data, dict):
        rows = data.items()
    elif isinstance(data, list):
        rows = [(str(r["name"]), r.get("color")) for r in data if isinstance(r, dict) and "name" in r]
    else:
        raise ValueError(f"{path}: a colour mapping is an object name -> colour, or a list of rows")  # noqa: TRY004
    out = {}
    for name, value in rows:
        try:
            out[str(name)] = parse_color(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: colour of {name!r}: {exc}") from None
    return out


def distinct_color(index: int) -> RGB:
    """Well-spread hues by index (golden angle), mid saturation."""
    hue = (index * 0.618033988749895 + 0.1) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.55, 0.85)
    return (round(r * 255), round(g * 255), round(b * 255))


def auto_color(name: str, category: str = "Other", label: int = 0) -> RGB:
    """The semantic colour of a structure (see the module docstring)."""
    n = name.lower()
    if "portal" in n:
        return PORTAL
    if "hepatic_vein" in n:
        return HEPATIC_VEIN
    if any(w in n for w in _ARTERY_WORDS):
        return ARTERY
    if any(w in n for w in _VEIN_WORDS):
        return VEIN
    if "cartilage" in n:
        return CARTILAGE
    for word, rgb in ORGANS:
        if word in n:
            return rgb
    if category == "Bone":
        return BONE
    if category == "Muscle":
        return MUSCLE
    if category == "Vessel":
        return ARTERY if "arter" in n else VEIN
    return distinct_color(label)


def structure_color(
    name: str,
    exact: RGB | tuple[int, ...] | None = None,
    category: str = "Other",
    label: int = 0,
    palette: str = "exact",
    mapping: dict[str, tuple[int, int, int, int]] | None = None,
) -> tuple[int, int, int, int]:
    """RGBA 0..255 of one structure: the mapping's colour, else the palette's."""
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {', '.join(PALETTES)}, got {palette!r}")
    if mapping and name in mapping:
        return mapping[name]
    if palette == "exact" and exact is not None:
        r, g, b = (int(c) for c in tuple(exact)[:3])
        return (r, g, b, 255)
    return (*auto_color(name, category, label), 255)


def class_colors(
    classes: dict[int, LabelClass], palette: str = "exact",
    mapping: dict[str, tuple[int, int, int, int]] | None = None,
) -> dict[int, tuple[int, int, int, int]]:
    """RGBA 0..255 by label id for a class table."""
    return {i: structure_color(c.name, c.color, c.category, i, palette, mapping) for i, c in classes.items()}


def category_of(name: str) -> str:
    """A category for a bare structure name (a mesh file without a class table)."""
    from node.segment.snomed import guess_category

    return guess_category(name)
