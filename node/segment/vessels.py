"""Liver vessel enhancement and the portal vs hepatic vein split, as a post-processing stage.

The same steps, and flag names, as TotalSegmentatorEnhanced (``../shared/reference/
totalsegmentator-enhanced-liver-vessels.md``): ``--min_component_size``, ``--no_fallback_full_liver``,
``--split_portal_hepatic``, ``--split_support_dir``, ``--generate_split_support``, ``--no_skeleton``,
``--min_split_component_size`` are the fields of :class:`VesselOptions`.

Plain functions on Volumes:

* :func:`enhance_liver_vessels` ``(ct, liver, vessels | None, options) -> (vessel mask, metadata)``:
  keeps the intrahepatic vessels, drops components under ``min_component_size`` voxels. Without a
  ``liver_vessels`` label (TotalSegmentator's ``total`` task, the phantom) the vessels are found in
  the CT inside the liver: a smoothed CT above thresholds set from the parenchyma (median, noise)
  and from the contrast of the portal vein and IVC, grown from where it is clearly bright and
  connected to those veins, then trimmed at 0.4 of the local peak contrast (its skeleton kept).
* :func:`split_portal_hepatic` ``(vessels, portal_seed_mask, hepatic_seed_mask, options) ->
  VesselSplit``: portal (1) / hepatic (2) labels with their class table, the labelled skeleton,
  QC. The algorithm is in :mod:`node.segment.vessel_split`.
* :func:`liver_vessels_stage`: both, as the pipeline's ``liver_vessels`` stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from node.classes import Code, LabelClass, LabelVolume
from node.segment import SegmentationError, SegmentRequest
from node.segment.vessel_split import HEPATIC, PORTAL, split_arrays
from node.volume import Volume

if TYPE_CHECKING:
    from node.stages import PipelineContext

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
PORTAL_VEIN = Code("32764006", "SCT", "Portal vein")
HEPATIC_VEIN = Code("8993003", "SCT", "Hepatic vein")
BLOOD_VESSEL = Code("59820001", "SCT", "Blood vessel")
#: The split's class table (ids of the labelled map: 1 portal, 2 hepatic).
SPLIT_CLASSES = {
    PORTAL: LabelClass(PORTAL, "portal_vein_branches", (0, 40, 200), "Vessel",  # deep blue
                       ANATOMICAL_STRUCTURE, PORTAL_VEIN),
    HEPATIC: LabelClass(HEPATIC, "hepatic_veins", (138, 43, 226), "Vessel",  # blue-violet
                        ANATOMICAL_STRUCTURE, HEPATIC_VEIN),
}
#: Ids the stage gives these classes in the run's label map (the phantom's ground truth uses the same).
STAGE_IDS = {"liver_vessels": 200, "portal_vein_branches": 201, "hepatic_veins": 202}
SUPPORT_NAMES = ("liver", "portal_vein_and_splenic_vein", "inferior_vena_cava")
#: Classes the stage writes (and replaces when the labels already hold them).
VESSEL_NAMES = ("liver_vessels", "portal_vein_branches", "hepatic_veins")
CUBE = np.ones((3, 3, 3), bool)


class VesselError(SegmentationError):
    """A specific, recorded refusal: ``no_liver``, ``no_vessels``, ``grid_mismatch``, ``bad_options``."""


@dataclass(frozen=True)
class VesselOptions:
    """The stage's options; the first seven are TotalSegmentatorEnhanced's flags."""

    #: Connected components (26-neighbourhood) of the vessel mask smaller than this (voxels) are dropped.
    min_component_size: int = 30
    #: Without a liver, fail (``no_liver``) instead of taking the whole volume as the liver.
    no_fallback_full_liver: bool = False
    split_portal_hepatic: bool = False
    #: A folder of masks liver.nii.gz, portal_vein_and_splenic_vein.nii.gz, inferior_vena_cava.nii.gz.
    split_support_dir: Path | None = None
    #: Run TotalSegmentator ``total --roi_subset`` for support labels the run and the folder lack.
    generate_split_support: bool = False
    #: Split by a geodesic competition over the voxels, without the skeleton graph; no labelled skeleton.
    no_skeleton: bool = False
    #: Pieces of one tree smaller than this (voxels) that touch the other tree join it.
    min_split_component_size: int = 20
    #: Vessel voxels this close (mm) to the portal vein / IVC are the seeds of their tree.
    seed_distance_mm: float = 3.0
    #: Fragments up to this far (mm) from a labelled vessel take its label (gaps in a branch).
    max_gap_mm: float = 10.0
    #: Cost (mm of ordinary vessel) of switching from one vessel to the other at a crossing.
    crossing_penalty_mm: float = 30.0

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> VesselOptions:
        """From a config/CLI mapping; keys may be written ``--no_skeleton`` or ``no-skeleton``."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw, value in options.items():
            key = str(raw).lstrip("-").replace("-", "_")
            if key not in known:
                raise VesselError("bad_options",
                                  f"unknown liver_vessels option {raw!r}; known: {', '.join(known)}")
            default = known[key].default
            try:
                if isinstance(default, bool):
                    if isinstance(value, str):
                        if value.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                            raise ValueError(value)
                        value = value.strip().lower() in ("1", "true", "yes", "on")
                    values[key] = bool(value)
                elif isinstance(default, int):
                    values[key] = int(value)
                elif isinstance(default, float):
                    values[key] = float(value)
                else:  # split_support_dir
                    values[key] = None if value in (None, "") else Path(str(value))
            except (TypeError, ValueError):
                raise VesselError("bad_options",
                                  f"liver_vessels option {key}: cannot use {value!r}") from None
        return cls(**values)


# --- enhancement ----------------------------------------------------------------------------------


def _check_grid(reference: Volume, *others: Volume | None) -> None:
    for other in others:
        if other is not None and (other.array.shape != reference.array.shape
                                  or not other.geometry.same_grid(reference.geometry)):
            raise VesselError("grid_mismatch",
                              "the vessel, liver and support masks must lie on the CT's grid")


def enhance_liver_vessels(ct: Volume | None, liver: Volume | None, vessels: Volume | None,
                          options: VesselOptions = VesselOptions(), *, portal: Volume | None = None,
                          ivc: Volume | None = None) -> tuple[Volume, dict[str, Any]]:
    """The intrahepatic vessel mask (uint8 0/1 on the CT grid) and its metadata (voxels, volume in ml,
    components, fallbacks used). ``vessels`` None: found in ``ct`` (see the module docstring)."""
    reference = ct if ct is not None else vessels
    if reference is None:
        raise VesselError("no_vessels", "neither a liver_vessels label nor a CT to find the vessels in")
    _check_grid(reference, liver, vessels, portal, ivc)
    shape, spacing = reference.array.shape, np.asarray(reference.geometry.spacing[::-1], float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    meta: dict[str, Any] = {"fallbacks_used": [], "warnings": [],
                            "min_component_size": options.min_component_size}
    liver_mask = None if liver is None else liver.array != 0
    if liver_mask is None or not liver_mask.any():
        if options.no_fallback_full_liver:
            raise VesselError("no_liver", "no liver in the labels, and --no_fallback_full_liver "
                                          "forbids using the whole volume instead")
        if vessels is None:
            raise VesselError("no_liver",
                              "no liver in the labels: the vessels cannot be found in the CT without one")
        liver_mask = np.ones(shape, bool)
        meta["fallbacks_used"].append("full_volume_liver")
        meta["warnings"].append("no liver mask: the whole volume was taken as the liver")
    liver_voxels = int(liver_mask.sum())
    meta.update(liver_voxels=liver_voxels, liver_volume_ml=round(liver_voxels * voxel_ml, 3))

    if vessels is not None:
        mask = (vessels.array != 0) & liver_mask
        meta["method"] = "liver_vessels label inside the liver"
        meta["outside_liver_voxels"] = int(((vessels.array != 0) & ~liver_mask).sum())
    else:
        meta["fallbacks_used"].append("ct_enhancement")
        meta["method"] = "CT enhancement inside the liver (no liver_vessels label)"
        empty = np.zeros(shape, bool)
        mask, meta["ct_enhancement"] = vessels_from_ct(
            ct.array, liver_mask, spacing,
            empty if portal is None else portal.array != 0, empty if ivc is None else ivc.array != 0)

    mask, kept, removed, removed_voxels = _drop_small(mask, options.min_component_size)
    voxels = int(mask.sum())
    meta.update(voxels=voxels, volume_ml=round(voxels * voxel_ml, 3), components=kept,
                removed_components=removed, removed_voxels=removed_voxels)
    if not voxels:
        meta["warnings"].append("no liver vessel voxels left")
    out = Volume(mask.astype(np.uint8), reference.geometry, reference.source,
                 notes=["enhanced liver vessels"])
    return out, meta


def _drop_small(mask: np.ndarray, min_size: int) -> tuple[np.ndarray, int, int, int]:
    comp, n = ndimage.label(mask, CUBE)
    if n == 0:
        return mask, 0, 0, 0
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    out = keep[comp]
    return out, int(keep.sum()), int(n - keep.sum()), int(mask.sum() - out.sum())


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation."""
    m = float(np.median(values))
    return m, 1.4826 * float(np.median(np.abs(values - m)))


def vessels_from_ct(ct: np.ndarray, liver: np.ndarray, spacing_kji: np.ndarray, portal: np.ndarray,
                    ivc: np.ndarray, *, smooth_mm: float = 1.2, fine_mm: float = 1.0,
                    peak_radius_mm: float = 4.0) -> tuple[np.ndarray, dict[str, Any]]:
    """Contrast-filled vessels inside ``liver`` from the CT (HU), on the liver's bounding box.

    1. Parenchyma: median ``m`` and noise of the liver two voxels inside its edge.
    2. Expected vessel contrast ``delta``: the portal vein / IVC (inside their edges) above ``m``, the
       smaller of the two; without them the liver's 99th percentile.
    3. Smoothed CT (``smooth_mm`` Gaussian; outside the liver and the veins set to ``m``, so the liver's
       edge is no edge): *weak* above ``m + max(1.5 noise, 0.3 delta)``, *strong* above
       ``m + max(4 noise, 0.6 delta)``; the weak regions (6-connected) holding a strong voxel and,
       where there are support veins, touching them.
    4. Boundary: voxels of those regions at least 0.4 of the local peak contrast (in a box
       ``peak_radius_mm`` either side) of a finer smoothing, plus the regions' skeleton (so no branch breaks).
    """
    from skimage.morphology import skeletonize

    spacing = np.asarray(spacing_kji, float)
    support = portal | ivc
    pad = np.ceil(max(3 * smooth_mm, peak_radius_mm) / spacing).astype(int) + 2
    idx = np.nonzero(liver)
    box = tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + p + 1))
                for i, p, n in zip(idx, pad, liver.shape))
    lv, sup = liver[box], support[box]
    hu = ct[box].astype(np.float32)
    core = ndimage.binary_erosion(lv, CUBE, iterations=2)
    if core.sum() < 100:
        core = lv
    m, noise = _robust(hu[core])
    refs = []
    for s in (portal[box], ivc[box]):
        inner = ndimage.binary_erosion(s & ~lv, CUBE)
        if inner.sum() >= 10:
            refs.append(float(np.median(hu[inner])))
    filled = np.where(lv | sup, hu, np.float32(m))
    smooth = ndimage.gaussian_filter(filled, smooth_mm / spacing, truncate=3.0)
    _, s_noise = _robust(smooth[core])
    if refs:
        delta, delta_from = min(refs) - m, "portal vein / IVC"
    else:
        delta, delta_from = float(np.percentile(smooth[lv], 99)) - m, "liver 99th percentile"
    delta = float(np.clip(delta, 20.0, 400.0))
    weak_t = m + max(1.5 * s_noise, 0.3 * delta)
    strong_t = m + max(4.0 * s_noise, 0.6 * delta)
    near_support = sup & ndimage.binary_dilation(lv, CUBE, iterations=2)
    comp, n = ndimage.label(((smooth > weak_t) & lv) | near_support, ndimage.generate_binary_structure(3, 1))
    keep = np.zeros(n + 1, bool)
    keep[comp[(smooth > strong_t) & lv]] = True
    if near_support.any():
        touches = np.zeros(n + 1, bool)
        touches[comp[near_support]] = True
        keep &= touches
    keep[0] = False
    found = keep[comp] & lv
    del comp, smooth

    fine = ndimage.gaussian_filter(filled, fine_mm / spacing, truncate=3.0)
    window = 2 * np.ceil(peak_radius_mm / spacing).astype(int) + 1  # a box: separable, so fast
    peak = ndimage.maximum_filter(np.where(found, fine, np.float32(m)), size=tuple(window))
    trimmed = found & (fine - m >= 0.4 * (peak - m))
    trimmed |= skeletonize(found) > 0
    out = np.zeros(liver.shape, bool)
    out[box] = trimmed
    info = {"parenchyma_hu": round(m, 1), "noise_hu": round(noise, 1), "smoothed_noise_hu": round(s_noise, 2),
            "vessel_contrast_hu": round(delta, 1), "contrast_from": delta_from,
            "weak_threshold_hu": round(weak_t, 1), "strong_threshold_hu": round(strong_t, 1)}
    return out, info


# --- split ----------------------------------------------------------------------------------------


@dataclass
class VesselSplit:
    """The split: ``labels`` (1 portal_vein_branches, 2 hepatic_veins, with :data:`SPLIT_CLASSES`),
    the labelled skeleton (None with ``no_skeleton``) and QC."""

    labels: LabelVolume
    skeleton: LabelVolume | None
    qc: dict[str, Any] = field(default_factory=dict)

    def masks(self) -> dict[str, Volume]:
        """One uint8 mask per class, by class name."""
        return {c.name: self.labels.with_array((self.labels.array == i).astype(np.uint8))
                for i, c in SPLIT_CLASSES.items()}


def split_portal_hepatic(vessels: Volume, portal_seed_mask: Volume | None, hepatic_seed_mask: Volume | None,
                         options: VesselOptions = VesselOptions()) -> VesselSplit:
    """Label each vessel voxel portal or hepatic, seeded where the vessels meet
    ``portal_vein_and_splenic_vein`` (``portal_seed_mask``) and ``inferior_vena_cava``."""
    _check_grid(vessels, portal_seed_mask, hepatic_seed_mask)
    empty = np.zeros(vessels.array.shape, bool)
    result = split_arrays(
        vessels.array != 0,
        empty if portal_seed_mask is None else portal_seed_mask.array != 0,
        empty if hepatic_seed_mask is None else hepatic_seed_mask.array != 0,
        vessels.geometry.spacing[::-1], use_skeleton=not options.no_skeleton,
        seed_distance_mm=options.seed_distance_mm, max_gap_mm=options.max_gap_mm,
        crossing_penalty_mm=options.crossing_penalty_mm,
        min_split_component_size=options.min_split_component_size,
    )
    labels = LabelVolume(result.labels, vessels.geometry, vessels.source, notes=["portal/hepatic split"],
                         classes=dict(SPLIT_CLASSES))
    skeleton = None if result.skeleton is None else LabelVolume(
        result.skeleton, vessels.geometry, vessels.source, notes=["labelled vessel skeleton"],
        classes=dict(SPLIT_CLASSES))
    return VesselSplit(labels, skeleton, result.qc)


# --- the pipeline stage ---------------------------------------------------------------------------


def _free_id(classes: Mapping[int, LabelClass], name: str) -> int:
    """The stage's id for ``name``: the class's own id if present, else its usual one if free."""
    for i, c in classes.items():
        if c.name == name:
            return i
    wanted = STAGE_IDS[name]
    while wanted in classes:
        wanted += 1
    return wanted


def _support_masks(ctx: PipelineContext, options: VesselOptions,
                   names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Liver, portal vein and IVC masks: from ``split_support_dir``, else the run's labels, else
    (``generate_split_support``) TotalSegmentator ``total --roi_subset``."""
    masks: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    if options.split_support_dir is not None:
        from node.segment.labelmap import LabelmapEngine

        request = SegmentRequest(engine="labelmap", labels_path=options.split_support_dir)
        folder = LabelmapEngine().segment(ctx.ct, request)
        for i, c in folder.classes.items():
            if c.name in names and (folder.array == i).any():
                masks[c.name], source[c.name] = folder.array == i, "split_support_dir"
    for name in names:
        if name not in masks and ctx.ids(name):
            mask = ctx.mask(name)
            if mask.any():
                masks[name], source[name] = mask, "run"
    missing = tuple(n for n in names if n not in masks)
    if missing and options.generate_split_support:
        from node.segment.registry import get_engine

        seg = ctx.request.segment
        request = SegmentRequest(engine="totalsegmentator", task="total", roi_subset=missing, fast=seg.fast,
                                 robust_crop=seg.robust_crop, device=seg.device, threads=seg.threads,
                                 weights_dir=seg.weights_dir)
        generated = get_engine("totalsegmentator").segment(ctx.ct, request)
        for i, c in generated.classes.items():
            if c.name in missing and (generated.array == i).any():
                masks[c.name], source[c.name] = generated.array == i, "generate_split_support"
    return masks, source


def liver_vessels_stage(ctx: PipelineContext) -> None:
    """The pipeline's ``liver_vessels`` stage (:class:`node.pipeline.PipelineContext`): enhanced
    vessels as ``liver_vessels``, with ``split_portal_hepatic`` as ``portal_vein_branches`` and
    ``hepatic_veins``; QC under ``qc.liver_vessels``; TotalSegmentatorEnhanced's output files."""
    from node.stages import StageSkipped

    options = VesselOptions.from_mapping(ctx.options)
    support, source = _support_masks(ctx, options, SUPPORT_NAMES)
    vessel_ids = ctx.ids("liver_vessels")
    vessels = ctx.mask("liver_vessels") if vessel_ids else None
    if vessels is not None and not vessels.any():
        vessels = None
    # A TotalSegmentator-style liver holds its vessels (the phantom's liver is {5, 201, 202}).
    old_vessels = ctx.mask(*VESSEL_NAMES)
    liver = support.get("liver")
    if liver is not None:
        liver = liver | old_vessels
    if liver is None and vessels is None and not options.no_fallback_full_liver:
        raise StageSkipped("no liver and no liver_vessels in the labels")
    grid = ctx.ct

    def vol(a: np.ndarray | None) -> Volume | None:
        return None if a is None else grid.with_array(a.astype(np.uint8))

    mask, meta = enhance_liver_vessels(grid, vol(liver), vol(vessels), options,
                                       portal=vol(support.get("portal_vein_and_splenic_vein")),
                                       ivc=vol(support.get("inferior_vena_cava")))
    meta["support_source"] = source
    vessel_mask = mask.array.astype(bool)
    vessel_id = vessel_ids[0] if vessel_ids else _free_id(ctx.labels.classes, "liver_vessels")
    vessel_class = ctx.labels.classes.get(vessel_id) or LabelClass(
        vessel_id, "liver_vessels", (80, 120, 220), "Vessel", ANATOMICAL_STRUCTURE, BLOOD_VESSEL)
    # Earlier vessel labels that the enhanced mask does not keep go back to the liver (or background).
    liver_ids = ctx.ids("liver")
    ctx.labels.array[old_vessels & ~vessel_mask] = liver_ids[0] if liver_ids else 0
    ctx.paint(vessel_mask, vessel_class)
    ctx.write_nifti("enhanced_liver_vessels.nii.gz", mask)

    if options.split_portal_hepatic:
        missing = [n for n in SUPPORT_NAMES[1:] if n not in support]
        if missing:
            reason = (f"split skipped: no {' or '.join(missing)} to seed it; give --split_support_dir or "
                      "--generate_split_support")
            meta["portal_hepatic_split_qc"] = {"skipped": reason}
            meta["warnings"].append(reason)
        else:
            split = split_portal_hepatic(mask, vol(support["portal_vein_and_splenic_vein"]),
                                         vol(support["inferior_vena_cava"]), options)
            for i, c in SPLIT_CLASSES.items():
                new_id = _free_id({k: v for k, v in ctx.labels.classes.items() if v.name != c.name}, c.name)
                ctx.paint(split.labels.array == i, LabelClass(new_id, c.name, c.color, c.category,
                                                              c.property_category, c.property_type))
            for name, m in split.masks().items():
                ctx.write_nifti(f"{name}.nii.gz", m)
            ctx.write_nifti("liver_vessels_labeled.nii.gz", split.labels)
            if split.skeleton is not None:
                ctx.write_nifti("liver_vessels_skeleton_labeled.nii.gz", split.skeleton)
            meta["portal_hepatic_split_qc"] = split.qc
            meta["warnings"].extend(split.qc["warnings"])
    for w in meta["warnings"]:
        ctx.notes.append(f"liver_vessels: {w}")
    ctx.record(**meta)
    path = ctx.outdir / "enhanced_liver_vessels_metadata.json"
    path.write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    ctx.artifacts[path.name] = path
