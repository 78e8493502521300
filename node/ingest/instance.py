"""One received instance: checked, given its DICOM file meta, and summarised in a few tags.

Every receiver (C-STORE, STOW-RS, a file drop) hands over the encoded dataset; this module decides
what C-STORE status it earns (PS3.4 B.2.3) without decoding pixels:

* a structural walk over the element headers finds truncated or malformed encodings (pydicom
  itself silently accepts a dataset cut short), PS3.5 7.1 and 7.5;
* the UIDs that name spool paths must be valid UIDs (PS3.5 9.1), so a UID is never a path trick;
* the dataset must agree with the SOP class/instance the request announced (PS3.7 9.1.1).
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import pydicom
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES

from node import __version__
from node.dicom.series import NON_IMAGE_SOP_CLASSES, valid_uid

#: The transfer syntaxes the listener accepts (every one pynetdicom knows); STOW-RS parts are held to them.
KNOWN_TRANSFER_SYNTAXES = frozenset(ALL_TRANSFER_SYNTAXES)
#: Our implementation identity in the file meta we write (PS3.7 D.3.3.2);
#: ``pydicom.uid.generate_uid(entropy_srcs=["segnode implementation class"])``.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.23742184005513011243914022824837365631"
IMPLEMENTATION_VERSION = f"SEGNODE_{__version__}"[:16]


class Status(IntEnum):
    """C-STORE response statuses we answer with (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    #: Refused: out of resources (disk full, spool not writable).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class (announced class/instance differ, image without pixels).
    DOES_NOT_MATCH = 0xA900
    #: Error: cannot understand; the dataset is truncated or its encoding malformed.
    CANNOT_UNDERSTAND = 0xC000
    #: Error: cannot understand; a UID that names the instance is missing or not a valid UID.
    INVALID_UID = 0xC010
    #: STOW-RS FailureReason: referenced transfer syntax not supported (PS3.18 10.5.3); a C-STORE never
    #: meets it (the presentation context is refused at negotiation).
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


class Refused(Exception):
    """An instance that is not stored, with the status to answer and a reason for people."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@functools.lru_cache(maxsize=512)
def uid_name(uid: str) -> str:
    """The standard's name for a UID ("CT Image Storage"), or the UID itself (cached: a handful of SOP
    classes arrive again and again)."""
    return UID(uid).name


#: Modalities that are never images to segment (PS3.3 C.7.3.1.1.1).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "PR", "KO", "REG", "FID", "DOC", "PLAN", "ECG",
     "AU"}
)
#: SOP class families that are never images: SR/KO, presentation states, RT, raw data/registration/
#: segmentation, encapsulated documents, waveforms (PS3.4 B.5).
_NON_IMAGE_SOP_FAMILIES = tuple(
    "1.2.840.10008.5.1.4.1.1." + suffix for suffix in ("88", "11", "481", "66", "104", "9")
)


def is_image(sop_class_uid: str, modality: str, has_pixels: bool) -> bool:
    """True when the instance is a picture of the patient that a router may select for segmentation."""
    if not has_pixels or modality.upper() in NON_IMAGE_MODALITIES or sop_class_uid in NON_IMAGE_SOP_CLASSES:
        return False
    return not any(sop_class_uid == f or sop_class_uid.startswith(f + ".") for f in _NON_IMAGE_SOP_FAMILIES)


@dataclass(frozen=True)
class InstanceInfo:
    """The few tags that spool, completion and router need; no patient data."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str = ""
    instance_number: int | None = None
    acquisition_number: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    #: Count hint: images in this acquisition (0020,1002), when the sender wrote it.
    images_in_acquisition: int | None = None
    number_of_frames: int = 1
    is_image: bool = True


@dataclass(frozen=True)
class Encoded:
    """A checked instance ready to be written: our file meta, the dataset as received, its summary."""

    meta: bytes
    #: The data set as received (a view of the caller's buffer when it was given one: not kept).
    body: bytes | bytearray | memoryview
    info: InstanceInfo

    @property
    def data(self) -> bytes:
        """The whole Part 10 file (PS3.10 7.1)."""
        return self.meta + bytes(self.body)


# --- structure ----------------------------------------------------------------------------

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float and Double Float Pixel Data
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1), as the two
#: bytes read big-endian (compared as numbers: the buffer may be a writable memoryview).
_LONG_VRS = frozenset(
    int.from_bytes(vr, "big")
    for vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_UN = int.from_bytes(b"UN", "big")
#: The top-level tags read from each instance; values are taken raw (no pydicom decoding: speed).
_WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200012: "AcquisitionNumber",
    0x00200013: "InstanceNumber",
    0x00200032: "ImagePositionPatient",
    0x00200037: "ImageOrientationPatient",
    0x00201002: "ImagesInAcquisition",
    0x00280002: "SamplesPerPixel",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280100: "BitsAllocated",
}


class _Truncated(Exception):
    pass


class _Walker:
    """Skips over element headers to prove the encoding is whole (PS3.5 7.1, 7.5), keeping the raw
    values of the few top-level tags in ``_WANTED`` and the length of the pixel data."""

    def __init__(self, buf: bytes | bytearray | memoryview, implicit: bool, little: bool) -> None:
        self.buf, self.implicit, self.little = buf, implicit, little
        self.tag_length = struct.Struct("<HHI" if little else ">HHI")
        self.short = struct.Struct("<H" if little else ">H")
        self.long = struct.Struct("<I" if little else ">I")
        self.pixel_length: int | None = None
        self.values: dict[str, bytes] = {}

    def dataset(self, pos: int, end: int, implicit: bool, until: int | None = None, top: bool = False) -> int:
        """Walk elements from ``pos``; stop at ``end`` or after the delimiter ``until``."""
        buf = self.buf
        while pos < end:
            if pos + 8 > end:
                raise _Truncated(f"element header cut short at byte {pos}")
            group, element, length = self.tag_length.unpack_from(buf, pos)
            tag = group << 16 | element
            if tag in (_ITEM_END, _SEQUENCE_END):
                if tag != until:
                    raise _Truncated(f"unexpected delimiter ({group:04X},{element:04X}) at byte {pos}")
                return pos + 8
            vr = 0
            if implicit or group == 0xFFFE:
                pos += 8
            else:
                vr = buf[pos + 4] << 8 | buf[pos + 5]
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise _Truncated(f"element header cut short at byte {pos}")
                    (length,) = self.long.unpack_from(buf, pos + 8)
                    pos += 12
                else:
                    (length,) = self.short.unpack_from(buf, pos + 6)
                    pos += 8
            if length == _UNDEFINED:
                if top and tag in _PIXEL_TAGS:
                    self.pixel_length = length
                # A sequence or encapsulated pixel data; UN of undefined length is implicit VR (PS3.5 6.2.2).
                pos = self.items(pos, end, implicit or vr == _UN)
                continue
            if pos + length > end:
                raise _Truncated(f"({group:04X},{element:04X}) needs {length} bytes, the data ends first")
            if top:
                if tag in _WANTED:
                    self.values[_WANTED[tag]] = bytes(buf[pos : pos + length])
                elif tag in _PIXEL_TAGS:
                    self.pixel_length = length
            pos += length
        if until is not None:
            raise _Truncated("the data ends inside a sequence or item")
        return pos

    def items(self, pos: int, end: int, implicit: bool) -> int:
        """Walk the items of an undefined-length sequence up to and past its delimiter."""
        while True:
            if pos + 8 > end:
                raise _Truncated("the data ends inside a sequence (no sequence delimiter)")
            group, element, length = self.tag_length.unpack_from(self.buf, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _Truncated(f"({group:04X},{element:04X}) where a sequence item was expected")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, implicit, until=_ITEM_END)
            else:
                pos += length
                if pos > end:
                    raise _Truncated("a sequence item runs past the end of the data")

    # Raw values to Python (PS3.5 6.2: text padded with spaces, UI with NUL; US binary).

    def text(self, keyword: str) -> str:
        return self.values.get(keyword, b"").decode("ascii", "replace").strip("\0 ")

    def integer(self, keyword: str) -> int | None:
        raw = self.values.get(keyword)
        if raw is None or raw == b"":
            return None
        if keyword in ("SamplesPerPixel", "Rows", "Columns", "BitsAllocated"):  # US
            return self.short.unpack_from(raw)[0] if len(raw) >= 2 else None
        try:
            return int(self.text(keyword).split("\\")[0])
        except ValueError:
            return None

    def decimals(self, keyword: str, n: int) -> tuple[float, ...] | None:
        try:
            values = tuple(float(v) for v in self.text(keyword).split("\\"))
        except ValueError:
            return None
        return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _inflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise Refused(Status.CANNOT_UNDERSTAND, f"deflated dataset cannot be inflated: {exc}") from None


# --- file meta -------------------------------------------------------------------------------


def split_part10(data: bytes | memoryview) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes) of a DICOM Part 10 file (PS3.10 7.1), as STOW-RS parts are."""
    view = memoryview(data)
    if bytes(view[128:132]) != b"DICM":
        raise Refused(Status.CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix at byte 128)")
    fp = io.BytesIO(view)
    fp.seek(132)
    try:
        meta = pydicom.filereader._read_file_meta_info(fp)
    except Exception as exc:  # noqa: BLE001 (pydicom raises many kinds for a bad file meta)
        raise Refused(Status.CANNOT_UNDERSTAND, f"file meta information cannot be read: {exc}") from None
    syntax = str(meta.get("TransferSyntaxUID", "")).strip("\0 ")
    if not valid_uid(syntax):
        raise Refused(Status.CANNOT_UNDERSTAND, "file meta information has no valid TransferSyntaxUID")
    return syntax, bytes(view[fp.tell() :])


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, syntax: str, source_aet: str = "") -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1), always explicit VR little endian.

    Encoded by hand: it is seven short elements, and pydicom's writer costs ~1 ms an instance.
    """
    elements = [
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _padded(sop_class, b"\0")),
        _element(0x0002, 0x0003, b"UI", _padded(sop_instance, b"\0")),
        _element(0x0002, 0x0010, b"UI", _padded(syntax, b"\0")),
        _element(0x0002, 0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0")),
        _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION, b" ")),
    ]
    if source_aet:
        elements.append(_element(0x0002, 0x0016, b"AE", _padded(source_aet.strip()[:16], b" ")))
    body = b"".join(elements)
    return b"\0" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


# --- the check ---------------------------------------------------------------------------------


def encode_instance(
    dataset: bytes | bytearray | memoryview,
    transfer_syntax: str | None = None,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
    source_aet: str = "",
) -> Encoded:
    """Check one instance and give it our file meta; raise :class:`Refused` with the status to answer.

    ``dataset`` is either a Part 10 file (``transfer_syntax`` None: read from its meta) or the bare
    dataset as a C-STORE carries it, in ``transfer_syntax``. ``sop_class_uid``/``sop_instance_uid``
    are what the request announced (C-STORE Affected SOP Class/Instance UID), checked against the data.
    """
    if transfer_syntax is None:
        transfer_syntax, dataset = split_part10(dataset)
    syntax = str(transfer_syntax)  # plain str: pydicom's UID() validates with a regex each time
    if not valid_uid(syntax):
        raise Refused(Status.CANNOT_UNDERSTAND, f"transfer syntax {syntax[:64]!r} is not a UID")
    if syntax not in KNOWN_TRANSFER_SYNTAXES:  # its encoding cannot even be walked
        raise Refused(Status.TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {syntax} is not one this node knows")
    body = dataset  # no copy: walked and written as it is
    plain = _inflate(body) if syntax == DeflatedExplicitVRLittleEndian else body
    walker = _Walker(plain, implicit=syntax == ImplicitVRLittleEndian, little=syntax != ExplicitVRBigEndian)
    try:
        walker.dataset(0, len(plain), walker.implicit, top=True)
    except (_Truncated, struct.error) as exc:
        raise Refused(Status.CANNOT_UNDERSTAND, f"dataset is truncated or malformed: {exc}") from None

    keywords = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
    uids = {k: walker.text(k) for k in keywords}
    for keyword, value in uids.items():
        if not valid_uid(value):
            shown = repr(value[:70]) if value else "missing"
            raise Refused(Status.INVALID_UID, f"{keyword} is not a valid UID ({shown})")
    sop_class, sop_instance = uids["SOPClassUID"], uids["SOPInstanceUID"]
    for keyword, announced, found in (
        ("SOPClassUID", sop_class_uid, sop_class),
        ("SOPInstanceUID", sop_instance_uid, sop_instance),
    ):
        if announced and announced != found:
            message = f"dataset {keyword} {found} is not the announced {announced}"
            raise Refused(Status.DOES_NOT_MATCH, message)
    has_pixels = walker.pixel_length is not None
    if not has_pixels and "Image Storage" in uid_name(sop_class):
        raise Refused(Status.DOES_NOT_MATCH, f"{uid_name(sop_class)} instance has no pixel data")
    frames = walker.integer("NumberOfFrames") or 1
    sizes = [walker.integer(k) for k in ("BitsAllocated", "Rows", "Columns")]
    if has_pixels and (sizes[1] == 0 or sizes[2] == 0):  # an image of no pixels (PS3.3 C.7.6.3.1: 1 or more)
        raise Refused(Status.DOES_NOT_MATCH, f"the image is {sizes[2]} x {sizes[1]} (Columns x Rows): no pixels")
    if walker.pixel_length not in (None, _UNDEFINED) and all(sizes):
        samples = walker.integer("SamplesPerPixel") or 1
        expected = (math.prod(sizes) * samples * frames + 7) // 8  # type: ignore[arg-type]
        if walker.pixel_length < expected:
            raise Refused(
                Status.DOES_NOT_MATCH,
                f"pixel data holds {walker.pixel_length} bytes, Rows x Columns x frames need {expected}",
            )
    modality = walker.text("Modality")
    info = InstanceInfo(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax=syntax,
        modality=modality,
        instance_number=walker.integer("InstanceNumber"),
        acquisition_number=walker.integer("AcquisitionNumber"),
        position=walker.decimals("ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=walker.decimals("ImageOrientationPatient", 6),
        images_in_acquisition=walker.integer("ImagesInAcquisition"),
        number_of_frames=frames,
        is_image=is_image(sop_class, modality, has_pixels),
    )
    return Encoded(file_meta(sop_class, sop_instance, syntax, source_aet), body, info)
