"""TotalSegmentator's classes as :class:`~node.classes.LabelClass`: names, SNOMED CT codes, colours.

The codes and colours come from TotalSegmentator's own mapping,
``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``, read from the installed package
(never a copy), so they follow the TotalSegmentator version the node runs. Its columns are the
DICOM-SEG attributes (PS3.3 C.8.20.2): SegmentedPropertyCategory/Type/TypeModifier codes,
AnatomicRegion(+Modifier) codes and a display colour (``DicomRGBColor``; a
``RecommendedDisplayCIELabValue`` column, as dcmqi uses, is converted to RGB).
A structure missing from the mapping still gets a class: its name, a stable colour, no codes.
"""

from __future__ import annotations

import colorsys
import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources

from node.classes import Code, LabelClass

MAPPING_RESOURCE = "resources/totalsegmentator_snomed_mapping.csv"


@dataclass(frozen=True)
class SnomedEntry:
    """One row of TotalSegmentator's mapping, as codes."""

    structure: str
    category: Code | None
    type: Code | None
    type_modifier: Code | None
    anatomic_region: Code | None
    anatomic_region_modifier: Code | None
    color: tuple[int, int, int] | None


def _code(row: dict[str, str], prefix: str) -> Code | None:
    value = (row.get(f"{prefix}.CodeValue") or "").strip()
    scheme = (row.get(f"{prefix}.CodingSchemeDesignator") or "").strip()
    meaning = (row.get(f"{prefix}.CodeMeaning") or "").strip()
    return Code(value, scheme, meaning) if value and scheme else None


def cielab_to_rgb(lab: tuple[int, int, int]) -> tuple[int, int, int]:
    """DICOM's scaled CIELab (PS3.3 C.10.7.1.1: L 0..65535 = 0..100, a/b 0..65535 = -128..127; D65)
    to 8-bit sRGB."""
    L = lab[0] * 100.0 / 65535.0
    a = lab[1] * 255.0 / 65535.0 - 128.0
    b = lab[2] * 255.0 / 65535.0 - 128.0
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0

    def finv(t: float) -> float:
        return t**3 if t > 6.0 / 29.0 else 3 * (6.0 / 29.0) ** 2 * (t - 4.0 / 29.0)

    white = (0.95047, 1.0, 1.08883)  # D65
    x, y, z = white[0] * finv(fx), white[1] * finv(fy), white[2] * finv(fz)
    linear = (
        3.2404542 * x - 1.5371385 * y - 0.4985314 * z,
        -0.9692660 * x + 1.8760108 * y + 0.0415560 * z,
        0.0556434 * x - 0.2040259 * y + 1.0572252 * z,
    )

    def gamma(c: float) -> int:
        c = min(max(c, 0.0), 1.0)
        c = 12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055
        return int(round(c * 255))

    return (gamma(linear[0]), gamma(linear[1]), gamma(linear[2]))


def _color(row: dict[str, str]) -> tuple[int, int, int] | None:
    rgb = (row.get("DicomRGBColor") or "").strip()
    if rgb:
        values = [int(round(float(v))) for v in rgb.replace(";", ",").split(",") if v.strip()]
        if len(values) == 3:
            return (values[0], values[1], values[2])
    for key in ("RecommendedDisplayCIELabValue", "recommendedDisplayCIELabValue"):
        lab = (row.get(key) or "").strip()
        if lab:
            values = [int(round(float(v))) for v in lab.strip("[]").replace(";", ",").split(",") if v.strip()]
            if len(values) == 3:
                return cielab_to_rgb((values[0], values[1], values[2]))
    return None


@cache
def mapping() -> dict[str, SnomedEntry]:
    """TotalSegmentator's mapping by structure name, read from the installed package."""
    text = resources.files("totalsegmentator").joinpath(MAPPING_RESOURCE).read_text(encoding="utf-8")
    table: dict[str, SnomedEntry] = {}
    for row in csv.DictReader(io.StringIO(text)):
        name = (row.get("Structure") or "").strip()
        if not name:
            continue
        table[name] = SnomedEntry(
            structure=name,
            category=_code(row, "SegmentedPropertyCategoryCodeSequence"),
            type=_code(row, "SegmentedPropertyTypeCodeSequence"),
            type_modifier=_code(row, "SegmentedPropertyTypeModifierCodeSequence"),
            anatomic_region=_code(row, "AnatomicRegionSequence"),
            anatomic_region_modifier=_code(row, "AnatomicRegionModifierSequence"),
            color=_color(row),
        )
    return table


# Words in a structure's name (or its type's meaning) that place it in a category; first match wins,
# in the order of this list (so "pulmonary_artery" is a Vessel, not Thoracic).
_CATEGORY_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Vessel", ("aorta", "artery", "arteries", "vein", "vena", "venous", "vessel", "trunk", "portal",
                "aortic_sinus", "annulus", "lumen")),
    ("Bone", ("vertebra", "rib", "sacrum", "femur", "hip", "humerus", "scapula", "clavicula", "sternum",
              "skull", "cartilage", "patella", "tibia", "fibula", "radius", "ulna", "carpal", "tarsal",
              "phalanges", "mandible", "maxilla", "teeth", "tooth", "bone", "coccyx", "hyoid", "skeleton")),
    ("Muscle", ("muscle", "gluteus", "iliopsoas", "autochthon", "psoas", "quadriceps", "sartorius",
                "deltoid", "trapezius", "masseter", "temporalis", "pterygoid", "sternocleidomastoid",
                "platysma", "rectus", "oblique", "erector", "diaphragm")),
    ("Thoracic", ("lung", "heart", "atrium", "atrial", "ventricle_left", "ventricle_right", "myocardium",
                  "trachea", "bronch", "esophagus", "pleural", "pericard", "mediastinum", "thymus",
                  "breast", "airway")),
    ("Abdominal", ("liver", "hepat", "spleen", "kidney", "renal", "pancrea", "gallbladder", "stomach",
                   "duodenum", "bowel", "colon", "adrenal", "bladder", "prostate", "bile", "abdominal",
                   "appendix", "rectum", "uterus", "ovary")),
)


def guess_category(name: str, entry: SnomedEntry | None = None) -> str:
    """One of :data:`node.classes.CATEGORIES` for a structure, from its name and type code meaning."""
    words = [name.lower()]
    if entry is not None and entry.type is not None:
        words.append(entry.type.meaning.lower())
    for category, keys in _CATEGORY_WORDS:
        if any(key in text for text in words for key in keys):
            return category
    return "Other"


def fallback_color(label_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour for a structure the mapping does not list (golden-angle hues)."""
    hue = (label_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def label_class(label_id: int, name: str) -> LabelClass:
    """The class of TotalSegmentator structure ``name`` under ``label_id``."""
    entry = mapping().get(name)
    return LabelClass(
        id=label_id,
        name=name,
        color=(entry.color if entry is not None and entry.color is not None else fallback_color(label_id)),
        category=guess_category(name, entry),
        property_category=entry.category if entry is not None else None,
        property_type=entry.type if entry is not None else None,
    )


def task_classes(task: str, roi_subset: tuple[str, ...] | list[str] = ()) -> dict[int, LabelClass]:
    """The classes a TotalSegmentator task outputs (only ``roi_subset``'s, if given), by label id."""
    from totalsegmentator.map_to_binary import class_map

    if task not in class_map:
        raise KeyError(f"TotalSegmentator has no class map for task {task!r}")
    wanted = set(roi_subset)
    return {
        int(i): label_class(int(i), name)
        for i, name in sorted(class_map[task].items())
        if not wanted or name in wanted
    }
