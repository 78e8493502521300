"""The measurements SR: a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom.sr).

One Volumetric ROI measurement group (TID 1411) per structure, each citing its segment in the run's
DICOM-SEG (the SEG's SOP Instance UID and segment number, TID 1411 "Referenced Segment"):

* Volume (SCT 118565006) in mL: voxels x voxel volume, the figure of ``stats.csv``;
* Attenuation Coefficient (DCM 112031) in HU, derivation Mean (SCT 373098007) and Standard Deviation
  (SCT 386136009), over the structure's voxels;
* Finding type and category: the segment's SNOMED property type and category.

The portal/hepatic split's QC (``liver_vessels`` stage) is one more group (TID 1501, image-level
measurements): voxel counts and fractions as numeric measurements, and whether the split ran as a
qualitative evaluation. This is the form Imaging Data Commons uses for derived data (SEG + TID 1500).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node import __version__
from node.dicom.codes import segment_codes
from node.dicom.derived import default_series_number, derived_uid
from node.errors import NodeError, options_from_mapping

if TYPE_CHECKING:
    from node.stages import PipelineContext

SR_FILE = "sr.dcm"
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
#: The split's QC figures that go into the SR (numbers from ``qc.liver_vessels.portal_hepatic_split_qc``).
SPLIT_FIGURES = {
    "portal_voxels": ("voxels", "{voxels}"), "hepatic_voxels": ("voxels", "{voxels}"),
    "unassigned_voxels": ("voxels", "{voxels}"), "total_vessel_voxels": ("voxels", "{voxels}"),
    "portal_fraction": ("fraction", "1"), "hepatic_fraction": ("fraction", "1"),
    "unassigned_fraction": ("fraction", "1"),
}


class SrError(NodeError):
    """A measurements SR that cannot be written (bad option, no SEG to cite)."""


@dataclass(frozen=True)
class SrOptions:
    series_uid: str | None = None
    sop_uid: str | None = None
    uid_seed: str | None = None
    series_number: int | None = None
    series_description: str | None = None

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> SrOptions:
        return options_from_mapping(cls, values, SrError, "SR")


def _code(code: Any) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _code_ds(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def _item(relationship: str, value_type: str, name: tuple[str, str, str], **values: Any) -> Dataset:
    """One SR content item (PS3.3 C.17.3) as highdicom's value types write it."""
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = [_code_ds(*name)]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _algorithm(name: str, version: str) -> list[Dataset]:
    """TID 4019 Algorithm Identification."""
    return [_item("HAS CONCEPT MOD", "TEXT", ("111001", "DCM", "Algorithm Name"), TextValue=name),
            _item("HAS CONCEPT MOD", "TEXT", ("111003", "DCM", "Algorithm Version"), TextValue=version)]


def _num(name: tuple[str, str, str], value: float, unit: tuple[str, str, str], extra: list[Dataset]) -> Dataset:
    from pydicom.valuerep import DS

    measured = Dataset()
    measured.MeasurementUnitsCodeSequence = [_code_ds(*unit)]
    measured.NumericValue = DS(value, auto_format=True)
    measured.FloatingPointValue = float(value)
    return _item("CONTAINS", "NUM", name, MeasuredValueSequence=[measured], ContentSequence=extra)


def volumetric_group(row: dict[str, Any], number: int, codes_of: Any, seg: Dataset, tracking_uid: str,
                     algorithm: tuple[str, str]) -> Dataset:
    """One TID 1411 Volumetric ROI measurement group, item for item what highdicom's
    ``VolumetricROIMeasurementsAndQualitativeEvaluations`` writes for it (a test compares the two),
    built as plain pydicom datasets: highdicom's own classes take ~20 ms a group to build and as long
    again to write, 5 s for 117 structures."""
    def code(c: Any) -> Dataset:
        return _code_ds(c.value, c.scheme, c.meaning)

    items = [
        _item("HAS OBS CONTEXT", "TEXT", ("112039", "DCM", "Tracking Identifier"), TextValue=row["name"][:64]),
        _item("HAS OBS CONTEXT", "UIDREF", ("112040", "DCM", "Tracking Unique Identifier"), UID=tracking_uid),
        _item("CONTAINS", "CODE", ("276214006", "SCT", "Finding category"), ConceptCodeSequence=[code(codes_of.category)]),
        _item("CONTAINS", "CODE", ("121071", "DCM", "Finding"), ConceptCodeSequence=[code(codes_of.type)]),
        *_algorithm(*algorithm),
        _num(("118565006", "SCT", "Volume"), float(row["volume_ml"]), ("mL", "UCUM", "milliliter"),
             _algorithm(*algorithm)),
    ]
    if row["mean_hu"] is not None:
        for value, derivation in ((row["mean_hu"], ("373098007", "SCT", "Mean")),
                                  (row["std_hu"], ("386136009", "SCT", "Standard Deviation"))):
            modifier = _item("HAS CONCEPT MOD", "CODE", ("121401", "DCM", "Derivation"),
                             ConceptCodeSequence=[_code_ds(*derivation)])
            items.append(_num(("112031", "DCM", "Attenuation Coefficient"), float(value),
                              ("[hnsf'U]", "UCUM", "Hounsfield unit"), [modifier, *_algorithm(*algorithm)]))
    cited = Dataset()
    cited.ReferencedSOPClassUID, cited.ReferencedSOPInstanceUID = seg.SOPClassUID, seg.SOPInstanceUID
    cited.ReferencedSegmentNumber = number
    items.append(_item("CONTAINS", "IMAGE", ("121191", "DCM", "Referenced Segment"), ReferencedSOPSequence=[cited]))
    items.append(_item("CONTAINS", "UIDREF", ("121232", "DCM", "Source Series for Segmentation"),
                       UID=str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)))
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "1411"
    return _item("CONTAINS", "CONTAINER", ("125007", "DCM", "Measurement Group"),
                 ContinuityOfContent="CONTINUOUS", ContentTemplateSequence=[template], ContentSequence=items)


def build_sr(seg: Dataset, structures: list[dict[str, Any]], *, segment_numbers: dict[int, int],
             classes: dict[int, Any], split_qc: dict[str, Any] | None = None,
             options: SrOptions = SrOptions(), algorithm: str = "segnode") -> Any:
    """The SR of ``structures`` (:func:`node.stats.structure_stats` rows), citing ``seg`` (its header
    suffices) and its segment numbers by label id."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(options.uid_seed, "sr device"), name="segnode", manufacturer_name="segnode",
            model_name=algorithm[:64]),
    )
    context = hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer)
    algorithm_id = hd.sr.AlgorithmIdentification(name="segnode", version=__version__)
    source_series = hd.sr.SourceSeriesForSegmentation(str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))
    groups: list[Any] = []
    for row in structures:
        number = segment_numbers.get(row["id"])
        if number is None or not row["voxels"]:
            continue
        codes_of = segment_codes(classes[row["id"]])  # the SEG's segment codes
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=float(row["volume_ml"]),
                                          unit=codes.UCUM.Milliliter if hasattr(codes.UCUM, "Milliliter")
                                          else hd.sr.CodedConcept("mL", "UCUM", "milliliter"),
                                          algorithm_id=algorithm_id)]
        if row["mean_hu"] is not None:
            for value, derivation in ((row["mean_hu"], codes.SCT.Mean), (row["std_hu"], codes.SCT.StandardDeviation)):
                measurements.append(hd.sr.Measurement(
                    name=codes.DCM.AttenuationCoefficient, value=float(value), unit=codes.UCUM.HounsfieldUnit,
                    derivation=derivation, algorithm_id=algorithm_id))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(options.uid_seed, "sr tracking", str(row["id"])), identifier=row["name"][:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=number, source_series=source_series),
            finding_type=_code(codes_of.type), finding_category=_code(codes_of.category),
            algorithm_id=algorithm_id,
            measurements=measurements,
        ))
    if split_qc and "portal_voxels" in split_qc:
        figures = []
        for key, (what, unit) in SPLIT_FIGURES.items():
            if key in split_qc:
                figures.append(hd.sr.Measurement(
                    name=hd.sr.CodedConcept(key, "99SEGNODE", key.replace("_", " ")[:64]),
                    value=float(split_qc[key]), unit=hd.sr.CodedConcept(unit, "UCUM", what),
                    algorithm_id=algorithm_id))
        warned = bool(split_qc.get("warnings"))
        evaluation = hd.sr.QualitativeEvaluation(
            name=hd.sr.CodedConcept("split_qc", "99SEGNODE", "Portal/hepatic split QC"),
            value=hd.sr.CodedConcept(*(("warned", "99SEGNODE", "Warnings, see report") if warned
                                       else ("passed", "99SEGNODE", "No warning"))))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(options.uid_seed, "sr tracking split"), identifier="portal/hepatic split"),
            finding_type=hd.sr.CodedConcept("59820001", "SCT", "Blood vessel"),
            algorithm_id=algorithm_id, measurements=figures, qualitative_evaluations=[evaluation]))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    return report


def write_sr(seg_path: Path, structures: list[dict[str, Any]], classes: dict[int, Any], out: Path, *,
             split_qc: dict[str, Any] | None = None, options: SrOptions = SrOptions(),
             algorithm: str = "segnode") -> Path:
    """``out``: the SR citing the SEG at ``seg_path`` (segment numbers read from it)."""
    import highdicom as hd

    from node.dicom.modules import patient_study

    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    numbers = _segment_numbers(seg)
    evidence = Dataset()  # the SEG's identity and its patient and study (what highdicom copies)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        setattr(evidence, keyword, seg.get(keyword))
    evidence.update(patient_study(seg))
    series_number = options.series_number
    if series_number is None:
        from node.volume import SeriesIdentity

        base = int(seg.get("SeriesNumber") or 0) % 1000
        series_number = default_series_number("sr", SeriesIdentity("", "", "", "", "", series_number=base))
    # highdicom builds the document around a report of the first structure (and the split QC): given
    # the full report it would deep-copy, re-parse and search all of it (~4 s for 117 groups) for the
    # instances it cites, the SEG alone, as for the one group; the structures' groups come after.
    cited = [r for r in structures if r["voxels"] and r["id"] in numbers]
    if not cited:
        raise SrError("no_segment", "no structure of the labels is a segment of the SEG")
    one = build_sr(seg, cited[:1], segment_numbers=numbers, classes=classes, split_qc=split_qc,
                   options=options, algorithm=algorithm)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence], content=one,
        series_instance_uid=options.series_uid or derived_uid(options.uid_seed, "sr series"),
        series_number=series_number,
        sop_instance_uid=options.sop_uid or derived_uid(options.uid_seed, "sr instance"),
        instance_number=1, manufacturer="segnode", is_complete=True, is_final=False,
        series_description=(options.series_description or "segnode measurements")[:64],
    )
    measurements = sr.ContentSequence[-1]  # Imaging Measurements: highdicom's first group, the split's
    groups = [volumetric_group(r, numbers[r["id"]], segment_codes(classes[r["id"]]), seg,
                               derived_uid(options.uid_seed, "sr tracking", str(r["id"])), ("segnode", __version__))
              for r in cited]
    sr.SoftwareVersions = __version__
    sr.ManufacturerModelName = "segnode"
    return _write_with_groups(sr, measurements, groups, out)


_DELIMITERS = b"\xfe\xff\xdd\xe0\0\0\0\0" + b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
_LONG_VRS = frozenset({"SQ", "UT", "OB", "OW", "UN", "UC", "UR", "OD", "OF", "OL", "OV"})


def _encode_element(tag: int, vr: str, value: Any) -> bytes:
    """One explicit VR little endian element of the VRs a measurement group uses."""
    if vr == "SQ":
        payload = b"".join(_encode_item(item) for item in value)
    elif vr == "FD":
        payload = struct.pack("<d", float(value))
    elif vr == "US":
        payload = struct.pack("<H", int(value))
    elif vr == "DS":  # as pydicom writes highdicom's auto-formatted values (16 characters at most)
        from pydicom.valuerep import format_number_as_ds

        payload = format_number_as_ds(float(value)).encode()
        payload += b" " if len(payload) % 2 else b""
    else:
        payload = str(value).encode("utf-8")
        if len(payload) % 2:
            payload += b"\0" if vr == "UI" else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", len(payload)) + payload
    return head + struct.pack("<H", len(payload)) + payload


def _encode_item(item: Dataset) -> bytes:
    body = b"".join(_encode_element(int(e.tag), e.VR, e.value) for e in item)
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body


def _write_with_groups(sr: Any, measurements: Any, groups: list[Dataset], out: Path) -> Path:
    """Write ``sr`` with ``groups`` as the first items of Imaging Measurements: pydicom writes the
    document (the root and Imaging Measurements content of undefined length, so they end the file with
    three delimiters) and the groups, encoded here, go in before those (pydicom took 1-2 s for them)."""
    import io
    import os

    from node.dicom.derived import write

    rest = list(measurements.ContentSequence)[1:]  # highdicom's split QC group, if any
    measurements.add(DataElement(0x0040A730, "SQ", Sequence(rest)))  # plain: highdicom would re-parse
    measurements[0x0040A730].is_undefined_length = True
    measurements.is_undefined_length_sequence_item = True
    sr[0x0040A730].is_undefined_length = True
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    data = buffer.getvalue()
    if not data.endswith(_DELIMITERS) or str(sr.file_meta.TransferSyntaxUID) != "1.2.840.10008.1.2.1":
        measurements.add(DataElement(0x0040A730, "SQ", Sequence(groups + rest)))  # the plain way
        return write(sr, out)
    encoded = b"".join(_encode_item(g) for g in groups)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_bytes(data[: -len(_DELIMITERS)] + encoded + data[-len(_DELIMITERS):])
    os.replace(tmp, out)
    return out


def _segment_numbers(seg: Dataset) -> dict[int, int]:
    """Label id -> segment number, by the SEG's private label id element (else the number itself)."""
    from node.dicom.seg_read import _label_id

    out = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        out[_label_id(item) or number] = number
    return out


def sr_output(ctx: PipelineContext) -> None:
    """Output stage ``sr``: ``sr.dcm``, the measurements of the final labels, citing the run's SEG.

    Needs the ``seg`` output in the same run (skipped, with that reason, without it)."""
    from node.stages import StageSkipped

    seg = ctx.artifacts.get("seg")
    if seg is None:
        raise StageSkipped("the measurements SR cites the DICOM-SEG: ask for the seg output too")
    options = SrOptions.from_mapping(ctx.options)
    split = (ctx.qc.get("liver_vessels") or {}).get("portal_hepatic_split_qc")
    engine = ctx.request.segment
    path = write_sr(Path(seg), ctx.structures(), ctx.labels.classes, ctx.outdir / SR_FILE,
                    split_qc=split if isinstance(split, dict) else None, options=options,
                    algorithm=f"segnode {engine.engine} {engine.task}")
    ctx.add_output("sr", path)
    ctx.record(groups=len(ctx.structures()) + (1 if split and "portal_voxels" in split else 0),
               bytes=path.stat().st_size)
