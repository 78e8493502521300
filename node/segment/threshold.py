"""The ``threshold`` engine: classical CT thresholds and morphology, no weights, seconds anywhere.

It names only what Hounsfield units can tell apart, never organs:

======================  ===============================  ==========================================
class                   HU (after light smoothing)       what it really is
======================  ===============================  ==========================================
1 ``body``              the rest of the body outline     skin, partial-volume edges, what no other
                                                         class claims; the body outline is the union
                                                         of all ids
2 ``bone``              >= ``bone_hu``, holes filled     cortical shells and the cancellous bone
                        per slice                        they enclose; calcifications
3 ``air_in_body``       < ``body_hu``, enclosed by the   lungs, airways and bowel gas alike
                        body (per slice)
4 ``fat``               ``fat_hu`` range                 subcutaneous and visceral fat
5 ``enhanced_vessels``  >= ``vessel_hu``, not bone,      contrast-filled vessels, with anything
                        tubular parts only               else enhancing as much (renal cortex, ...)
                                                         where it is thinner than ``blob_radius_mm``
6 ``soft_tissue``       >= ``soft_hu``, not bone or      muscle, parenchyma (enhancing organs too),
                        vessel                           bowel wall, fluid
======================  ===============================  ==========================================

Steps: the body is the largest connected component above ``body_hu`` with holes filled slice by
slice (k); bone is thresholded, closed and hole-filled per slice; vessels are the enhanced voxels
outside a one-voxel margin of bone, minus "blobs" (what survives an opening with a ball of
``blob_radius_mm``, i.e. parts too thick to be a vessel such as an enhancing kidney or a heart
chamber, and the rim the opening leaves on them), minus components under ``min_component_ml``.
Every threshold can be changed through ``SegmentRequest.options`` (the keys of
:class:`ThresholdParams`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

from node.classes import Code, LabelClass, LabelVolume
from node.segment import SegmentationError, SegmentRequest, morphology
from node.volume import Volume

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
BODY_SUBSTANCE = Code("91720002", "SCT", "Body Substance")

BODY, BONE, AIR, FAT, VESSELS, SOFT = 1, 2, 3, 4, 5, 6

CLASSES: dict[int, LabelClass] = {
    c.id: c
    for c in (
        LabelClass(BODY, "body", (177, 122, 101), "Other", ANATOMICAL_STRUCTURE,
                   Code("38266002", "SCT", "Entire body")),
        LabelClass(BONE, "bone", (241, 214, 145), "Bone", TISSUE, Code("272673000", "SCT", "Bone structure")),
        LabelClass(AIR, "air_in_body", (170, 250, 250), "Other", BODY_SUBSTANCE,
                   Code("74947009", "SCT", "Gas")),
        LabelClass(FAT, "fat", (230, 220, 70), "Other", TISSUE, Code("55603005", "SCT", "Adipose tissue")),
        LabelClass(VESSELS, "enhanced_vessels", (216, 101, 79), "Vessel", ANATOMICAL_STRUCTURE,
                   Code("59820001", "SCT", "Blood vessel")),
        LabelClass(SOFT, "soft_tissue", (200, 150, 130), "Other", TISSUE,
                   Code("87784001", "SCT", "Soft tissue")),
    )
}


@dataclass(frozen=True)
class ThresholdParams:
    """Thresholds (HU) and sizes (mm, ml); defaults suit a portal-venous abdominal CT."""

    body_hu: float = -500.0
    fat_hu: tuple[float, float] = (-190.0, -30.0)
    soft_hu: float = -29.0
    vessel_hu: float = 130.0
    bone_hu: float = 300.0
    #: Gaussian smoothing before thresholds (mm, sigma); 0 = none.
    smooth_mm: float = 1.0
    #: Enhanced parts thicker than a ball of this radius are not vessels (kidneys, enhancing organs).
    blob_radius_mm: float = 15.0
    #: Bone and vessel components smaller than this are dropped (noise, specks).
    min_component_ml: float = 0.1

    @classmethod
    def from_options(cls, options: dict[str, object]) -> ThresholdParams:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in options.items():
            if key not in known:
                continue  # options for other engines or stages
            try:
                if key == "fat_hu":
                    values[key] = tuple(float(v) for v in value)  # type: ignore[union-attr]
                else:
                    values[key] = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise SegmentationError(
                    "bad_option", f"threshold option {key}={value!r} is not a number"
                ) from None
        return cls(**values)  # type: ignore[arg-type]


def _thick_parts(mask: np.ndarray, radius_mm: float, spacing_kji: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` too thick for a vessel: its opening by a ball of ``radius_mm`` (by
    distance transforms), plus the leftovers that never get further than ``radius_mm`` from that
    opening (the edges and corners an opening cuts off). Leftovers reaching further are tubes
    leaving the blob, and stay."""
    out = np.zeros_like(mask)
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return out
    box = found[0]  # distance transforms cost per voxel: work in the mask's bounding box only,
    # padded with background so that distances are measured to the mask's edge as in the full array
    out[box] = _thick_parts_in(np.pad(mask[box], 1), radius_mm, spacing_kji)[1:-1, 1:-1, 1:-1]
    return out


def _thick_parts_in(mask: np.ndarray, radius_mm: float, spacing_kji: np.ndarray) -> np.ndarray:
    core = morphology.distance(mask, spacing_kji) > radius_mm
    if not core.any():
        return np.zeros_like(mask)
    opened = (morphology.distance(~core, spacing_kji) <= radius_mm) & mask
    rest, n = morphology.label(mask & ~opened)
    if n == 0:
        return opened
    # A leftover piece is rim when none of its voxels lies further than radius_mm from the opening.
    far = np.zeros(n + 1, bool)
    far[rest[morphology.distance(~opened, spacing_kji) > radius_mm]] = True
    return opened | ((rest > 0) & ~far[rest])


class ThresholdEngine:
    """Embedded classical engine; see the module docstring for what each class means."""

    name = "threshold"

    def segment(self, volume: Volume, request: SegmentRequest) -> LabelVolume:
        modality = volume.source.modality if volume.source else "CT"
        if modality != "CT":
            raise SegmentationError(
                "unsupported_modality", f"the threshold engine needs CT in Hounsfield units, not {modality}"
            )
        p = ThresholdParams.from_options(dict(request.options))
        spacing_kji = np.asarray(volume.geometry.spacing[::-1], float)
        voxel_ml = float(np.prod(spacing_kji)) / 1000.0
        min_voxels = int(np.ceil(p.min_component_ml / voxel_ml))

        hu = volume.array.astype(np.float32)
        if p.smooth_mm > 0:
            hu = ndimage.gaussian_filter(hu, sigma=p.smooth_mm / spacing_kji, truncate=2.5)

        dense = morphology.largest_component(hu > p.body_hu)
        body = morphology.fill_holes_per_slice(dense)
        if not body.any():
            raise SegmentationError("empty_body", f"no voxel above {p.body_hu:g} HU: is this a CT in HU?")

        # Closing (on a padded copy: at the array's edge scipy's closing would erode) seals cortices.
        bone = morphology.erode(morphology.dilate(np.pad(hu >= p.bone_hu, 1)))[1:-1, 1:-1, 1:-1]
        bone = morphology.drop_small(morphology.fill_holes_per_slice(bone) & body, min_voxels)

        near_bone = morphology.dilate(bone, cube=True)
        enhanced = (hu >= p.vessel_hu) & body & ~near_bone
        blobs = _thick_parts(enhanced, p.blob_radius_mm, spacing_kji)
        vessels = morphology.drop_small(enhanced & ~blobs, min_voxels)

        labels = np.zeros(hu.shape, np.uint8)
        labels[body] = BODY
        labels[body & (hu >= p.soft_hu)] = SOFT  # enhancing parenchyma and blobs included
        labels[body & (hu >= p.fat_hu[0]) & (hu <= p.fat_hu[1])] = FAT
        labels[body & ~dense] = AIR  # what hole filling added: air enclosed by the body
        labels[vessels] = VESSELS
        labels[bone] = BONE

        present = {int(v) for v in np.unique(labels)} - {0}
        notes = [
            "threshold engine: classes are HU ranges, not organs; parameters "
            + ", ".join(f"{k}={v}" for k, v in asdict(p).items()),
            f"blobs too thick for a vessel (not labelled as vessels): {int(blobs.sum())} voxels",
        ]
        if request.fast or request.fastest or request.robust_crop:
            notes.append("threshold engine: --fast/--fastest/--robust_crop change nothing here")
        return LabelVolume(
            array=labels,
            geometry=volume.geometry,
            source=volume.source,
            notes=notes,
            classes={i: c for i, c in CLASSES.items() if i in present},
        )
