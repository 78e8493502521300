"""Write a :class:`~node.classes.LabelVolume` as a DICOM Segmentation (PS3.3 A.51) with highdicom.

Two ways to the same object:

* the **reference path** (``SegOptions(fast=False)``): highdicom's plain use,
  ``highdicom.seg.Segmentation(source_images, label_map, ...)``;
* the **fast path** (the default): highdicom builds the object for a one-plane stand-in of the labels
  (every segment once), which gives every module and attribute (patient, study, series, equipment,
  segment descriptions, shared functional groups, references); the frames are then made with numpy:
  per segment its bounding box, its non-empty planes, the frames packed with ``np.packbits`` (BINARY
  frames are packed LSB first and without padding between frames, PS3.5 8.1.1 and 8.2), and the
  per-frame functional groups encoded once per plane and once per segment, then joined per frame.
  The frame order, dimension index values and per-frame items are highdicom's (segment by segment,
  planes sorted along highdicom's slice normal), so both paths write the same object; the tests
  compare them attribute by attribute and decode both with highdicom.

For a 117-class 512 x 512 x 200 label map the fast path takes a fraction of the reference path's time
and memory (``tests/bench/bench_seg.py``).

Conventions of the objects written (see also :class:`SegOptions`):

* ``AUTO`` by default (:func:`choose_type`): BINARY, except LABELMAP (Label Map Segmentation Storage)
  where BINARY frames would not start on a byte boundary (Rows x Columns not a multiple of 8: OHIF 3.13.2
  cannot show those) or where LABELMAP's pixel data is at most half of BINARY's (many segments per
  plane, e.g. TotalSegmentator's 117 classes). Either type on request; LABELMAP natively or RLE
  compressed. Segments that are empty are not described; empty frames are omitted; frames always have
  the source's full size (no cropping).
* Segment numbers are 1..N in ascending label id, for LABELMAP too (its pixel values are the segment
  numbers). A LABELMAP's background is pixel value 0: Pixel Padding Value 0 and a "Background" segment
  0 (highdicom's; every pixel value of a LABELMAP must be described, PS3.3 C.8.20.2.3.3), whose item
  comes LAST in the SegmentSequence. OHIF 3.13.2's adapter (like 3D Slicer before dcmqi 1.5.5) takes
  the n-th item as pixel value n: with highdicom's order (background first) every colour was shifted
  by one. With items 1..N first, positional and numeric readers agree; OHIF still lists the background
  item as a segment "0 Background" (drawn with nothing: pixel value 0 is its transparent entry).
  Each segment carries its label id in the private element (0063,xx01) US of private creator
  ``segnode`` (:data:`PRIVATE_CREATOR`), so the reader gives the same ids back.
* The source's patient and study modules (:mod:`node.dicom.modules`): every Type 2 attribute present,
  empty where the source has none (anonymised and research series).
* The source's FrameOfReferenceUID, a ReferencedSeriesSequence of every source instance, and each
  frame's source image (DerivationImageSequence, with ReferencedFrameNumber for multi-frame sources).
* The node's marker (:data:`node.rules.OWN_MANUFACTURER`): Manufacturer ``segnode``, ImageType
  ``DERIVED\\PRIMARY``; segnode (with its version) as the segmentation algorithm.
* A superseding result (a new generation of the series, an editor's correction) is a new series:
  ``SegOptions(version=n)`` gives SeriesNumber ``1000 * n + source SeriesNumber`` and ``v<n>`` in the
  SeriesDescription (both can be given instead).
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from node import __version__
from node.classes import LabelClass, LabelVolume
from node.dicom.codes import rgb_to_cielab, segment_codes
from node.dicom.modules import MANUFACTURER, with_patient_study
from node.errors import NodeError, options_from_mapping

#: Private creator of the element that holds each segment's label id.
PRIVATE_CREATOR = "segnode"
#: Private group and element offset of the label id: (0063,xx01) US in each SegmentSequence item.
PRIVATE_GROUP, LABEL_ID_OFFSET = 0x0063, 0x01
# pydicom's private dictionary: read with implicit VR, the element is still US.
pydicom.datadict.add_private_dict_entry(PRIVATE_CREATOR, (PRIVATE_GROUP << 16) | 0x1000 | LABEL_ID_OFFSET, "US",
                                        "Label ID")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"

#: How far (mm) a source plane may lie off the label grid, in-plane and along the normal (as a fraction
#: of the slice step), and still be that grid's slice (the series reader allows 1% + 0.005 mm per step).
IN_PLANE_TOLERANCE_MM = 0.1
NORMAL_TOLERANCE = 0.1

_PER_FRAME = 0x52009230
_PIXEL_DATA = 0x7FE00010
_ITEM = b"\xfe\xff\x00\xe0"


class SegError(NodeError, ValueError):
    """A SEG cannot be written or read. ``code`` is stable for programs, the message is for people."""


@dataclass(frozen=True)
class SegOptions:
    """How a SEG is written. ``from_mapping`` takes the same keys (``type`` for ``segmentation_type``)
    from a rule's or request's ``stage_options["seg"]``."""

    #: ``BINARY`` (one frame per segment and plane), ``LABELMAP`` (one frame per plane, PS3.3 A.51a) or
    #: ``AUTO`` (:func:`choose_type` picks one for the labels).
    segmentation_type: str = "AUTO"
    #: LABELMAP only: ``None`` (native) or ``"RLE"`` (RLE Lossless; with ``AUTO``, means LABELMAP).
    compression: str | None = None
    #: 1 for a first result; n > 1 for the n-th result that supersedes earlier ones (new series).
    version: int = 1
    series_number: int | None = None
    series_description: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    instance_number: int = 1
    #: SegmentAlgorithmType: AUTOMATIC, SEMIAUTOMATIC (an editor's correction) or MANUAL.
    algorithm_type: str = "AUTOMATIC"
    algorithm_name: str = "segnode"
    algorithm_version: str = __version__
    #: AlgorithmParameters (e.g. engine and task), written as ``key=value`` pairs.
    algorithm_parameters: Mapping[str, str] = field(default_factory=dict)
    content_label: str = "SEGNODE"
    content_description: str | None = None
    #: ContentCreatorName: the person who corrected the result (editor), if any.
    content_creator: str | None = None
    manufacturer_model_name: str = "segnode"
    device_serial_number: str = "segnode"
    #: ContentDate/ContentTime and SeriesDate/SeriesTime (``YYYYMMDD``, ``HHMMSS``); default now.
    content_date: str | None = None
    content_time: str | None = None
    #: False: highdicom's own frame loop (the reference path).
    fast: bool = True

    def __post_init__(self) -> None:
        kind = self.segmentation_type.upper()
        object.__setattr__(self, "segmentation_type", kind)
        if kind not in ("AUTO", "BINARY", "LABELMAP"):
            raise SegError("bad_option", f"segmentation type must be AUTO, BINARY or LABELMAP, got {kind!r}")
        compression = (self.compression or "").upper() or None
        object.__setattr__(self, "compression", compression)
        if compression not in (None, "RLE"):
            raise SegError("bad_option", f"compression must be RLE or none, got {self.compression!r}")
        if compression and kind == "AUTO":
            object.__setattr__(self, "segmentation_type", "LABELMAP")
        elif compression and kind != "LABELMAP":
            raise SegError("bad_option", "BINARY frames are bit-packed; RLE is offered for LABELMAP only")
        if int(self.version) < 1:
            raise SegError("bad_option", f"version must be 1 or more, got {self.version}")
        if self.algorithm_type.upper() not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
            raise SegError("bad_option", f"algorithm type must be AUTOMATIC, SEMIAUTOMATIC or MANUAL, "
                                         f"got {self.algorithm_type!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SegOptions:
        """Options from a plain mapping (TOML, JSON); unknown keys are refused with the known ones."""
        values = dict(values or {})
        if "type" in values:
            values["segmentation_type"] = values.pop("type")
        return options_from_mapping(cls, values, SegError, "SEG")


# --- where the source planes lie on the label grid -----------------------------------------------


@dataclass
class _Plane:
    """One source image plane: a single-frame instance or one frame of a multi-frame instance."""

    dataset: Dataset
    frame_number: int | None  # 1-based for a multi-frame source
    position: np.ndarray
    k: int


def _frame_groups(ds: Dataset, index: int) -> list[Dataset]:
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    return groups


def _from_groups(ds: Dataset, groups: list[Dataset], sequence: str, keyword: str) -> Any:
    for group in groups:
        if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
            return group[sequence][0][keyword].value
    return ds.get(keyword)


def _planes_of(ds: Dataset) -> list[tuple[int | None, Any, Any]]:
    """(frame number, ImagePositionPatient, ImageOrientationPatient) of each plane of ``ds``."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [(None, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"))]
    out = []
    for index in range(frames):
        groups = _frame_groups(ds, index)
        out.append((index + 1,
                    _from_groups(ds, groups, "PlanePositionSequence", "ImagePositionPatient"),
                    _from_groups(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")))
    return out


def _image_datasets(labels: LabelVolume, source: Sequence[Dataset] | Path | str) -> list[Dataset]:
    """The source series' image datasets: given, or read from a folder/zip/file (pixel data dropped)."""
    from node.dicom.series import NON_IMAGE_SOP_CLASSES, read_datasets

    if isinstance(source, (str, Path)):
        datasets = []
        for _, ds in read_datasets(Path(source))[0]:
            if str(ds.get("SOPClassUID", "")) in NON_IMAGE_SOP_CLASSES or "PixelData" not in ds:
                continue
            del ds.PixelData  # only the header is referenced; keeps memory to the labels and the SEG
            datasets.append(ds)
    else:  # headers are enough (e.g. read with stop_before_pixels)
        datasets = [ds for ds in source if str(ds.get("SOPClassUID", "")) not in NON_IMAGE_SOP_CLASSES]
    identity = labels.source
    if identity is not None and identity.series_uid:
        chosen = [ds for ds in datasets if str(ds.get("SeriesInstanceUID", "")) == identity.series_uid]
        if chosen or len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
            datasets = chosen
    if identity is not None and identity.instance_uids:  # the instances the labels were made from
        known = set(identity.instance_uids)
        datasets = [ds for ds in datasets if str(ds.get("SOPInstanceUID", "")) in known] or datasets
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if not datasets:
        raise SegError("no_source", "no source images for the SEG (none of the labels' series)")
    if len(series) > 1:
        raise SegError("mixed_source", f"the source images are from {len(series)} series; give one series")
    return datasets


def _place_sources(labels: LabelVolume, datasets: list[Dataset]) -> list[_Plane]:
    """Each source plane with its slice ``k`` on the label grid; refused when a plane is off the grid."""
    geo = labels.geometry
    nk, rows, cols = labels.array.shape
    d = geo.direction_matrix
    planes: list[_Plane] = []
    seen: set[tuple[str, int | None]] = set()
    identity = labels.source
    slice_of: dict[tuple[str, int | None], int] = {}
    if identity is not None:
        numbers = identity.frame_numbers or (0,) * len(identity.instance_uids)
        slice_of = {(uid, int(n) or None): k for k, (uid, n) in enumerate(zip(identity.instance_uids, numbers))}
    for ds in datasets:
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise SegError("source_mismatch",
                           f"source image {ds.get('SOPInstanceUID')} is "
                           f"{ds.get('Columns')}x{ds.get('Rows')}, the labels {cols}x{rows}")
        for frame_number, position, orientation in _planes_of(ds):
            key = (str(ds.SOPInstanceUID), frame_number)
            if key in seen:  # the same instance twice in a folder
                continue
            seen.add(key)
            try:
                ipp = np.array([float(v) for v in position], dtype=float)
                iop = np.array([float(v) for v in orientation], dtype=float)
            except (TypeError, ValueError):
                raise SegError("source_mismatch", f"source image {key[0]} has no usable position or "
                                                  "orientation") from None
            if np.max(np.abs(iop - np.concatenate([d[:, 0], d[:, 1]]))) > 1e-4:
                raise SegError("source_mismatch",
                               f"source image {key[0]} is oriented {iop.round(4).tolist()}, "
                               "not like the labels")
            offset = ipp - np.asarray(geo.origin)
            along_mm = float(offset @ d[:, 2])
            along = along_mm / geo.spacing[2]
            k = round(along)
            drift = float(np.linalg.norm(offset - along_mm * d[:, 2]))  # off the grid's first row/column
            if not 0 <= k < nk or abs(k - along) > NORMAL_TOLERANCE or drift > IN_PLANE_TOLERANCE_MM:
                raise SegError("source_mismatch",
                               f"source image {key[0]} at {ipp.round(3).tolist()} is not a slice of the "
                               f"labels' grid (slice index {along:.3f}, {drift:.3f} mm in-plane)")
            expected = slice_of.get(key, k)
            if expected != k:
                raise SegError("source_mismatch", f"source image {key[0]} lies on slice {k} of the labels, "
                                                  f"their identity puts it on slice {expected}")
            planes.append(_Plane(ds, frame_number, ipp, k))
    taken = np.zeros(nk, bool)
    for p in planes:
        if taken[p.k]:
            raise SegError("source_mismatch", f"two source images lie on slice {p.k} of the labels")
        taken[p.k] = True
    if not taken.all():
        missing = np.flatnonzero(~taken)
        labelled = [int(k) for k in missing if labels.array[k].any()]
        if labelled:
            raise SegError("source_mismatch",
                           f"slice(s) {labelled[:10]} of the labels have structures but no source image")
    return planes


def _ordered_sources(planes: list[_Plane]) -> tuple[list[Dataset], list[_Plane]]:
    """Source datasets as highdicom takes them and the planes in its input order: single-frame images
    in slice order; a multi-frame image alone, its frames in frame order."""
    instances = {id(p.dataset): p.dataset for p in planes}
    if len(instances) == 1 and planes[0].frame_number is not None:
        ordered = sorted(planes, key=lambda p: p.frame_number or 0)
        if len(ordered) != int(ordered[0].dataset.get("NumberOfFrames", 1)):
            raise SegError("source_mismatch", "only part of the multi-frame source lies on the labels' grid")
        # highdicom writes SpacingBetweenSlices into the source's own shared functional groups: give it a
        # copy, so that the caller's dataset stays as it was.
        original = ordered[0].dataset
        source = Dataset()
        for elem in original:
            source.add(copy.deepcopy(elem) if elem.keyword == "SharedFunctionalGroupsSequence" else elem)
        if hasattr(original, "file_meta"):
            source.file_meta = original.file_meta
        for p in ordered:
            p.dataset = source
        return [source], ordered
    if any(p.frame_number is not None for p in planes):
        raise SegError("source_mismatch", "several multi-frame source images: give one multi-frame image")
    ordered = sorted(planes, key=lambda p: p.k)
    return [p.dataset for p in ordered], ordered


# --- segment descriptions -----------------------------------------------------------------------


def _coded(code: Any) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(code.value, code.scheme, code.meaning)


def segment_description(number: int, label_class: LabelClass, options: SegOptions) -> Dataset:
    """The SegmentSequence item of ``label_class`` as segment ``number`` (highdicom SegmentDescription)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    c = segment_codes(label_class)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=options.algorithm_name, version=options.algorithm_version,
        family=dcm_codes.cid7162.ArtificialIntelligence,
        parameters={str(k): str(v) for k, v in options.algorithm_parameters.items()} or None,
    )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label_class.name[:64],
        segmented_property_category=_coded(c.category),
        segmented_property_type=_coded(c.type),
        algorithm_type=options.algorithm_type.upper(),
        algorithm_identification=algorithm,
        anatomic_regions=[_coded(c.anatomic_region)] if c.anatomic_region is not None else None,
        display_color=hd.color.CIELabColor.from_dicom_value(rgb_to_cielab(label_class.color)),
    )
    if c.type_modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(c.type_modifier)]
    if c.anatomic_region is not None and c.anatomic_region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            _coded(c.anatomic_region_modifier)]
    block = description.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(LABEL_ID_OFFSET, "US", int(label_class.id))
    return description


def _segments(labels: LabelVolume, options: SegOptions) -> tuple[list[int], list[Dataset], list]:
    """Present label ids (ascending), their segment descriptions, and ``find_objects`` boxes."""
    from scipy import ndimage

    array = labels.array
    if array.dtype.kind not in "ui" or (array.size and int(array.min()) < 0):
        raise SegError("bad_labels", f"labels must be non-negative integers, got {array.dtype}")
    if array.size and int(array.max()) > 65535:
        raise SegError("bad_labels", "label ids above 65535 do not fit a SEG")
    boxes = ndimage.find_objects(array) if array.size else []
    ids = [i + 1 for i, box in enumerate(boxes) if box is not None]
    if not ids:
        raise SegError("empty", "the labels hold no structure: nothing to write")
    descriptions = []
    for n, label_id in enumerate(ids, 1):
        label_class = labels.classes.get(label_id) or LabelClass(label_id, f"label_{label_id}")
        descriptions.append(segment_description(n, label_class, options))
    return ids, descriptions, boxes


# --- BINARY or LABELMAP --------------------------------------------------------------------------

#: ``AUTO`` takes LABELMAP where its pixel data is at most this fraction of BINARY's (16 or more segments
#: per plane on average: 117 TotalSegmentator-like ellipsoids on 512 x 512 x 200 give 0.31, 53 MB
#: instead of 169 MB, written in half the time). The Label Map Segmentation SOP class is new (2024):
#: archives and viewers that predate it may refuse it, so it is taken where it saves most, not wherever
#: it is a little smaller (the 21-structure phantom, 0.78, stays BINARY).
LABELMAP_SIZE_RATIO = 0.5


def choose_type(labels: LabelVolume, ids: Sequence[int], boxes: Sequence[Any]) -> str:
    """BINARY or LABELMAP for ``AUTO`` (see the module docstring).

    LABELMAP where Rows x Columns is not a multiple of 8: BINARY frames are packed without padding
    (PS3.5 8.1.1), so such frames start inside a byte, and OHIF 3.13.2 cannot show them (an odd byte
    count fails its whole-instance fetch; Orthanc 1.10 refuses it the single frames; where it loads,
    the masks are sheared). LABELMAP frames are whole 8- or 16-bit pixels, a conformant encoding of
    the same non-overlapping labels. Else LABELMAP where its pixel data is at most
    :data:`LABELMAP_SIZE_RATIO` of BINARY's, BINARY's frame count taken from each segment's slab of
    slices (an upper bound: organs are seldom split along the slice axis).
    """
    rows, cols = labels.array.shape[1:]
    if (rows * cols) % 8:
        return "LABELMAP"
    binary_bytes = sum(boxes[i - 1][0].stop - boxes[i - 1][0].start for i in ids) * rows * cols / 8
    planes = int(np.count_nonzero(np.any(labels.array, axis=(1, 2))))
    labelmap_bytes = planes * rows * cols * (1 if len(ids) < 256 else 2)
    return "LABELMAP" if labelmap_bytes <= LABELMAP_SIZE_RATIO * binary_bytes else "BINARY"


# --- the SEG -------------------------------------------------------------------------------------


def series_number(options: SegOptions, source_series_number: Any) -> int:
    """``options.series_number``, else ``1000 * version + source SeriesNumber`` (0 when unknown)."""
    if options.series_number is not None:
        return int(options.series_number)
    try:
        base = int(source_series_number)
    except (TypeError, ValueError):
        base = 0
    return 1000 * int(options.version) + max(base, 0)


def series_description(options: SegOptions, source_description: Any) -> str:
    if options.series_description is not None:
        return options.series_description[:64]
    text = f"segnode SEG v{options.version}"
    if source_description:
        text += f" {source_description}"
    return text[:64]


def _character_set(value: Any, source: Dataset | None = None) -> Any:
    """The source's SpecificCharacterSet when highdicom takes it; UTF-8 (ISO_IR 192) for anything else (the
    strings are already decoded, and UTF-8 holds them all); none for an empty one (the default repertoire),
    unless a copied text is not ASCII (a source that wrote Latin-1 names without declaring it): UTF-8 then."""
    from highdicom.enum import SpecificCharacterSetValues

    if not isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = [value]
    values = [str(v) for v in value if v not in (None, "")]
    if not values:
        texts = (str(e.value) for e in (source or ()) if e.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
                 and isinstance(e.value, (str, pydicom.valuerep.PersonName)))
        return "ISO_IR 192" if any(not t.isascii() for t in texts) else None
    known = {m.value for m in SpecificCharacterSetValues}
    if all(v in known for v in values):
        return values[0] if len(values) == 1 else values
    return "ISO_IR 192"


def _highdicom_kwargs(datasets: list[Dataset], options: SegOptions) -> dict[str, Any]:
    import highdicom as hd

    first = datasets[0]
    kwargs: dict[str, Any] = {
        "series_instance_uid": options.series_uid or hd.UID(),
        "series_number": series_number(options, first.get("SeriesNumber")),
        "sop_instance_uid": options.sop_uid or hd.UID(),
        "instance_number": int(options.instance_number),
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": options.manufacturer_model_name,
        "software_versions": __version__,
        "device_serial_number": options.device_serial_number,
        "content_label": options.content_label,
        "content_description": options.content_description or "segnode segmentation",
        "content_creator_name": options.content_creator,
        "series_description": series_description(options, first.get("SeriesDescription")),
        "transfer_syntax_uid": RLELossless if options.compression == "RLE" else ExplicitVRLittleEndian,
        "omit_empty_frames": True,
    }
    kwargs["specific_character_set"] = _character_set(first.get("SpecificCharacterSet"), first)
    if options.content_date:
        kwargs.update(content_date=options.content_date, series_date=options.content_date)
    if options.content_time:
        kwargs.update(content_time=options.content_time, series_time=options.content_time)
    return kwargs


def _check_sop_class(ds: Dataset) -> None:
    """highdicom copies the patient and study modules by the source's IOD, looked up by its SOP class: a
    private or unknown image SOP class (a vendor's CT in all but name) cannot be a SEG's source there."""
    try:
        from highdicom._standard_utils import get_sop_class_iod_map
    except ImportError:  # another highdicom: let it say what it says
        return
    uid = str(ds.get("SOPClassUID", ""))
    if uid not in get_sop_class_iod_map():
        name = pydicom.uid.UID(uid).name
        raise SegError("source_sop_class", f"the source images' SOP class {uid}"
                                           f"{'' if name == uid else f' ({name})'} is not a standard image IOD "
                                           "(a private or retired SOP class): no DICOM-SEG can reference it")


def _reference_seg(labels: LabelVolume, datasets: list[Dataset], planes: list[_Plane], ids: list[int],
                   descriptions: list[Dataset], options: SegOptions) -> Dataset:
    """highdicom's plain use: the label map (segment numbers) of every source plane, in its order."""
    import highdicom as hd

    lut = np.zeros(int(labels.array.max()) + 1, np.uint16)
    numbers = [int(d.SegmentNumber) for d in descriptions]
    lut[ids] = numbers
    dtype = np.uint8 if max(numbers) < 256 else np.uint16
    pixels = lut[labels.array[[p.k for p in planes]]].astype(dtype)
    return _background_last(_with_type2(hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type=options.segmentation_type,
        segment_descriptions=descriptions, **_highdicom_kwargs(datasets, options))))


def _background_last(seg: Dataset) -> Dataset:
    """A LABELMAP's SegmentSequence with highdicom's "Background" item (segment 0, the Pixel Padding
    Value) moved after the structures', so that the n-th item is segment n, as positional readers
    (OHIF 3.13.2's adapter) assume. The item stays: every pixel value of a LABELMAP must be described
    (PS3.3 C.8.20.2.3.3), the background's too."""
    if str(seg.get("SegmentationType", "")) == "LABELMAP":
        items = list(seg.SegmentSequence)
        background = [item for item in items if int(item.SegmentNumber) == 0]
        if len(background) != 1 or int(seg.get("PixelPaddingValue", -1)) != 0:
            raise SegError("internal", "highdicom's LABELMAP has no background segment 0")
        seg.SegmentSequence = [item for item in items if int(item.SegmentNumber) != 0] + background
    return seg


def _with_type2(seg: Dataset) -> Dataset:
    """Type 2 attributes highdicom leaves out when it has no value: ContentCreatorName (Content
    Identification Macro, PS3.3 Table 10-12) must be present, empty when nobody corrected the result."""
    if "ContentCreatorName" not in seg:
        seg.ContentCreatorName = ""
    return seg


def build_seg(labels: LabelVolume, source: Sequence[Dataset] | Path | str, *,
              options: SegOptions = SegOptions()) -> Dataset:
    """The SEG of ``labels`` on ``source`` (its image datasets, or the folder/zip/file they are in).

    The labels must lie on the source's grid (each source plane a slice of ``labels.geometry``);
    ``labels.source.series_uid`` picks the series when a folder holds several. Raises :class:`SegError`.
    The dataset is the one :func:`write_seg` writes (its per-frame functional groups are parsed when
    first accessed, as for a dataset read from a file).
    """
    buffer = io.BytesIO()
    _write(labels, source, buffer, options)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def write_seg(labels: LabelVolume, source: Sequence[Dataset] | Path | str, out_path: Path | str, *,
              options: SegOptions = SegOptions()) -> Path:
    """Write the SEG of ``labels`` on ``source`` (see :func:`build_seg`) to ``out_path``, atomically."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        with open(tmp, "wb") as fp:
            _write(labels, source, fp, options)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _write(labels: LabelVolume, source: Sequence[Dataset] | Path | str, fp: Any, options: SegOptions) -> None:
    datasets = _image_datasets(labels, source)
    planes = _place_sources(labels, datasets)
    datasets, planes = _ordered_sources(planes)
    # highdicom reads the first source's patient and study attributes: give it one that has every Type 2
    # attribute (empty where the source has none), so that anonymised series get their SEG too.
    first = with_patient_study(datasets[0])
    if "SliceThickness" in first and first.SliceThickness in (None, ""):
        # The SEG's Pixel Measures need a thickness (PS3.3 C.7.6.16.2.1, Type 1C): a source that gives
        # none (Type 2, empty or absent) has labels as thick as their slice step.
        first.SliceThickness = f"{labels.geometry.spacing[2]:.6g}"
    datasets = [first, *datasets[1:]]
    _check_sop_class(datasets[0])
    ids, descriptions, boxes = _segments(labels, options)
    if options.segmentation_type == "AUTO":
        options = replace(options, segmentation_type=choose_type(labels, ids, boxes))
    if options.fast:
        try:
            _FastSeg(labels, datasets, planes, ids, descriptions, boxes, options).write(fp)
            return
        except _NoFastPath:
            pass
    seg = _reference_seg(labels, datasets, planes, ids, descriptions, options)
    pydicom.dcmwrite(fp, seg, enforce_file_format=True)


# --- the fast path -------------------------------------------------------------------------------


class _NoFastPath(Exception):
    """The stand-in cannot hold every segment: the reference path writes the SEG."""


def _encode(elem: DataElement, encodings: Any) -> bytes:
    """One data element as explicit VR little endian bytes (tag, VR, length, value)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _item(body: bytes) -> bytes:
    return _ITEM + struct.pack("<I", len(body)) + body


class _FastSeg:
    """The fast path of :func:`write_seg` (see the module docstring)."""

    def __init__(self, labels: LabelVolume, datasets: list[Dataset], planes: list[_Plane], ids: list[int],
                 descriptions: list[Dataset], boxes: list, options: SegOptions) -> None:
        from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector

        self.labels, self.datasets, self.planes = labels, datasets, planes
        self.ids, self.descriptions, self.boxes, self.options = ids, descriptions, boxes, options
        self.binary = options.segmentation_type == "BINARY"
        self.rows, self.cols = labels.array.shape[1:]
        iop = [float(v) for v in planes[0].dataset.get("ImageOrientationPatient") or
               _planes_of(planes[0].dataset)[0][2]]
        self.iop = iop
        positions = np.array([p.position for p in planes])
        normal = get_normal_vector(iop, index_convention=VOLUME_INDEX_CONVENTION)
        # highdicom's plane order: ascending distance along its normal (np.unique, as it does).
        self.sort_index = np.unique(positions @ normal, return_index=True)[1]
        if len(self.sort_index) != len(planes):
            raise SegError("source_mismatch", "two source planes lie at the same position")
        plane_k = np.array([p.k for p in planes])
        nonempty = np.any(labels.array, axis=(1, 2))
        self.included = [int(i) for i in np.flatnonzero(nonempty[plane_k])]  # in highdicom's input order
        included = set(self.included)
        self.sorted_planes = [int(i) for i in self.sort_index if int(i) in included]
        self.rank = {p: r for r, p in enumerate(self.sorted_planes, 1)}
        first = datasets[0]
        if planes[0].frame_number is not None:
            measures = first.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            self.spacing_given = "SpacingBetweenSlices" in measures
        else:
            self.spacing_given = "SpacingBetweenSlices" in first

    # the header: highdicom on a one-plane stand-in ---------------------------------------------

    def _stand_in(self) -> Dataset:
        import highdicom as hd

        numbers = [int(d.SegmentNumber) for d in self.descriptions]
        per_plane = self.rows * self.cols
        count = -(-len(numbers) // per_plane)
        if count > len(self.sorted_planes):  # tiny frames, very many segments
            raise _NoFastPath
        dtype = np.uint8 if max(numbers) < 256 else np.uint16
        pixels = np.zeros((count, per_plane), dtype)
        pixels.ravel()[: len(numbers)] = numbers
        stand_in_planes = [self.planes[p] for p in self.sorted_planes[:count]]
        positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, p.position)
                     for p in stand_in_planes]
        return hd.seg.Segmentation(
            source_images=self.datasets, pixel_array=pixels.reshape(count, self.rows, self.cols),
            segmentation_type=self.options.segmentation_type, segment_descriptions=self.descriptions,
            plane_positions=positions, **_highdicom_kwargs(self.datasets, self.options))

    def _header(self, seg: Dataset, n_frames: int) -> Dataset:
        from highdicom.spatial import get_volume_positions
        from pydicom.valuerep import format_number_as_ds

        del seg.PerFrameFunctionalGroupsSequence
        del seg.PixelData
        _background_last(_with_type2(seg))
        seg.NumberOfFrames = n_frames
        positions = [p.position.tolist() for p in self.planes]
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        if not self.spacing_given:  # highdicom computes it from all source planes; the stand-in had one
            spacing, _ = get_volume_positions(image_positions=positions, image_orientation=self.iop)
            if spacing is not None:
                measures.SpacingBetweenSlices = format_number_as_ds(spacing)
            elif "SpacingBetweenSlices" in measures:
                del measures.SpacingBetweenSlices
        # DimensionOrganizationType 3D: frames told apart by position only (one segment, or LABELMAP),
        # the included planes regularly spaced (highdicom's rule).
        three_d = False
        if len(self.included) > 1 and (not self.binary or len(self.ids) == 1):
            spacing, _ = get_volume_positions(image_positions=[positions[i] for i in self.included],
                                              image_orientation=self.iop, sort=False)
            three_d = spacing is not None and spacing > 0.0
        if three_d:
            seg.DimensionOrganizationType = "3D"
        elif "DimensionOrganizationType" in seg:
            del seg.DimensionOrganizationType
        return seg

    # per-frame functional groups -------------------------------------------------------------------

    def _frame_parts(self, template: Dataset, encodings: Any) -> tuple[list, dict, dict, bytes, int]:
        """Encoded pieces of per-frame items: (kind, bytes) in tag order; per-plane and per-segment
        pieces; the FrameContentSequence prefix and the number of dimension index values."""
        from highdicom.utils import get_plane_positions_of_image

        multiframe = self.planes[0].frame_number is not None
        hd_positions = get_plane_positions_of_image(self.datasets[0]) if multiframe else None
        layout: list[tuple[str, int, bytes]] = []
        plane_parts: dict[int, dict[int, bytes]] = {p: {} for p in self.sorted_planes}
        segment_parts: dict[int, bytes] = {}
        content_prefix, n_values = b"", 0
        for elem in template:
            tag = int(elem.tag)
            if tag == 0x00089124 and len(elem.value):  # DerivationImageSequence: per plane
                layout.append(("plane", tag, b""))
                source_item = elem.value[0].SourceImageSequence[0]
                for p in self.sorted_planes:
                    plane = self.planes[p]
                    source_item.ReferencedSOPInstanceUID = plane.dataset.SOPInstanceUID
                    if multiframe:
                        source_item.ReferencedFrameNumber = plane.frame_number
                    plane_parts[p][tag] = _encode(elem, encodings)
            elif tag == 0x00209113:  # PlanePositionSequence: per plane
                import highdicom as hd

                layout.append(("plane", tag, b""))
                for p in self.sorted_planes:
                    value = (hd_positions[self.planes[p].frame_number - 1] if multiframe else
                             hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                      self.planes[p].dataset.ImagePositionPatient))
                    plane_parts[p][tag] = _encode(DataElement(tag, "SQ", value), encodings)
            elif tag == 0x00209111:  # FrameContentSequence: DimensionIndexValues per frame
                item = elem.value[0]
                if list(item.keys()) != [pydicom.tag.Tag(0x00209157)]:
                    raise SegError("internal", "unexpected FrameContentSequence from highdicom")
                values = item.DimensionIndexValues
                multiple = isinstance(values, (list, tuple, pydicom.multival.MultiValue))
                n_values = len(values) if multiple else 1
                encoded = _encode(elem, encodings)
                content_prefix = encoded[: len(encoded) - 4 * n_values]
                layout.append(("content", tag, b""))
            elif tag == 0x0062000A:  # SegmentIdentificationSequence: per segment
                layout.append(("segment", tag, b""))
                item = elem.value[0]
                for d in self.descriptions:
                    item.ReferencedSegmentNumber = int(d.SegmentNumber)
                    segment_parts[int(d.SegmentNumber)] = _encode(elem, encodings)
            else:
                layout.append(("constant", tag, _encode(elem, encodings)))
        return layout, plane_parts, segment_parts, content_prefix, n_values

    def _per_frame(self, template: Dataset, frames: list[tuple[int | None, int]], encodings: Any) -> bytes:
        layout, plane_parts, segment_parts, prefix, n_values = self._frame_parts(template, encodings)
        items = []
        pack = struct.Struct(f"<{n_values}I").pack
        for number, p in frames:
            values = (number, self.rank[p]) if n_values == 2 else (self.rank[p],)
            body = []
            for kind, tag, data in layout:
                if kind == "plane":
                    body.append(plane_parts[p][tag])
                elif kind == "content":
                    body.append(prefix + pack(*values))
                elif kind == "segment":
                    body.append(segment_parts[number])  # type: ignore[index]
                else:
                    body.append(data)
            items.append(_item(b"".join(body)))
        return b"".join(items)

    # pixel data ---------------------------------------------------------------------------------

    def _binary_frames(self) -> tuple[list[tuple[int, int]], np.ndarray | bytes]:
        """Frames (segment number, plane) in highdicom's order and their packed pixel data."""
        array = self.labels.array
        plane_of_k = {self.planes[p].k: p for p in self.sorted_planes}
        order_k = np.array([self.planes[p].k for p in self.sorted_planes])
        aligned = self.cols % 8 == 0
        frames: list[tuple[int, int]] = []
        blocks = []
        for number, label_id in enumerate(self.ids, 1):
            zs, ys, xs = self.boxes[label_id - 1]
            if aligned:
                xs = slice(xs.start // 8 * 8, -(-xs.stop // 8) * 8)
            sub = array[zs, ys, xs] == label_id
            present = sub.any(axis=(1, 2))
            in_box = (order_k >= zs.start) & (order_k < zs.stop)
            ks = order_k[in_box]
            ks = ks[present[ks - zs.start]]
            if not len(ks):
                continue
            index = ks - zs.start
            if np.all(np.diff(index) == 1):  # the usual run of slices in order: a view, not a copy
                chosen = sub[index[0]:index[-1] + 1]
            else:
                chosen = sub[index]
            if aligned:
                blocks.append((len(frames), ys, xs, np.packbits(chosen, axis=-1, bitorder="little")))
            else:
                full = np.zeros((len(ks), self.rows, self.cols), bool)
                full[:, ys, xs] = chosen
                blocks.append((len(frames), None, None, full))
            frames.extend((number, plane_of_k[int(k)]) for k in ks)
        if aligned:
            out = np.zeros((len(frames), self.rows, self.cols // 8), np.uint8)
            for start, ys, xs, packed in blocks:
                out[start:start + len(packed), ys, xs.start // 8: xs.stop // 8] = packed
            return frames, out
        bits = np.concatenate([full.reshape(-1) for _, _, _, full in blocks])
        return frames, np.packbits(bits, bitorder="little")

    def _labelmap_frames(self, transfer_syntax: str) -> tuple[list[tuple[None, int]], np.ndarray | bytes]:
        from highdicom.frame import encode_frame
        from pydicom.encaps import encapsulate

        numbers = [int(d.SegmentNumber) for d in self.descriptions]
        dtype = np.uint8 if max(numbers) < 256 else np.uint16
        frames = [(None, p) for p in self.sorted_planes]
        lut = np.zeros(max(self.ids) + 1, dtype)  # label id -> segment number (1..N)
        lut[self.ids] = numbers
        pixels = lut[self.labels.array[[self.planes[p].k for p in self.sorted_planes]]]
        if transfer_syntax != RLELossless:
            return frames, pixels
        bits = np.iinfo(dtype).bits
        encoded = [encode_frame(frame, transfer_syntax_uid=RLELossless, bits_allocated=bits, bits_stored=bits,
                                photometric_interpretation="MONOCHROME2", pixel_representation=0)
                   for frame in pixels]
        return frames, encapsulate(encoded)

    # the file ----------------------------------------------------------------------------------

    def write(self, fp: Any) -> None:
        stand_in = self._stand_in()
        transfer_syntax = str(stand_in.file_meta.TransferSyntaxUID)
        template = stand_in.PerFrameFunctionalGroupsSequence[0]
        if self.binary:
            frames, pixels = self._binary_frames()
        else:
            frames, pixels = self._labelmap_frames(transfer_syntax)  # type: ignore[assignment]
        encodings = stand_in.get("SpecificCharacterSet")
        per_frame = self._per_frame(template, frames, encodings or "ISO_IR 6")
        header = self._header(stand_in, len(frames))
        if any(int(elem.tag) >= _PER_FRAME for elem in header):
            raise SegError("internal", "highdicom wrote attributes after the per-frame functional groups")
        pydicom.dcmwrite(fp, header, enforce_file_format=True)
        fp.write(struct.pack("<HH", 0x5200, 0x9230) + b"SQ\0\0" + struct.pack("<I", len(per_frame)))
        fp.write(per_frame)
        data = memoryview(pixels).cast("B") if isinstance(pixels, np.ndarray) else memoryview(pixels)
        encapsulated = transfer_syntax == RLELossless
        vr = b"OW" if not self.binary and header.BitsAllocated == 16 and not encapsulated else b"OB"
        length = 0xFFFFFFFF if encapsulated else len(data) + len(data) % 2
        fp.write(struct.pack("<HH", 0x7FE0, 0x0010) + vr + b"\0\0" + struct.pack("<I", length))
        fp.write(data)
        if encapsulated:
            fp.write(b"\xfe\xff\xdd\xe0\0\0\0\0")  # sequence delimitation item
        elif len(data) % 2:
            fp.write(b"\0")


def warm_up() -> None:
    """Build a tiny SEG in memory, so that a long-running node pays highdicom's import and the tables
    of the standard it loads on first use (~0.5 s together) at start, not in its first job's SEG."""
    from node.dicom.writer import SeriesInfo, series_datasets
    from node.volume import Geometry, Volume

    ct = Volume(np.zeros((2, 8, 8), np.int16), Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)))
    datasets = series_datasets(ct, SeriesInfo(uid_seed="segnode warm-up"))
    array = np.zeros((2, 8, 8), np.uint8)
    array[:, 2:6, 2:6] = 1
    build_seg(LabelVolume(array, ct.geometry, classes={1: LabelClass(1, "liver")}), datasets)
