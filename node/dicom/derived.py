"""What every DICOM object the node derives from a series shares, besides the SEG's own writer.

RTSTRUCT, the measurements SR, the review sheet (Encapsulated PDF) and the meshes (Encapsulated STL)
each start from :func:`derived_header`: the source's patient and study (:mod:`node.dicom.modules`), the
node's equipment, a new series in the source's frame of reference, and SOP Common. Their UIDs come
from :func:`derived_uid`: with a seed (the job id; :func:`node.jobs.worker.seg_uids` derives the SEG's
with it too) every run of a job writes the same instances, so the outbox never delivers one twice.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.dicom.modules import node_equipment, patient_study
from node.volume import SeriesIdentity

#: Added to ``1000 + source SeriesNumber`` (the SEG's series number) for each kind of output, so
#: that the node's series of one source sort together and apart in a viewer's series list.
SERIES_OFFSET = {"rtstruct": 100, "sr": 200, "review": 300, "dicom_mesh": 400}


def derived_uid(seed: str | None, *parts: str) -> str:
    """A UID derived from ``seed`` and ``parts`` (the same every time), or a fresh one without a seed."""
    if not seed:
        return generate_uid()
    return generate_uid(entropy_srcs=["segnode derived", *parts, seed])


def source_header(headers: list[Dataset] | None, source_path: Path | None) -> Dataset:
    """One header of the source series: the first kept by the load stage, else the first file read."""
    if headers:
        return headers[0]
    if source_path is None:
        raise ValueError("no DICOM source")
    from node.dicom.series import read_datasets

    datasets, _ = read_datasets(Path(source_path))
    if not datasets:
        raise ValueError(f"no DICOM file in {source_path}")
    return datasets[0][1]


def derived_header(source: Dataset, identity: SeriesIdentity, *, kind: str, sop_class_uid: str,
                   modality: str, series_uid: str, sop_uid: str, series_description: str,
                   series_number: int | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
                   ) -> Dataset:
    """Patient, General Study, series, General Equipment and SOP Common attributes of a new object
    derived from ``source`` (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.7.5.1, C.12.1), with its file meta."""
    now = datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet") or "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.update(patient_study(source))
    ds.StudyInstanceUID = identity.study_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number if series_number is not None else default_series_number(kind, identity)
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.SeriesDate, ds.SeriesTime
    ds.update(node_equipment())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def default_series_number(kind: str, identity: SeriesIdentity) -> int:
    base = identity.series_number if identity.series_number and identity.series_number > 0 else 0
    return 1000 + SERIES_OFFSET.get(kind, 900) + base


def write(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` to ``path`` as a DICOM file, atomically (temp file, rename)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    os.replace(tmp, path)
    return path


def encapsulate_document(ds: Dataset, data: bytes, mime_type: str, title: str) -> Dataset:
    """The Encapsulated Document module (PS3.3 C.24.2) on ``ds``: ``data`` as it is (an odd length
    padded, EncapsulatedDocumentLength giving the unpadded one), its MIME type and title."""
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = mime_type
    ds.EncapsulatedDocumentLength = len(data)
    ds.EncapsulatedDocument = data + (b"\0" if len(data) % 2 else b"")
    return ds
