"""Coded concepts and colours of segments: what a DICOM-SEG says each label class is.

A segment of a DICOM-SEG (PS3.3 C.8.20.2, Segment Description macro) names its structure with codes:
SegmentedPropertyCategoryCodeSequence (CID 7150), SegmentedPropertyTypeCodeSequence (CID 7151, with an
optional SegmentedPropertyTypeModifierCodeSequence such as *Left*), and optionally
AnatomicRegionSequence (+ AnatomicRegionModifierSequence), and shows it in
RecommendedDisplayCIELabValue (PS3.3 C.10.7.1.1).

:func:`segment_codes` decides them for a :class:`~node.classes.LabelClass`, in this order:

1. the class's own ``property_category`` / ``property_type`` (engines and stages that know better);
2. TotalSegmentator's own mapping (:mod:`node.segment.snomed`) for a class of that name: its
   category, type, type modifier, anatomic region and region modifier (modifier and region only when
   the type agrees with the class's own type, so codes are never mixed across structures);
3. :data:`DERIVED_CODES`: the node's own derived classes (portal and hepatic vein branches, enhanced
   vessels, threshold classes);
4. by the class's category: *Blood vessel* for vessels, *Bone structure*, *Skeletal muscle*, else
   the generic *Anatomical structure* (SCT 91723000) in category *Anatomical Structure* (SCT 123037004).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.classes import Code, LabelClass

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
BODY_SUBSTANCE = Code("91720002", "SCT", "Body Substance")
#: The generic property type for a structure nothing more is known of.
GENERIC_STRUCTURE = Code("91723000", "SCT", "Anatomical structure")
BLOOD_VESSEL = Code("59820001", "SCT", "Blood vessel")
PORTAL_VEIN = Code("32764006", "SCT", "Portal vein")
HEPATIC_VEIN = Code("8993003", "SCT", "Hepatic vein")
LIVER = Code("10200004", "SCT", "Liver")
BONE_STRUCTURE = Code("272673000", "SCT", "Bone structure")
SKELETAL_MUSCLE = Code("127954009", "SCT", "Skeletal muscle")


@dataclass(frozen=True)
class SegmentCodes:
    """The codes of one segment (PS3.3 C.8.20.2); ``None`` where not known."""

    category: Code
    type: Code
    type_modifier: Code | None = None
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None


#: Codes of the classes the node derives itself (post-processing stages, the threshold engine),
#: by class name; TotalSegmentator's own names come from its mapping.
DERIVED_CODES: dict[str, SegmentCodes] = {
    "portal_vein_branches": SegmentCodes(ANATOMICAL_STRUCTURE, PORTAL_VEIN, anatomic_region=LIVER),
    "hepatic_veins": SegmentCodes(ANATOMICAL_STRUCTURE, HEPATIC_VEIN, anatomic_region=LIVER),
    "liver_vessels": SegmentCodes(ANATOMICAL_STRUCTURE, BLOOD_VESSEL, anatomic_region=LIVER),
    "enhanced_vessels": SegmentCodes(ANATOMICAL_STRUCTURE, BLOOD_VESSEL),
    "body": SegmentCodes(ANATOMICAL_STRUCTURE, Code("38266002", "SCT", "Entire body")),
    "bone": SegmentCodes(TISSUE, BONE_STRUCTURE),
    "air_in_body": SegmentCodes(BODY_SUBSTANCE, Code("74947009", "SCT", "Gas")),
    "fat": SegmentCodes(TISSUE, Code("55603005", "SCT", "Adipose tissue")),
    "soft_tissue": SegmentCodes(TISSUE, Code("87784001", "SCT", "Soft tissue")),
}

#: Fallback property type by :data:`node.classes.CATEGORIES` entry.
_BY_CATEGORY = {"Vessel": BLOOD_VESSEL, "Bone": BONE_STRUCTURE, "Muscle": SKELETAL_MUSCLE}


def _totalseg_entry(name: str):  # -> SnomedEntry | None
    try:
        from node.segment.snomed import mapping

        return mapping().get(name)
    except Exception:  # TotalSegmentator not installed, or its resource unreadable
        return None


def segment_codes(label_class: LabelClass) -> SegmentCodes:
    """The codes a SEG segment gets for ``label_class`` (see the module docstring for the order)."""
    own_category, own_type = label_class.property_category, label_class.property_type
    entry = _totalseg_entry(label_class.name)
    derived = DERIVED_CODES.get(label_class.name)
    if entry is not None and entry.type is not None:
        known = SegmentCodes(entry.category or ANATOMICAL_STRUCTURE, entry.type, entry.type_modifier,
                             entry.anatomic_region, entry.anatomic_region_modifier)
    else:
        known = derived
    if own_type is not None:
        if known is not None and _same(known.type, own_type):
            return SegmentCodes(own_category or known.category, own_type, known.type_modifier,
                                known.anatomic_region, known.anatomic_region_modifier)
        return SegmentCodes(own_category or ANATOMICAL_STRUCTURE, own_type)
    if known is not None:
        return SegmentCodes(own_category or known.category, known.type, known.type_modifier,
                            known.anatomic_region, known.anatomic_region_modifier)
    return SegmentCodes(own_category or ANATOMICAL_STRUCTURE,
                        _BY_CATEGORY.get(label_class.category, GENERIC_STRUCTURE))


def _same(a: Code, b: Code) -> bool:
    return (a.value, a.scheme) == (b.value, b.scheme)


def rgb_to_cielab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """8-bit sRGB to DICOM's scaled CIELab (RecommendedDisplayCIELabValue, PS3.3 C.10.7.1.1)."""
    from highdicom.color import CIELabColor

    value = CIELabColor.from_rgb(*rgb).value
    return (int(value[0]), int(value[1]), int(value[2]))


def cielab_to_rgb(lab: tuple[int, int, int]) -> tuple[int, int, int]:
    """DICOM's scaled CIELab to 8-bit sRGB (the inverse of :func:`rgb_to_cielab`, exact for 8-bit
    colours)."""
    from node.segment.snomed import cielab_to_rgb as convert

    return convert(lab)
