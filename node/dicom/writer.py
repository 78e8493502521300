"""Write a Volume as a single-frame DICOM image series (CT Image Storage or MR Image Storage).

Used for the phantom and for test series; real clinical series come from scanners.
Pixels are stored as unsigned 16-bit with RescaleIntercept so that readers exercise the
rescale to Hounsfield units (PS3.3 C.11.1.1.2), as most CT scanners do.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from node import __version__
from node.volume import Volume

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class SeriesInfo:
    """The identifying attributes written into every instance of a series."""

    #: Words that appear nowhere else: the log scrub removes each part of a patient name it has seen.
    patient_name: str = "Phantompatient^Nobody"
    patient_id: str = "SEGNODE-PHANTOM"
    accession_number: str = ""
    study_description: str = "segnode phantom"
    series_description: str = "Phantom CT portal venous"
    series_number: int = 1
    modality: str = "CT"
    body_part: str = "ABDOMEN"
    #: Seed for deterministic UIDs; None gives fresh random UIDs.
    uid_seed: str | None = None
    study_uid: str | None = None
    rescale_intercept: float = -1024.0


def _uid(seed: str | None, *parts: object) -> str:
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[seed, *map(str, parts)])


def series_datasets(volume: Volume, info: SeriesInfo = SeriesInfo()) -> list[Dataset]:
    """One dataset per slice of ``volume`` (values in HU or MR units), in k order."""
    if info.modality not in _SOP_CLASS:
        raise ValueError(f"modality must be CT or MR, got {info.modality!r}")
    geo = volume.geometry
    d = geo.direction_matrix
    orientation = [float(v) for v in (*d[:, 0], *d[:, 1])]
    slope = 1.0
    stored = np.rint(volume.array.astype(np.float64) - info.rescale_intercept)
    stored = np.clip(stored, 0, 65535).astype(np.uint16)
    sop_class = _SOP_CLASS[info.modality]
    study_uid = info.study_uid or _uid(info.uid_seed, "study")
    series_uid = _uid(info.uid_seed, "series", info.series_number)
    for_uid = _uid(info.uid_seed, "frame-of-reference")
    now = dt.datetime(2026, 1, 1, 12, 0, 0) if info.uid_seed is not None else dt.datetime.now()
    datasets = []
    for k in range(stored.shape[0]):
        sop_uid = _uid(info.uid_seed, "instance", info.series_number, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = info.accession_number
        ds.Modality = info.modality
        ds.Manufacturer = "segnode"
        ds.ManufacturerModelName = "phantom"
        ds.SoftwareVersions = __version__
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = info.study_description
        ds.SeriesDescription = info.series_description
        ds.PatientName = info.patient_name
        ds.PatientID = info.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = info.body_part
        ds.SliceThickness = f"{geo.spacing[2]:.6g}"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = info.series_number
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = stored.shape[0]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in geo.slice_origin(k)]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.SliceLocation = f"{float(np.dot(geo.slice_origin(k), geo.slice_normal)):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelSpacing = [f"{geo.spacing[1]:.6g}", f"{geo.spacing[0]:.6g}"]  # row spacing, column spacing
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if info.modality == "CT":
            ds.RescaleIntercept = f"{info.rescale_intercept:g}"
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_series(volume: Volume, out_dir: Path, info: SeriesInfo = SeriesInfo()) -> list[Path]:
    """Write ``volume`` as ``out_dir/IM00001.dcm ...``; returns the paths in k order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(series_datasets(volume, info)):
        path = out_dir / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
