"""XNAT-style case folders for tests and benchmarks, built from the phantom (or any Volume).

``SCANS/<n>/DICOM/*.dcm`` + ``scan_<n>_catalog.xml``, and ``ASSESSORS/<SEG_...>/SEG/<SEG_...>.dcm`` +
``SEG_catalog.xml``, where the SEG is written the way XNAT's OHIF viewer stores one: BINARY, every
segment's frames stacked one segment after the other (e.g. 4 pancreas frames then 5 stomach
frames = 9 frames), only non-empty frames, each frame naming its segment by
ReferencedSegmentNumber in the per-frame functional groups. ``reassign_uids=True`` makes the
per-frame source references point to UIDs that are in no series (XNAT re-assigned the series'
UIDs after the SEG was drawn), so frames can only be placed by ImagePositionPatient.

The SEG is built with pydicom on purpose (not with the node's writer): it is the foreign object
the reader has to cope with.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from node.dicom.writer import SeriesInfo, series_datasets
from node.volume import Volume
from node.xnat.catalog import scan_catalog_xml, seg_catalog_xml

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
DCMQI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcmqi"


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


@dataclass
class ScanFixture:
    """A series written under ``SCANS/<folder>/DICOM``."""

    folder: str
    path: Path
    volume: Volume
    datasets: list[Dataset]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


@dataclass
class SegObject:
    """One segment of an XNAT SEG: its label, its mask on the scan's grid ([k, j, i]) and colour."""

    label: str
    mask: np.ndarray
    rgb: tuple[int, int, int] = (200, 120, 80)


@dataclass
class SegFixture:
    folder: str
    path: Path
    name: str
    objects: list[SegObject]
    frames: int


def write_scan(case_dir: Path, folder: str, volume: Volume, info: SeriesInfo, *, catalog: bool = True,
               datasets: list[Dataset] | None = None) -> ScanFixture:
    """Write ``volume`` as ``SCANS/<folder>/DICOM/<folder>-NNNN.dcm`` with its ``scan_<folder>_catalog.xml``."""
    out = Path(case_dir) / "SCANS" / folder / "DICOM"
    out.mkdir(parents=True, exist_ok=True)
    datasets = datasets if datasets is not None else series_datasets(volume, info)
    names = []
    for k, ds in enumerate(datasets):
        name = f"{folder}-{k + 1:04d}.dcm"
        ds.save_as(out / name, enforce_file_format=True)
        names.append((name, str(ds.SOPInstanceUID)))
    if catalog:
        (out / f"scan_{folder}_catalog.xml").write_text(scan_catalog_xml(str(datasets[0].SeriesInstanceUID), names))
    return ScanFixture(folder=folder, path=out, volume=volume, datasets=datasets)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _lab(rgb: tuple[int, int, int]) -> list[int]:
    from highdicom.color import CIELabColor

    return list(CIELabColor.from_rgb(*rgb).value)


def xnat_seg_dataset(
    scan: ScanFixture,
    objects: list[SegObject],
    *,
    name: str,
    seed: str,
    reassign_uids: bool = True,
    referenced_series_uid: str | None = None,
    shift_mm: float = 0.0,
    descending: bool = True,
    author: str = "sdamirsa",
) -> Dataset:
    """A stacked, sparse, multi-segment BINARY SEG over ``scan`` as XNAT stores it.

    ``shift_mm`` moves every frame along the slice normal (frames that then match no slice);
    ``descending`` writes each segment's frames from the last slice to the first.
    """
    source = scan.datasets[0]
    geo = scan.volume.geometry
    k_count, rows, cols = scan.volume.array.shape
    ref_uids = [_uid(seed, "xnat-reassigned", k) if reassign_uids else str(scan.datasets[k].SOPInstanceUID)
                for k in range(k_count)]
    sop_class = str(source.SOPClassUID)
    when = dt.datetime(2024, 1, 18, 23, 52, 51)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEG_STORAGE
    meta.MediaStorageSOPInstanceUID = _uid(seed, "seg-instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SEG_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.PositionReferenceIndicator = ""
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = _uid(seed, "seg-series")
    ds.SeriesNumber = 300
    ds.InstanceNumber = 1
    ds.SeriesDescription = name
    ds.ContentLabel = "SEGMENTATION"
    ds.ContentDescription = name
    ds.ContentCreatorName = author
    ds.ContentDate = ds.SeriesDate = when.strftime("%Y%m%d")
    ds.ContentTime = ds.SeriesTime = when.strftime("%H%M%S")
    ds.Manufacturer = "OHIF (test fixture)"
    ds.ManufacturerModelName = "xnat-ohif"
    ds.DeviceSerialNumber = "1"
    ds.SoftwareVersions = "3"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.LossyImageCompression = "00"
    ds.SegmentationType = "BINARY"

    segments = []
    for number, obj in enumerate(objects, 1):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = obj.label
        item.SegmentAlgorithmType = "MANUAL"
        item.SegmentedPropertyCategoryCodeSequence = Sequence([_code("123037004", "SCT", "Anatomical Structure")])
        item.SegmentedPropertyTypeCodeSequence = Sequence([_code("91723000", "SCT", "Anatomical structure")])
        item.RecommendedDisplayCIELabValue = _lab(obj.rgb)
        segments.append(item)
    ds.SegmentSequence = Sequence(segments)

    dim_uid = _uid(seed, "dimension-organization")
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    index_items = []
    for pointer, group in ((0x0062000B, 0x0062000A), (0x00200032, 0x00209113)):
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        index_items.append(item)
    ds.DimensionIndexSequence = Sequence(index_items)

    shared = Dataset()
    orientation = Dataset()
    d = geo.direction_matrix
    orientation.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
    shared.PlaneOrientationSequence = Sequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [f"{geo.spacing[1]:.6g}", f"{geo.spacing[0]:.6g}"]
    measures.SliceThickness = f"{geo.spacing[2]:.6g}"
    measures.SpacingBetweenSlices = f"{geo.spacing[2]:.6g}"
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames, per_frame = [], []
    normal = geo.slice_normal
    for number, obj in enumerate(objects, 1):
        if obj.mask.shape != scan.volume.array.shape:
            raise ValueError(f"{obj.label}: mask {obj.mask.shape} is not on the scan's grid")
        ks = [k for k in range(k_count) if obj.mask[k].any()]
        for k in (ks[::-1] if descending else ks):
            frames.append(obj.mask[k].astype(bool))
            item = Dataset()
            src = Dataset()
            src.ReferencedSOPClassUID = sop_class
            src.ReferencedSOPInstanceUID = ref_uids[k]
            src.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "DCM", "Source image for image processing operation")])
            derivation = Dataset()
            derivation.SourceImageSequence = Sequence([src])
            derivation.DerivationCodeSequence = Sequence([_code("113076", "DCM", "Segmentation")])
            item.DerivationImageSequence = Sequence([derivation])
            content = Dataset()
            content.DimensionIndexValues = [number, k + 1]
            item.FrameContentSequence = Sequence([content])
            position = Dataset()
            ipp = geo.slice_origin(k) + shift_mm * normal
            position.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
            item.PlanePositionSequence = Sequence([position])
            ident = Dataset()
            ident.ReferencedSegmentNumber = number
            item.SegmentIdentificationSequence = Sequence([ident])
            per_frame.append(item)
    ds.NumberOfFrames = len(frames)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)

    referenced = Dataset()
    referenced.SeriesInstanceUID = referenced_series_uid or str(source.SeriesInstanceUID)
    instances = []
    for uid in dict.fromkeys(ref_uids):
        inst = Dataset()
        inst.ReferencedSOPClassUID = sop_class
        inst.ReferencedSOPInstanceUID = uid
        instances.append(inst)
    referenced.ReferencedInstanceSequence = Sequence(instances)
    ds.ReferencedSeriesSequence = Sequence([referenced])

    bits = np.packbits(np.stack(frames).reshape(-1), bitorder="little") if frames else np.zeros(0, np.uint8)
    data = bits.tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    return ds


def write_assessor(case_dir: Path, folder: str, ds: Dataset, *, author: str = "sdamirsa",
                   created: str = "2024-01-18T23:52:51.346-05:00", catalog: bool = True,
                   file_name: str | None = None) -> Path:
    """``ASSESSORS/<folder>/SEG/<folder>.dcm`` + ``SEG_catalog.xml``; returns the SEG file's path."""
    out = Path(case_dir) / "ASSESSORS" / folder / "SEG"
    out.mkdir(parents=True, exist_ok=True)
    name = file_name or f"{folder}.dcm"
    ds.save_as(out / name, enforce_file_format=True)
    if catalog:
        (out / "SEG_catalog.xml").write_text(seg_catalog_xml(name, author, created))
    return out / name


def write_seg(case_dir: Path, folder: str, scan: ScanFixture, objects: list[SegObject], *, name: str,
              author: str = "sdamirsa", created: str = "2024-01-18T23:52:51.346-05:00",
              catalog: bool = True, **kwargs: object) -> SegFixture:
    ds = xnat_seg_dataset(scan, objects, name=name, seed=f"{case_dir}/{folder}", author=author, **kwargs)
    path = write_assessor(case_dir, folder, ds, author=author, created=created, catalog=catalog)
    return SegFixture(folder=folder, path=path, name=name, objects=objects, frames=int(ds.NumberOfFrames))


# --- the phantom cases -----------------------------------------------------------------------


@dataclass
class CaseFixture:
    """A case folder and what is in it, with the ground truth of every object."""

    path: Path
    scans: dict[str, ScanFixture] = field(default_factory=dict)
    segs: dict[str, SegFixture] = field(default_factory=dict)
    #: Ground truth by object name (:func:`phantom_objects`), [k, j, i] on ``scans["2"]``'s grid.
    truth: dict[str, np.ndarray] = field(default_factory=dict)


#: Assessor folders of the phantom case, by role.
VERIFIED = "SEG_20240118_235251_213_S2"  # pancreas, mass, stomach; re-assigned UIDs: by position
INITIAL = "SEG_20241020_130224_332_S2"  # liver, spleen; UIDs resolve: by SOP instance
SHIFTED = "SEG_20241021_181708_943_S2"  # frames half a slice off: match no slice
ORPHAN = "SEG_20241024_192540_108_S9"  # references a series that is not in SCANS
NO_CATALOG = "SEG_20241025_101010_000_S2"  # no SEG_catalog.xml; exports all the same
RTSTRUCT = "RoiCollection_20241026_S2"  # not a SEG


def phantom_objects(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Objects drawn on the phantom's labels: a mass carved out of the pancreas (no overlap, as XNAT
    stores them), so pancreas + mass is exactly the phantom's pancreas."""
    pancreas = labels == 7
    k, j, i = np.nonzero(pancreas)
    centre = np.array([np.median(k), np.median(j), np.median(i)])
    kk, jj, ii = np.indices(labels.shape)
    ball = (kk - centre[0]) ** 2 + ((jj - centre[1]) / 1.5) ** 2 + ((ii - centre[2]) / 1.5) ** 2 <= 2.0
    mass = pancreas & ball
    return {
        "pancreas": pancreas & ~mass, "mass": mass, "pancreas_total": pancreas,
        "stomach": labels == 6, "liver": np.isin(labels, (5, 201, 202)), "spleen": labels == 1,
    }


def build_phantom_case(root: Path, case: str = "2072", seed: int = 0) -> CaseFixture:
    """The phantom (TINY) as XNAT exports it, with good and bad assessors (see the folder constants)."""
    from node.phantom import TINY, PhantomSpec, make_phantom

    phantom = make_phantom(PhantomSpec(size=TINY.size, spacing=TINY.spacing, seed=seed))
    case_dir = Path(root) / case
    fixture = CaseFixture(path=case_dir)
    uid_seed = f"xnat-{case}-{seed}"
    scan = write_scan(case_dir, "2", phantom.ct, SeriesInfo(uid_seed=uid_seed, series_number=2,
                                                           series_description="Abdomen portal venous"))
    fixture.scans["2"] = scan
    # A second series whose two ends disagree on the description (records a disagreement).
    arterial = series_datasets(phantom.ct, SeriesInfo(uid_seed=uid_seed, series_number=3,
                                                      series_description="Abdomen arterial"))
    arterial[-1].SeriesDescription = "Abdomen arterial (edited)"
    fixture.scans["3"] = write_scan(case_dir, "3", phantom.ct, SeriesInfo(), datasets=arterial)
    # A series folder without any DICOM file.
    (case_dir / "SCANS" / "4" / "DICOM").mkdir(parents=True)
    (case_dir / "SCANS" / "4" / "DICOM" / "README.txt").write_text("not DICOM\n")

    obj = fixture.truth = phantom_objects(phantom.labels.array)
    fixture.segs[VERIFIED] = write_seg(
        case_dir, VERIFIED, scan,
        [SegObject("pancreas", obj["pancreas"], (249, 180, 111)), SegObject("mass", obj["mass"], (200, 0, 0)),
         SegObject("stomach", obj["stomach"], (216, 132, 105))],
        name="verified", reassign_uids=True)
    fixture.segs[INITIAL] = write_seg(
        case_dir, INITIAL, scan,
        [SegObject("liver", obj["liver"], (221, 130, 101)), SegObject("spleen", obj["spleen"], (157, 108, 162))],
        name="initialAAA", author="radiologist2", created="2024-10-20T13:02:24.332+02:00", reassign_uids=False,
        descending=False)
    fixture.segs[SHIFTED] = write_seg(
        case_dir, SHIFTED, scan, [SegObject("stomach", obj["stomach"])], name="shifted",
        shift_mm=scan.volume.geometry.spacing[2] / 2)
    fixture.segs[ORPHAN] = write_seg(
        case_dir, ORPHAN, scan, [SegObject("spleen", obj["spleen"])], name="orphan",
        referenced_series_uid=_uid("a series that is not in SCANS"))
    fixture.segs[NO_CATALOG] = write_seg(
        case_dir, NO_CATALOG, scan, [SegObject("spleen", obj["spleen"])], name="nocatalog", catalog=False)
    rt = Dataset()
    rt.file_meta = FileMetaDataset()
    rt.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rt.file_meta.MediaStorageSOPClassUID = rt.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rt.file_meta.MediaStorageSOPInstanceUID = rt.SOPInstanceUID = _uid(case, "rtstruct")
    rt.Modality = "RTSTRUCT"
    out = case_dir / "ASSESSORS" / RTSTRUCT / "RTSTRUCT"
    out.mkdir(parents=True)
    rt.save_as(out / "rtstruct.dcm", enforce_file_format=True)
    return fixture


def build_dcmqi_case(root: Path, case: str = "dcmqi") -> Path:
    """dcmqi's real liver SEG on its real 3-slice CT, copied into an XNAT-like layout."""
    case_dir = Path(root) / case
    scans = case_dir / "SCANS" / "2" / "DICOM"
    scans.mkdir(parents=True)
    import pydicom

    names = []
    for src in sorted((DCMQI / "ct-3slice").iterdir()):
        shutil.copyfile(src, scans / src.name)
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        names.append((src.name, str(ds.SOPInstanceUID)))
        series_uid = str(ds.SeriesInstanceUID)
    (scans / "scan_2_catalog.xml").write_text(scan_catalog_xml(series_uid, names))
    seg_dir = case_dir / "ASSESSORS" / "SEG_20160318_174852_000_S2" / "SEG"
    seg_dir.mkdir(parents=True)
    shutil.copyfile(DCMQI / "liver.dcm", seg_dir / "liver.dcm")
    (seg_dir / "SEG_catalog.xml").write_text(seg_catalog_xml("liver.dcm", "dcmqi", "2016-03-18T17:48:52.000-04:00"))
    for p in case_dir.rglob("*"):  # the copies of read-only sample files must stay removable
        p.chmod(0o755 if p.is_dir() else 0o644)
    return case_dir
