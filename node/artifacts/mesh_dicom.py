"""Meshes as DICOM: each structure's STL in an Encapsulated 3D Manufacturing Model instance (PS3.3
A.85.x, SOP Class 1.2.840.10008.5.1.4.1.1.104.3; the header from :mod:`node.dicom.derived`), one
series per run in the CT's study and frame of reference, so that 3D-printing and surgical-planning users retrieve the meshes from the archive
(Orthanc's STL plugin stores them the same way).

The meshes are :mod:`node.artifacts.mesh`'s (exact voxel surface, Taubin smoothing, volume restored,
checked watertight), written in the DICOM patient coordinate system (LPS, mm) whatever the ``meshes``
output's space: ``dicom_mesh/<name>.stl`` beside ``dicom_mesh/<name>.dcm``, which holds it byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.dicom.derived import derived_header, derived_uid, encapsulate_document, source_header, write
from node.volume import SeriesIdentity

if TYPE_CHECKING:
    from node.stages import PipelineContext

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.104.3"
FOLDER = "dicom_mesh"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def stl_instance(stl: bytes, name: str, source: Dataset, identity: SeriesIdentity, *, series_uid: str,
                 sop_uid: str, number: int, series_number: int | None = None) -> Dataset:
    """The Encapsulated STL instance of one structure's mesh (``stl``: the file's bytes, LPS mm)."""
    ds = derived_header(source, identity, kind="dicom_mesh", sop_class_uid=SOP_CLASS_UID, modality="M3D",
                        series_uid=series_uid, sop_uid=sop_uid, series_number=series_number,
                        series_description=f"segnode meshes {identity.series_description}".strip())
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid  # the CT's: the mesh is in its space
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator") or ""
    encapsulate_document(ds, stl, "model/stl", name)
    ds.InstanceNumber = number
    ds.MeasurementUnitsCodeSequence = Sequence([_code("mm", "UCUM", "mm")])
    ds.ContentDescription = name[:64]
    reference = Dataset()  # the CT the mesh was made from: its first slice (Source Instance Sequence)
    reference.ReferencedSOPClassUID = identity.sop_class_uid
    reference.ReferencedSOPInstanceUID = identity.instance_uids[0]
    ds.SourceInstanceSequence = Sequence([reference])
    series = Dataset()  # ... and its series, in the Common Instance Reference module (C.12.2)
    series.SeriesInstanceUID = identity.series_uid
    series.ReferencedInstanceSequence = Sequence([reference])
    ds.ReferencedSeriesSequence = Sequence([series])
    return ds


def dicom_mesh_output(ctx: PipelineContext) -> None:
    """Output stage ``dicom_mesh``: ``dicom_mesh/<name>.stl`` (LPS mm) and ``dicom_mesh/<name>.dcm``
    for every structure, each announced as soon as written. Options: :class:`MeshOptions`' smoothing
    and decimation (space, units and format are fixed: LPS, mm, STL) and ``uid_seed``."""
    from node.artifacts.mesh import MeshOptions, export_meshes
    from node.stages import StageSkipped

    source = ctx.ct.source
    if (ctx.source_path is None and not ctx.source_headers) or source is None or not source.instance_uids:
        raise StageSkipped("the input has no DICOM source (NIfTI or in-memory input): no DICOM meshes")
    if not ctx.labels.classes or not ctx.labels.array.any():
        raise StageSkipped("no structure was found: no DICOM meshes")
    values: dict[str, Any] = dict(ctx.options)
    seed = values.pop("uid_seed", None)
    series_number = values.pop("series_number", None)
    values.update(space="LPS", units="mm", export_format="stl", write_empty=False)
    options = MeshOptions.from_dict(values)
    outdir = ctx.outdir / FOLDER
    if outdir.is_dir():
        for old in outdir.iterdir():
            if old.is_file():
                old.unlink()
    index = export_meshes(ctx.labels, outdir, options)
    header = source_header(ctx.source_headers, ctx.source_path)
    series_uid = derived_uid(seed, "dicom_mesh series")
    written = 0
    for n, entry in enumerate((e for e in index["meshes"] if not e["empty"]), start=1):
        stl = outdir / entry["file"]
        ds = stl_instance(stl.read_bytes(), entry["name"], header, source, series_uid=series_uid,
                          sop_uid=derived_uid(seed, "dicom_mesh instance", str(entry["id"])), number=n,
                          series_number=series_number)
        path = write(ds, stl.with_suffix(".dcm"))
        ctx.add_output(f"{FOLDER}/{path.name}", path)
        written += 1
    ctx.record(instances=written, watertight=sum(1 for e in index["meshes"] if e.get("watertight")),
               series_instance_uid=series_uid)


def extracted_stl(path: Path | str) -> bytes:
    """The STL an Encapsulated 3D Manufacturing Model instance holds, without the padding."""
    import pydicom

    ds = pydicom.dcmread(path)
    data = bytes(ds.EncapsulatedDocument)
    return data[: int(ds.get("EncapsulatedDocumentLength") or len(data))]
