"""RT Structure Set (PS3.3 A.19): the labels as planar contours, for radiotherapy planning systems.

One ROI per structure (Structure Set ROI, ROI Contour and RT ROI Observations modules, C.8.8.5,
C.8.8.6, C.8.8.8): its name, the SEG's colour (ROIDisplayColor), an RT ROI Interpreted Type
(:func:`interpreted_type`) and its SNOMED code (RT ROI Identification Code Sequence: the SEG's
segmented property type). Each contour is CLOSED_PLANAR on one CT slice, in patient coordinates (mm, LPS), and
references that slice's instance (Contour Image Sequence). The contours (:mod:`node.dicom.contours`)
run on the 0.5 iso-line of each slice's mask; holes and islands are separate contours combined by the
even-odd rule; points are simplified within ``tolerance_px`` pixels (0.4 by default, 0.5 at most).

Encoding: Implicit VR Little Endian, as most planning systems write structure sets (a long contour's
ContourData outgrows the 64 KiB an explicit-VR DS can hold). The header goes through pydicom; the ROI
Contour Sequence, nearly all of the file, is encoded here, straight to bytes (pydicom's per-value DS
checks took most of the time).

    write_rtstruct(labels, source_header, "rtstruct.dcm")
    masks = read_rtstruct("rtstruct.dcm", ct_volume)   # name -> boolean mask on the CT grid
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from node.classes import LabelClass, LabelVolume
from node.dicom import contours
from node.dicom.codes import segment_codes
from node.dicom.derived import derived_header, derived_uid, source_header
from node.errors import NodeError, options_from_mapping
from node.volume import Volume

if TYPE_CHECKING:
    from node.stages import PipelineContext

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
#: RTReferencedStudySequence's ReferencedSOPClassUID (Detached Study Management, retired but required).
STUDY_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.1"
RTSTRUCT_FILE = "rtstruct.dcm"
#: RT ROI Interpreted Type (PS3.3 C.8.8.8) by words in a structure's name; the first match wins.
INTERPRETED_BY_NAME: tuple[tuple[tuple[str, ...], str], ...] = (
    (("body", "skin", "external"), "EXTERNAL"),
    (("gtv", "tumor", "tumour", "lesion", "metastasis", "nodule"), "GTV"),
    (("ctv",), "CTV"),
    (("ptv",), "PTV"),
    (("couch", "table"), "SUPPORT"),
    (("bolus",), "BOLUS"),
    (("marker", "fiducial"), "MARKER"),
    (("implant", "prosthesis", "stent", "pacemaker"), "AVOIDANCE"),
)
INTERPRETED_TYPES = frozenset({
    "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS", "AVOIDANCE", "ORGAN",
    "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL", "BRACHY_ACCESSORY",
    "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
})


class RtStructError(NodeError):
    """An RTSTRUCT that cannot be written (bad option) or read (not one of ours on this grid)."""


@dataclass(frozen=True)
class RtStructOptions:
    """Options of the ``rtstruct`` output (``[rule.pipeline.stage_options.rtstruct]``)."""

    #: Douglas-Peucker tolerance in pixels: no traced boundary point is farther from the contour.
    tolerance_px: float = contours.TOLERANCE_PX
    #: RT ROI Interpreted Type by structure name, over :func:`interpreted_type`'s choice.
    interpreted_types: Mapping[str, str] = field(default_factory=dict)
    structure_set_label: str = "segnode"
    series_description: str | None = None
    series_number: int | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    #: Derives the UIDs (the worker passes the job id): every run of a job writes the same instance.
    uid_seed: str | None = None
    #: ROIGenerationDescription, e.g. the engine and task.
    generation_description: str = "segnode"

    def __post_init__(self) -> None:
        if not 0 <= float(self.tolerance_px) <= 0.5:
            raise RtStructError("bad_option", f"tolerance_px must be 0..0.5 pixel, got {self.tolerance_px}")
        bad = {k: v for k, v in self.interpreted_types.items() if str(v).upper() not in INTERPRETED_TYPES}
        if bad:
            raise RtStructError("bad_option", f"unknown RT ROI Interpreted Type(s) {bad}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> RtStructOptions:
        return options_from_mapping(cls, values, RtStructError, "RTSTRUCT")


def interpreted_type(label_class: LabelClass, overrides: Mapping[str, str] | None = None) -> str:
    """RT ROI Interpreted Type of a structure: an override by name, else by words in its name (body ->
    EXTERNAL, tumour/lesion -> GTV, ...), else ORGAN (what an organ at risk is)."""
    if overrides and label_class.name in overrides:
        return str(overrides[label_class.name]).upper()
    words = label_class.name.lower().replace("-", "_").split("_")
    for keys, kind in INTERPRETED_BY_NAME:
        if any(k in words for k in keys):
            return kind
    return "ORGAN"


# --- encoding ------------------------------------------------------------------------------------

_ITEM = b"\xfe\xff\x00\xe0"


def _el(group: int, elem: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element (tag, 4-byte length, value)."""
    return struct.pack("<HHI", group, elem, len(value)) + value


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _uid(value: str) -> bytes:
    return _text(value, b"\0")


def _item(body: bytes) -> bytes:
    return _ITEM + struct.pack("<I", len(body)) + body


def _seq(group: int, elem: int, items: list[bytes]) -> bytes:
    return _el(group, elem, b"".join(_item(i) for i in items))


def _contour_data(points: np.ndarray) -> bytes:
    """ContourData (DS): x\\y\\z of each point, mm to 0.001 (well within the 16 characters a DS holds).
    One ``%`` over the whole contour: half the time of formatting value by value."""
    values = points.ravel().tolist()
    text = ("\\".join(["%.3f"] * len(values)) % tuple(values)).replace("-0.000", "0.000")
    return _text(text)


def _image_refs(identity: Any, sop_class_uid: str) -> list[bytes]:
    """The Contour Image Sequence item of each slice k (its instance, and frame for a multi-frame)."""
    refs = []
    for k, uid in enumerate(identity.instance_uids):
        body = _el(0x0008, 0x1150, _uid(sop_class_uid)) + _el(0x0008, 0x1155, _uid(uid))
        if identity.frame_numbers:
            body += _el(0x0008, 0x1160, _text(str(identity.frame_numbers[k])))
        refs.append(_el(0x3006, 0x0016, _item(body)))
    return refs


def roi_contours(labels: LabelVolume, ids: list[int], tolerance: float) -> dict[int, dict[int, list[np.ndarray]]]:
    """Per label id, per slice k: the contours in pixel coordinates (column, row)."""
    from scipy import ndimage

    boxes = ndimage.find_objects(labels.array, max_label=max(ids) if ids else 0)
    out: dict[int, dict[int, list[np.ndarray]]] = {}
    for i in ids:
        box = boxes[i - 1] if i - 1 < len(boxes) else None
        if box is None:
            continue
        k0, j0, i0 = (s.start for s in box)
        traced = contours.trace(labels.array[box] == i, tolerance)
        out[i] = {k + k0: [p + (i0, j0) for p in polys] for k, polys in traced.items()}
    return out


def _roi_contour_sequence(labels: LabelVolume, ids: list[int], numbers: dict[int, int],
                          traced: dict[int, dict[int, list[np.ndarray]]], refs: list[bytes]) -> bytes:
    affine = labels.geometry.affine  # (i, j, k, 1) -> LPS mm
    items = []
    for i in ids:
        c = labels.classes[i]
        contour_items = []
        number = 0
        for k, polys in sorted(traced.get(i, {}).items()):
            for poly in polys:
                number += 1
                n = len(poly)
                ijk = np.column_stack([poly, np.full(n, k, np.float64), np.ones(n)])
                xyz = ijk @ affine.T
                contour_items.append(
                    refs[k]
                    + _el(0x3006, 0x0042, b"CLOSED_PLANAR ")
                    + _el(0x3006, 0x0046, _text(str(n)))
                    + _el(0x3006, 0x0048, _text(str(number)))
                    + _el(0x3006, 0x0050, _contour_data(xyz[:, :3]))
                )
        colour = _text("\\".join(str(int(v)) for v in c.color))
        body = _el(0x3006, 0x002A, colour)
        body += _seq(0x3006, 0x0040, contour_items)
        body += _el(0x3006, 0x0084, _text(str(numbers[i])))
        items.append(body)
    return _seq(0x3006, 0x0039, items)


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme, code.meaning[:64]
    return item


def build_header(labels: LabelVolume, source: Dataset, ids: list[int], numbers: dict[int, int],
                 options: RtStructOptions) -> Dataset:
    """Every module but ROI Contour: patient, study, RT Series, equipment, Structure Set, RT ROI
    Observations, SOP Common."""
    identity = labels.source
    if identity is None or not identity.instance_uids:
        raise RtStructError("no_source", "an RTSTRUCT references its CT: the labels have no DICOM source")
    seed = options.uid_seed
    ds = derived_header(
        source, identity, kind="rtstruct", sop_class_uid=SOP_CLASS_UID, modality="RTSTRUCT",
        series_uid=options.series_uid or derived_uid(seed, "rtstruct series"),
        sop_uid=options.sop_uid or derived_uid(seed, "rtstruct instance"),
        series_description=options.series_description
        or f"segnode RTSTRUCT {identity.series_description}".strip(),
        series_number=options.series_number, transfer_syntax=ImplicitVRLittleEndian,
    )
    ds.OperatorsName = ""  # RT Series, Type 2
    del ds.ContentDate, ds.ContentTime  # not in this IOD: the Structure Set has its own date and time
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid  # Frame of Reference module (C.7.4.1)
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator") or ""
    ds.InstanceNumber = 1
    # Structure Set module (C.8.8.5).
    ds.StructureSetLabel = options.structure_set_label[:16]
    ds.StructureSetName = "segnode"
    ds.StructureSetDate, ds.StructureSetTime = ds.SeriesDate, ds.SeriesTime
    images = []
    for k, uid in enumerate(identity.instance_uids):
        img = Dataset()
        img.ReferencedSOPClassUID, img.ReferencedSOPInstanceUID = identity.sop_class_uid, uid
        if identity.frame_numbers:
            img.ReferencedFrameNumber = identity.frame_numbers[k]
        images.append(img)
    series = Dataset()
    series.SeriesInstanceUID = identity.series_uid
    series.ContourImageSequence = Sequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_SOP_CLASS_UID, identity.study_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = identity.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, observations = [], []
    for i in ids:
        c = labels.classes[i]
        roi = Dataset()
        roi.ROINumber = numbers[i]
        roi.ReferencedFrameOfReferenceUID = identity.frame_of_reference_uid
        roi.ROIName = c.name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = options.generation_description[:64]
        rois.append(roi)
        obs = Dataset()
        obs.ObservationNumber = numbers[i]
        obs.ReferencedROINumber = numbers[i]
        obs.ROIObservationLabel = c.name[:16]
        obs.RTROIIdentificationCodeSequence = Sequence([_code_item(segment_codes(c).type)])  # the SEG's
        obs.RTROIInterpretedType = interpreted_type(c, options.interpreted_types)
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def write_rtstruct(labels: LabelVolume, source: Dataset, path: Path | str,
                   options: RtStructOptions = RtStructOptions()) -> Path:
    """The RTSTRUCT of ``labels`` (on the grid of the CT whose header ``source`` is one of) at ``path``."""
    ids = sorted(i for i in labels.classes)
    numbers = {i: n for n, i in enumerate(ids, start=1)}
    header = build_header(labels, source, ids, numbers, options)
    traced = roi_contours(labels, ids, float(options.tolerance_px))
    identity = labels.source
    assert identity is not None
    refs = _image_refs(identity, identity.sop_class_uid)
    roi_contour = _roi_contour_sequence(labels, ids, numbers, traced, refs)
    head, tail = Dataset(), Dataset()
    for elem in header:
        (head if elem.tag < 0x30060039 else tail).add(elem)
    head.file_meta = header.file_meta
    rest = DicomBytesIO()
    rest.is_little_endian, rest.is_implicit_VR = True, True
    write_dataset(rest, tail)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as fp:
        pydicom.dcmwrite(fp, head, enforce_file_format=True)
        fp.write(roi_contour)
        fp.write(rest.getvalue())
    os.replace(tmp, path)
    return path


# --- reading back --------------------------------------------------------------------------------


def read_rtstruct(path: Path | str, ct: Volume) -> dict[str, np.ndarray]:
    """Each ROI's contours rasterised on ``ct``'s grid (:func:`node.dicom.contours.rasterise`: pixel
    centres inside by the even-odd rule), by ROI name. Slices by referenced instance, else by position."""
    from pydicom import config

    config.use_DS_numpy = True
    try:
        ds = pydicom.dcmread(path)
    finally:
        config.use_DS_numpy = False
    if str(ds.SOPClassUID) != SOP_CLASS_UID:
        raise RtStructError("not_rtstruct", f"{path} is not an RT Structure Set")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    inverse = np.linalg.inv(ct.geometry.affine)
    slice_of = {uid: k for k, uid in enumerate(ct.source.instance_uids)} if ct.source else {}
    shape = ct.array.shape
    out: dict[str, np.ndarray] = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, bool)
        per_slice: dict[int, list[np.ndarray]] = {}
        for c in roi.get("ContourSequence", []):
            xyz = np.asarray(c.ContourData, np.float64).reshape(-1, 3)
            ijk = np.column_stack([xyz, np.ones(len(xyz))]) @ inverse.T
            refs = c.get("ContourImageSequence")
            k = slice_of.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
            if k is None:
                k = int(round(float(ijk[:, 2].mean())))
            per_slice.setdefault(k, []).append(ijk[:, :2])
        for k, polys in per_slice.items():
            if 0 <= k < shape[0]:
                mask[k] = contours.rasterise(polys, shape[1:])
        out[names[int(roi.ReferencedROINumber)]] = mask
    return out


def header_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


# --- the pipeline's output -----------------------------------------------------------------------


def rtstruct_output(ctx: PipelineContext) -> None:
    """Output stage ``rtstruct``: ``rtstruct.dcm``, the final labels as contours on the DICOM source.

    Options: the fields of :class:`RtStructOptions`. Skipped when the input has no DICOM source or no
    structure was found."""
    from node.stages import StageSkipped

    source = ctx.ct.source
    if (ctx.source_path is None and not ctx.source_headers) or source is None or not source.instance_uids:
        raise StageSkipped("the input has no DICOM source (NIfTI or in-memory input): no RTSTRUCT")
    if not ctx.labels.classes or not ctx.labels.array.any():
        raise StageSkipped("no structure was found: no RTSTRUCT")
    values = dict(ctx.options)
    engine = ctx.request.segment
    values.setdefault("generation_description", f"segnode {engine.engine} {engine.task}")
    options = RtStructOptions.from_mapping(values)
    labels = LabelVolume(ctx.labels.array, ctx.labels.geometry, source=source, classes=ctx.labels.classes)
    header = source_header(ctx.source_headers, ctx.source_path)
    path = write_rtstruct(labels, header, ctx.outdir / RTSTRUCT_FILE, options)
    ctx.add_output("rtstruct", path)
    ctx.record(rois=len(ctx.labels.classes), tolerance_px=float(options.tolerance_px),
               bytes=path.stat().st_size, sop_instance_uid=str(header_uid(path)))
