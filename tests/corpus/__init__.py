"""A corpus of real-world DICOM input, each kind with the outcome the node must give it (issue 16).

Every :class:`Case` builds its files with pydicom (and gdcm / pylibjpeg for the encodings pydicom does not
write itself) from one small CT (64 x 64 pixels, 12 slices of the phantom), with fresh UIDs on every
build, and states exactly what happens to it:

* ``dimse``: the C-STORE statuses the node answers, as ``{status: count}`` (``segnode send``: each
  file's bytes as they are, one association per case); ``NOT_SENT`` counts files the sender cannot read
  or has no accepted presentation context for;
* ``stow``: the STOW-RS answer: HTTP status and ``{FailureReason: count}`` of the refused instances;
* ``series``: what becomes of each series that is stored, in the order the case built them: ``SEG`` (the
  job is done, ``seg.dcm`` written, no output failed), ``failed:<code>`` (the job failed with that
  error code, at once: never retried), ``not routed`` (stored, never a job: SR, SEG, PR, ...).

The table of kinds and outcomes is ``docs/corpus.md`` (:func:`table` writes it; a test keeps it true).
"""

from __future__ import annotations

import copy
import io
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)

from node.dicom.writer import SeriesInfo, series_datasets
from node.phantom import TINY, make_phantom
from node.volume import Geometry, Volume

#: A file the sender could not send (not DICOM to it, or no presentation context accepted).
NOT_SENT = -1
SEG = "SEG"
NOT_ROUTED = "not routed"
SLICES = 12


@dataclass(frozen=True)
class Case:
    """One kind of input and what the node must do with it."""

    kind: str
    build: Callable[[], list[bytes]]
    #: C-STORE: {status: count}; NOT_SENT for files the SCU does not send.
    dimse: dict[int, int]
    #: STOW-RS: (HTTP status, {FailureReason: count}).
    stow: tuple[int, dict[int, int]]
    #: Per stored series, in build order: SEG | failed:<code> | done, seg failed:<code> | not routed.
    series: tuple[str, ...]
    #: What the case is, for the table.
    note: str = ""
    #: The series outcome by C-STORE where it differs (STOW-RS takes only Part 10 files, C-STORE only
    #: negotiated SOP classes).
    series_dimse: tuple[str, ...] | None = None


# --- the source CT --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _volume() -> Volume:
    """12 slices from the middle of the tiny phantom (liver, vessels, spine): 64 x 64 x 12, 6 mm."""
    ct = make_phantom(TINY).ct
    k0 = 14
    g = ct.geometry
    geometry = Geometry(origin=tuple(float(v) for v in g.slice_origin(k0)), spacing=g.spacing, direction=g.direction)
    return Volume(np.ascontiguousarray(ct.array[k0:k0 + SLICES]), geometry)


def volume(direction: tuple | None = None, shape: tuple[int, int] | None = None) -> Volume:
    v = _volume()
    array = v.array if shape is None else np.ascontiguousarray(v.array[:, : shape[0], : shape[1]])
    g = v.geometry
    if direction is not None:
        g = Geometry(origin=g.origin, spacing=g.spacing, direction=direction)
    return Volume(array, g)


def series(modality: str = "CT", vol: Volume | None = None, **info: object) -> list[Dataset]:
    """A good series with fresh UIDs (one study per build)."""
    return series_datasets(vol or volume(), SeriesInfo(modality=modality, study_uid=generate_uid(),
                                                       series_description=f"corpus {modality}", **info))


def part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian, preamble: bool = True) -> bytes:
    """``ds`` as a Part 10 file in ``syntax`` (pixel data as it is: compress it before)."""
    ds = copy.copy(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[132:]


def files(datasets: list[Dataset], syntax: str = ExplicitVRLittleEndian) -> list[bytes]:
    return [part10(ds, syntax) for ds in datasets]


def each(edit: Callable[[Dataset], None], *, modality: str = "CT", vol: Volume | None = None,
         syntax: str = ExplicitVRLittleEndian) -> Callable[[], list[bytes]]:
    """A builder: the good series, ``edit`` applied to every instance."""
    def build() -> list[bytes]:
        datasets = series(modality, vol)
        for ds in datasets:
            edit(ds)
        return files(datasets, syntax)
    return build


def one(edit: Callable[[Dataset], None], index: int = 5) -> Callable[[], list[bytes]]:
    """A builder: the good series, ``edit`` applied to instance ``index`` only."""
    def build() -> list[bytes]:
        datasets = series()
        edit(datasets[index])
        return files(datasets)
    return build


def raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Set an element to raw bytes, written as they are (values pydicom would refuse from Python)."""
    tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


# --- transfer syntaxes ------------------------------------------------------------------------


def big_endian() -> list[bytes]:
    """Explicit VR Big Endian (retired, still sent by old equipment): the pixel words byte-swapped."""
    out = []
    for ds in series():
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
        out.append(part10(ds, ExplicitVRBigEndian))
    return out


def compressed(syntax: str, **kwargs: object) -> Callable[[], list[bytes]]:
    """Encoded by pydicom's own encoders (RLE) or its plugins (pylibjpeg-openjpeg, pyjpegls)."""
    def build() -> list[bytes]:
        out = []
        for ds in series():
            ds.compress(syntax, **kwargs)
            out.append(part10(ds, syntax))
        return out
    return build


def gdcm_encoded(syntax: str, bits8: bool = False) -> Callable[[], list[bytes]]:
    """JPEG baseline (8-bit, lossy) and JPEG lossless SV1 through gdcm (pydicom cannot write them)."""
    def build() -> list[bytes]:
        out = []
        for ds in series():
            if bits8:  # JPEG baseline holds 8-bit samples: HU -200..300 in 0..255
                hu = np.frombuffer(ds.PixelData, "<u2").astype(np.int32) - 1024
                ds.PixelData = np.clip((hu + 200) * 255 // 500, 0, 255).astype(np.uint8).tobytes()
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
                ds.RescaleIntercept, ds.RescaleSlope = "-200", "1.96078"
            out.append(_gdcm_change(part10(ds), syntax))
        return out
    return build


def _gdcm_change(data: bytes, syntax: str) -> bytes:
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        source.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise RuntimeError("gdcm cannot read the source")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm cannot encode {syntax}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("gdcm cannot write")
        return target.read_bytes()


def unknown_syntax() -> list[bytes]:
    """A transfer syntax nobody knows (a private UID); the data are explicit VR little endian."""
    out = []
    for ds in series():
        ds = copy.copy(ds)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _bare(data: bytes) -> bytes:
    """The data set of a Part 10 file: no preamble, no ``DICM``, no file meta group (PS3.10 7.1)."""
    (length,) = struct.unpack_from("<I", data, 132 + 8)
    return data[132 + 12 + length:]


def no_preamble() -> list[bytes]:
    """A bare implicit VR data set (no preamble, no file meta): old exports, ACR-NEMA style files."""
    return [_bare(part10(ds, ImplicitVRLittleEndian)) for ds in series()]


# --- content ---------------------------------------------------------------------------------


def _deep(ds: Dataset) -> None:
    """A sequence 24 levels deep (referenced images within referenced images ...)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D0050", "SRT", "Tissue"
    for _ in range(24):
        outer = Dataset()
        outer.ReferencedSOPClassUID = ds.SOPClassUID
        outer.ReferencedSOPInstanceUID = generate_uid()
        outer.ContentSequence = Sequence([item])
        item = outer
    ds.ContentSequence = Sequence([item])


def _private_garbage(ds: Dataset) -> None:
    block = ds.private_block(0x0099, "GARBAGE CORP", create=True)
    block.add_new(0x01, "OB", bytes(range(256)) * 3)
    block.add_new(0x02, "LO", "x" * 63)
    block.add_new(0x03, "UN", b"\xff\xfe\x00\xe0" * 7)  # looks like an item tag: must not be parsed
    block.add_new(0x04, "SQ", Sequence([Dataset()]))
    raw(ds, "StationName", "SH", b"\x00\x01\x02\x03")  # control characters in a text value


def _latin1_without_charset(ds: Dataset) -> None:
    del ds.SpecificCharacterSet
    raw(ds, "PatientName", "PN", "Müller^Jürgen".encode("latin-1") + b" ")
    raw(ds, "StudyDescription", "LO", "Abdomen ñ contrast".encode("latin-1"))


def _utf8(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "山田^太郎=やまだ^たろう"
    ds.SeriesDescription = "Bauch nativ – Leber 肝臓"


def _unknown_charset(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 999"


def _type2_missing(ds: Dataset) -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        delattr(ds, keyword)


def _type2_invalid(ds: Dataset) -> None:
    raw(ds, "PatientSex", "CS", b"MALE")
    raw(ds, "PatientBirthDate", "DA", b"19xx0101")
    raw(ds, "StudyTime", "TM", b"25:61:00")
    raw(ds, "AccessionNumber", "SH", b"ACCESSION-NUMBER-TOO-LONG-FOR-SH")


def _long_descriptions(ds: Dataset) -> None:
    raw(ds, "SeriesDescription", "LO", b"S" * 400)  # LO holds 64 characters
    raw(ds, "StudyDescription", "LO", b"D" * 1000)
    ds.ImageComments = "c" * 9000  # LT: 10240


def _un_vr(ds: Dataset) -> None:
    """Known attributes sent as UN (explicit VR): the receiver looks their VR up."""
    for keyword in ("PixelSpacing", "SliceThickness", "RescaleIntercept", "ImagePositionPatient"):
        element = ds[keyword]
        value = element.value
        text = "\\".join(str(v) for v in value) if isinstance(value, (list, pydicom.multival.MultiValue)) else str(value)
        data = text.encode() + (b" " if len(text) % 2 else b"")
        ds[keyword] = RawDataElement(element.tag, "UN", len(data), data, 0, False, True)


def _wrong_vr(ds: Dataset) -> None:
    """Attributes sent with another VR than the dictionary's: WindowCenter as IS, PatientAge as LO."""
    raw(ds, "WindowCenter", "IS", b"40")
    raw(ds, "PatientAge", "LO", b"forty")


def _odd_length(ds: Dataset) -> None:
    raw(ds, "SeriesDescription", "LO", b"odd")  # odd-length value (PS3.5 7.1.1: must be even)


def _huge_element(ds: Dataset) -> None:
    block = ds.private_block(0x0077, "HUGE VENDOR", create=True)
    block.add_new(0x01, "OB", b"\x5a" * (2 * 1024 * 1024))  # 2 MiB of private data in every instance


def _signed(ds: Dataset) -> None:
    pixels = np.frombuffer(ds.PixelData, "<u2").astype(np.int32) - 1024
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"


def _bits_stored_12(ds: Dataset) -> None:
    pixels = np.frombuffer(ds.PixelData, "<u2")
    ds.PixelData = (np.clip(pixels, 0, 4095) | 0xA000).astype("<u2").tobytes()  # garbage in the 4 high bits
    ds.BitsStored, ds.HighBit = 12, 11


def _bits_32(ds: Dataset) -> None:
    ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype("<u4").tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31


def _float_rescale(ds: Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024.25"
    pixels = np.frombuffer(ds.PixelData, "<u2").astype(np.float64)
    ds.PixelData = np.clip(np.rint((pixels - 0.25) * 2), 0, 65535).astype("<u2").tobytes()


def _no_intercept(ds: Dataset) -> None:
    _signed(ds)
    del ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType


def _monochrome1(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "MONOCHROME1"


def _no_instance_number(ds: Dataset) -> None:
    del ds.InstanceNumber, ds.SliceLocation, ds.ImagesInAcquisition


def _same_instance_number(ds: Dataset) -> None:
    ds.InstanceNumber = 1


def _no_slice_thickness(ds: Dataset) -> None:
    del ds.SliceThickness


def _shuffled() -> list[bytes]:
    datasets = series()
    order = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 4, 6]
    return files([datasets[n] for n in order])


# --- geometry ----------------------------------------------------------------------------------


def _spacing(value: bytes) -> Callable[[Dataset], None]:
    return lambda ds: raw(ds, "PixelSpacing", "DS", value)


def _rescale_slope(value: bytes) -> Callable[[Dataset], None]:
    return lambda ds: raw(ds, "RescaleSlope", "DS", value)


def _rows(rows: int, columns: int) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.Rows, ds.Columns = rows, columns
    return edit


def _direction(row: tuple[float, float, float], col: tuple[float, float, float]) -> tuple:
    r, c = np.array(row, float), np.array(col, float)
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    n = np.cross(r, c)
    return tuple(tuple(float(v) for v in line) for line in np.column_stack([r, c, n]))


def oblique() -> Volume:
    a = np.radians(20.0)
    return volume(direction=_direction((np.cos(a), np.sin(a), 0.0), (-np.sin(a) * np.cos(0.3), np.cos(a) * np.cos(0.3),
                                                                     np.sin(0.3))))


def _feet_first() -> list[bytes]:
    """Feet first: slices written from head to feet, the normal pointing to the feet (z descending)."""
    v = volume(direction=((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)))
    datasets = series(vol=Volume(v.array[::-1].copy(), v.geometry))
    for ds in datasets:
        ds.PatientPosition = "FFS"
    return files(datasets)


def _negative_spacing() -> list[bytes]:
    """Instances numbered head to feet with a negative SpacingBetweenSlices, as some scanners write."""
    datasets = series()
    for n, ds in enumerate(reversed(datasets), 1):
        ds.InstanceNumber = n
        ds.SpacingBetweenSlices = "-6"
    return files(datasets)


def _sagittal() -> Volume:
    return volume(direction=_direction((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)))


def _gantry_tilt() -> list[bytes]:
    datasets = series()
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + k * 6.0 * np.tan(np.radians(15)):.6f}", f"{z:.6f}"]
        ds.GantryDetectorTilt = "15"
    return files(datasets)


def _drop(*indices: int) -> Callable[[], list[bytes]]:
    def build() -> list[bytes]:
        datasets = series()
        return files([ds for n, ds in enumerate(datasets) if n not in indices])
    return build


def _uneven() -> list[bytes]:
    datasets = series()
    for ds in datasets[6:]:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y:.6f}", f"{z + 2.5:.6f}"]
    return files(datasets)


def _localizer_inside() -> list[bytes]:
    datasets = series()
    datasets[0].ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    datasets[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return files(datasets)


def _smaller_slice() -> list[bytes]:
    datasets = series()
    small = series(vol=volume(shape=(32, 32)))
    datasets[4].Rows, datasets[4].Columns, datasets[4].PixelData = 32, 32, small[4].PixelData
    return files(datasets)


def _same_position() -> list[bytes]:
    datasets = series()
    datasets[5].ImagePositionPatient = datasets[4].ImagePositionPatient
    return files(datasets)


def _two_acquisitions() -> list[bytes]:
    """Two phases in one series: the same positions twice, as two acquisitions."""
    first, second = series(), series()
    for ds in second:
        ds.SeriesInstanceUID = first[0].SeriesInstanceUID
        ds.StudyInstanceUID = first[0].StudyInstanceUID
        ds.FrameOfReferenceUID = first[0].FrameOfReferenceUID
        ds.AcquisitionNumber = 2
    for ds in first:
        ds.AcquisitionNumber = 1
    return files(first + second)


def _duplicate_sop_different_content() -> list[bytes]:
    """One SOP Instance UID sent twice with different pixels: the last copy is the instance."""
    datasets = series()
    other = copy.deepcopy(datasets[3])
    other.PixelData = (np.frombuffer(other.PixelData, "<u2") + 7).astype("<u2").tobytes()
    other.ImageComments = "second copy"
    return files(datasets) + [part10(other)]


def _mixed_association() -> list[bytes]:
    """Two series of one study (and an SR) in one association."""
    first = series()
    second = series(series_number=2)
    for ds in second:
        ds.StudyInstanceUID = first[0].StudyInstanceUID
    return files(first) + files(second)


def _multiframe() -> list[bytes]:
    """Legacy Converted Enhanced CT (one multi-frame instance, per-frame functional groups), by highdicom."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    datasets = series()
    enhanced = LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=generate_uid(), series_number=3,
                                              sop_instance_uid=generate_uid(), instance_number=1)
    return [part10(enhanced)]


def _uids(**values: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            raw(ds, keyword, "UI", value.encode("utf-8") + (b"\0" if len(value.encode("utf-8")) % 2 else b""))
    return edit


def _truncated(cut: int) -> Callable[[], list[bytes]]:
    """One file cut ``cut`` bytes short (a copy that stopped half-way)."""
    def build() -> list[bytes]:
        out = files(series())
        out[4] = out[4][:-cut]
        return out
    return build


def _header_cut() -> list[bytes]:
    out = files(series())
    return [data[:400] if n == 2 else data for n, data in enumerate(out)]


def _zero_length() -> list[bytes]:
    return files(series()) + [b""]


def _length_beyond(ds_bytes: bytes) -> bytes:
    """The StudyDescription's length field set to 0x7FFFFFF0: it runs past the end of the data."""
    marker = b"\x08\x00\x30\x10LO"
    at = ds_bytes.index(marker)
    return ds_bytes[: at + 6] + struct.pack("<H", 0xFFF0) + ds_bytes[at + 8:]


def _bad_length() -> list[bytes]:
    out = files(series())
    out[4] = _length_beyond(out[4])
    return out


def _no_pixels(ds: Dataset) -> None:
    del ds.PixelData


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _rgb() -> list[bytes]:
    """A colour image stored as CT Image Storage (a screenshot pasted into a series)."""
    datasets = series()
    for ds in datasets:
        gray = (np.frombuffer(ds.PixelData, "<u2") >> 4).astype(np.uint8)
        ds.PixelData = np.repeat(gray, 3).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return files(datasets)


def _private_sop_class(ds: Dataset) -> None:
    """An image in a vendor's private SOP class (a CT in all but name)."""
    ds.SOPClassUID = "1.3.12.2.1107.5.9.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID


def _derived(ds: Dataset) -> None:
    ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]


# --- non-image objects --------------------------------------------------------------------------


def _object(sop_class: str, modality: str, study: Dataset | None = None, **extra: object) -> Dataset:
    source = study or series()[0]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber, ds.Modality = generate_uid(), 99, 1, modality
    ds.Manufacturer = "other vendor"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    return ds


def _sr() -> list[bytes]:
    return [part10(_object("1.2.840.10008.5.1.4.1.1.88.33", "SR", ValueType="CONTAINER",
                           CompletionFlag="COMPLETE", VerificationFlag="UNVERIFIED", ContinuityOfContent="SEPARATE"))]


def _pr() -> list[bytes]:
    return [part10(_object("1.2.840.10008.5.1.4.1.1.11.1", "PR", ContentLabel="PR"))]


def _ko() -> list[bytes]:
    return [part10(_object("1.2.840.10008.5.1.4.1.1.88.59", "KO", ValueType="CONTAINER"))]


def _rtstruct() -> list[bytes]:
    return [part10(_object("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", StructureSetLabel="ROIs"))]


def _pdf() -> list[bytes]:
    return [part10(_object("1.2.840.10008.5.1.4.1.1.104.1", "DOC", MIMETypeOfEncapsulatedDocument="application/pdf",
                           EncapsulatedDocument=b"%PDF-1.4\n%%EOF\n"))]


def _seg_object() -> list[bytes]:
    """A DICOM-SEG of the series (another system's result arriving): stored, never segmented again."""
    from node.classes import LabelClass, LabelVolume
    from node.dicom.seg import SegOptions, build_seg
    from node.dicom.series import volume_from_datasets

    datasets = series()
    ct = volume_from_datasets([(str(n), ds) for n, ds in enumerate(datasets)])
    array = np.zeros(ct.array.shape, np.uint8)
    array[3:6, 20:40, 20:40] = 1
    seg = build_seg(LabelVolume(array, ct.geometry, source=ct.source, classes={1: LabelClass(1, "liver")}), datasets,
                    options=SegOptions(manufacturer_model_name="other"))
    seg.Manufacturer = "other vendor"
    return [part10(seg)]


def _seg_modality_on_ct(ds: Dataset) -> None:
    ds.Modality = "SEG"


# --- the corpus ---------------------------------------------------------------------------------

def _refused(status: int, n: int = SLICES, stored: int = 0) -> dict:
    dimse = {status: n} | ({0x0000: stored} if stored else {})
    return {"dimse": dimse, "stow": (409 if not stored else 202, {status: n})}


def _case(kind: str, build: Callable[[], list[bytes]], series_: tuple[str, ...] = (SEG,), note: str = "",
          dimse: dict[int, int] | None = None, stow: tuple[int, dict[int, int]] | None = None,
          n: int = SLICES, series_dimse: tuple[str, ...] | None = None) -> Case:
    return Case(kind, build, dimse if dimse is not None else {0x0000: n},
                stow if stow is not None else (200, {}), series_, note, series_dimse)


def failed(code: str) -> str:
    return f"failed:{code}"


#: Every kind, with its expected outcome. Statuses: PS3.4 B.2-1 (0xA900 data set does not match the SOP
#: class, 0xC000 cannot understand, 0xC010 invalid UID); FailureReason: the same values (PS3.18 10.5.3).
CASES: tuple[Case, ...] = (
    # valid but awkward: every one gets its SEG
    _case("baseline", each(lambda ds: None), note="plain CT, explicit VR little endian"),
    _case("implicit VR little endian", each(lambda ds: None, syntax=ImplicitVRLittleEndian)),
    _case("explicit VR big endian", big_endian, note="retired transfer syntax, byte-swapped pixels"),
    _case("deflated", each(lambda ds: None, syntax=DeflatedExplicitVRLittleEndian)),
    _case("RLE lossless", compressed(RLELossless)),
    _case("JPEG 2000 lossless", compressed(JPEG2000Lossless)),
    _case("JPEG-LS lossless", compressed(JPEGLSLossless)),
    _case("JPEG lossless SV1", gdcm_encoded(JPEGLosslessSV1), note="encoded by gdcm"),
    _case("JPEG baseline 8-bit", gdcm_encoded(JPEGBaseline8Bit, bits8=True), note="lossy, 8-bit window, by gdcm"),
    _case("no preamble", no_preamble, note="bare implicit VR data set: sent by C-STORE; STOW-RS needs Part 10",
          stow=(409, {0xC000: SLICES}), series_=(), series_dimse=(SEG,)),
    _case("deep sequences", each(_deep), note="a sequence 24 levels deep"),
    _case("private garbage", each(_private_garbage), note="private OB/UN/SQ, control characters in text"),
    _case("Latin-1 without character set", each(_latin1_without_charset)),
    _case("UTF-8 names", each(_utf8), note="ISO_IR 192, Japanese and German"),
    _case("unknown character set", each(_unknown_charset), note="SpecificCharacterSet ISO_IR 999"),
    _case("missing Type 2", each(_type2_missing), note="anonymised: no patient name/ID/birth date/sex, "
                                                       "accession, study ID/date/time, referring physician"),
    _case("invalid Type 2 values", each(_type2_invalid), note="PatientSex MALE, birth date 19xx0101, ..."),
    _case("long descriptions", each(_long_descriptions), note="LO of 400 and 1000 characters, 9000-char LT"),
    _case("UN VR", each(_un_vr), note="PixelSpacing, positions, rescale sent as UN"),
    _case("wrong VR", each(_wrong_vr), note="WindowCenter as IS, PatientAge as LO"),
    _case("odd-length value", each(_odd_length)),
    _case("huge private element", each(_huge_element), note="2 MiB private OB in every instance"),
    _case("signed pixels", each(_signed), note="PixelRepresentation 1, intercept 0"),
    _case("BitsStored 12", each(_bits_stored_12), note="garbage in the unused high bits"),
    _case("BitsAllocated 32", each(_bits_32)),
    _case("fractional rescale", each(_float_rescale), note="slope 0.5, intercept -1024.25"),
    _case("no rescale", each(_no_intercept), note="signed HU, no RescaleSlope/Intercept"),
    _case("MONOCHROME1", each(_monochrome1)),
    _case("no InstanceNumber", each(_no_instance_number)),
    _case("one InstanceNumber for all", each(_same_instance_number)),
    _case("no SliceThickness", each(_no_slice_thickness)),
    _case("shuffled order", _shuffled),
    _case("negative spacing", _negative_spacing, note="numbered head to feet, SpacingBetweenSlices -6"),
    _case("feet first", _feet_first),
    _case("oblique", lambda: files(series(vol=oblique())), note="rotated 20 degrees in-plane, tilted 17"),
    _case("sagittal", lambda: files(series(vol=_sagittal()))),
    _case("odd Rows x Columns", lambda: files(series(vol=volume(shape=(61, 63))))),
    _case("duplicate SOP instance, other content", _duplicate_sop_different_content, n=SLICES + 1,
          note="one SOP Instance UID twice, other pixels: the last copy is kept"),
    _case("mixed series in one association", _mixed_association, series_=(SEG, SEG), n=2 * SLICES),
    _case("enhanced multi-frame", _multiframe, n=1, note="Legacy Converted Enhanced CT by highdicom"),
    # refused geometry: a coded job failure, never retried
    _case("PixelSpacing 0\\0", each(_spacing(b"0\\0 ")), series_=(failed("bad_pixel_spacing"),)),
    _case("negative PixelSpacing", each(_spacing(b"-0.5\\-0.5 ")), series_=(failed("bad_pixel_spacing"),)),
    _case("NaN PixelSpacing", each(_spacing(b"NaN\\NaN ")), series_=(failed("bad_pixel_spacing"),)),
    _case("infinite PixelSpacing", each(_spacing(b"inf\\inf ")), series_=(failed("bad_pixel_spacing"),)),
    _case("text PixelSpacing", each(_spacing(b"wide")), series_=(failed("no_geometry"),)),
    _case("RescaleSlope 0", each(_rescale_slope(b"0 ")), series_=(failed("bad_rescale"),)),
    _case("RescaleSlope text", each(_rescale_slope(b"one ")), series_=(failed("bad_rescale"),)),
    _case("gantry tilt", _gantry_tilt, series_=(failed("gantry_tilt"),), note="15 degrees, sheared stack"),
    _case("missing slices", _drop(6), n=SLICES - 1, series_=(failed("missing_slices"),)),
    _case("uneven spacing", _uneven, series_=(failed("uneven_spacing"),)),
    _case("single slice", _drop(*range(1, SLICES)), n=1, series_=(failed("single_slice"),)),
    _case("non-orthogonal orientation", each(lambda ds: setattr(ds, "ImageOrientationPatient",
                                                                 ["1", "0", "0", "0.5", "1", "0"])),
          series_=(failed("non_orthogonal"),)),
    _case("localizer inside the series", _localizer_inside, series_=(failed("orientation_mismatch"),)),
    _case("one slice smaller", _smaller_slice, series_=(failed("size_mismatch"),)),
    _case("two images at one position", _same_position, series_=(failed("duplicate_position"),)),
    _case("two acquisitions at the same positions", _two_acquisitions, n=2 * SLICES,
          series_=(failed("duplicate_position"),)),
    _case("no ImagePositionPatient", each(lambda ds: delattr(ds, "ImagePositionPatient")),
          series_=(failed("no_geometry"),)),
    _case("colour image as CT", _rgb, series_=(failed("unsupported"),)),
    _case("MR (CT-only engine)", each(lambda ds: None, modality="MR"), series_=(failed("unsupported_modality"),)),
    _case("private image SOP class", each(_private_sop_class), series_=("done, seg failed:seg_source_sop_class",),
          dimse={NOT_SENT: SLICES}, series_dimse=(),
          note="a vendor's private SOP class: no presentation context; by STOW-RS the labels are written, "
               "the SEG output alone fails"),
    # refused at ingest: a C-STORE failure status, a STOW-RS FailureReason
    _case("Rows 0", each(_rows(0, 64)), series_=(), **_refused(0xA900)),
    _case("Columns 0", each(_rows(64, 0)), series_=(), **_refused(0xA900)),
    _case("no pixel data", one(_no_pixels), series_=(failed("missing_slices"),),
          note="one instance of 12 without pixels: refused, the rest has a gap", **_refused(0xA900, 1, SLICES - 1)),
    _case("short pixel data", one(_short_pixels), series_=(failed("missing_slices"),),
          **_refused(0xA900, 1, SLICES - 1)),
    _case("truncated in pixel data", _truncated(1000), series_=(failed("missing_slices"),),
          **_refused(0xC000, 1, SLICES - 1), note="one file of 12 cut 1000 bytes short"),
    _case("truncated in the header", _header_cut, series_=(failed("missing_slices"),),
          **_refused(0xC000, 1, SLICES - 1), note="one file cut at byte 400"),
    _case("length beyond the data", _bad_length, series_=(failed("missing_slices"),),
          **_refused(0xC000, 1, SLICES - 1), note="StudyDescription's length 0xFFF0 runs past the end"),
    _case("zero-length file", _zero_length, series_=(SEG,), note="an empty file beside the series",
          dimse={0x0000: SLICES, NOT_SENT: 1}, stow=(202, {0xC000: 1})),
    _case("unknown transfer syntax", unknown_syntax, series_=(), dimse={NOT_SENT: SLICES},
          stow=(409, {0xC122: SLICES}), note="private TS UID: no presentation context; STOW-RS refuses it"),
    _case("empty UIDs (file meta only)", each(_uids(SOPClassUID="", SOPInstanceUID="", SeriesInstanceUID="",
                                                     StudyInstanceUID="")), series_=(), **_refused(0xC010),
          note="the sender announces the file meta's UIDs; the data set's are empty (volume loader: missing_uid)"),
    _case("empty SOP Class UID", each(_uids(SOPClassUID="")), series_=(), **_refused(0xC010)),
    _case("non-ASCII UIDs", each(_uids(SeriesInstanceUID="1.2.826.0.1.ä.7")), series_=(), **_refused(0xC010)),
    _case("path-traversal UIDs", each(_uids(SeriesInstanceUID="../../../etc/passwd")), series_=(),
          **_refused(0xC010)),
    _case("UID longer than 64", each(_uids(StudyInstanceUID="1." + "2" * 70)), series_=(), **_refused(0xC010)),
    # stored, never routed
    _case("SR", _sr, n=1, series_=(NOT_ROUTED,)),
    _case("presentation state", _pr, n=1, series_=(NOT_ROUTED,)),
    _case("key object selection", _ko, n=1, series_=(NOT_ROUTED,)),
    _case("RTSTRUCT", _rtstruct, n=1, series_=(NOT_ROUTED,)),
    _case("encapsulated PDF", _pdf, n=1, series_=(NOT_ROUTED,)),
    _case("SEG from another system", _seg_object, n=1, series_=(NOT_ROUTED,)),
    _case("CT SOP class, Modality SEG", each(_seg_modality_on_ct), series_=(NOT_ROUTED,)),
    _case("derived image", each(_derived), series_=(NOT_ROUTED,), note="ImageType DERIVED: no rule selects it"),
)


def build(case: Case) -> list[bytes]:
    """The files of ``case`` (fresh UIDs each time)."""
    return case.build()


_GENERATED_UID = re.compile(rb"1\.2\.826\.0\.1\.3680043\.8\.498\.[1-9][0-9]{9,}")


def renew_uids(files: list[bytes]) -> list[bytes] | None:
    """The same files with every generated UID (study, series, instance, frame of reference) replaced by a
    fresh one of the same length, consistently across the files: a second copy of a case without building
    it again. None when a file hides its UIDs (a deflated data set): build it again then."""
    if any(DeflatedExplicitVRLittleEndian.encode() in data[:512] for data in files):
        return None
    mapping: dict[bytes, bytes] = {}

    def fresh(match: re.Match[bytes]) -> bytes:
        uid = match.group(0)
        if uid not in mapping:
            prefix = b"1.2.826.0.1.3680043.8.498."
            digits = len(uid) - len(prefix)
            mapping[uid] = prefix + str(random.randrange(10 ** (digits - 1), 10 ** digits)).encode()
        return mapping[uid]

    return [_GENERATED_UID.sub(fresh, data) for data in files]


def outcome_text(case: Case) -> tuple[str, str, str]:
    """(C-STORE, STOW-RS, series) outcomes in words, for the table."""
    def statuses(counts: dict[int, int]) -> str:
        return ", ".join(("not sent" if s == NOT_SENT else f"0x{s:04X}") + f" x{n}" for s, n in counts.items())

    code, reasons = case.stow
    stow = f"{code}" + (f" ({statuses(reasons)})" if reasons else "")
    result = "; ".join(case.series) or "nothing stored"
    if case.series_dimse is not None and case.series_dimse != case.series:
        result = f"C-STORE: {'; '.join(case.series_dimse) or 'nothing stored'}; STOW-RS: {result}"
    return statuses(case.dimse), stow, result


def table() -> str:
    """The Markdown table of ``docs/corpus.md``."""
    lines = ["| # | kind | C-STORE statuses | STOW-RS | series outcome | note |", "|---|---|---|---|---|---|"]
    for n, case in enumerate(CASES, 1):
        dimse, stow, result = outcome_text(case)
        lines.append(f"| {n} | {case.kind} | {dimse} | {stow} | {result} | {case.note} |")
    return "\n".join(lines) + "\n"
