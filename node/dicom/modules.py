"""The patient, study and equipment modules of every object the node derives from a series.

A derived object (SEG, RTSTRUCT, SR, encapsulated PDF) belongs to its source's patient and study, so it
carries the source's Patient module (PS3.3 C.7.1.1), General Study module (C.7.2.1) and, when present,
Patient Study (C.7.2.2) and Clinical Trial Subject/Study (C.7.1.3, C.7.2.3) attributes; and the node's
own General Equipment (C.7.5.1) / Enhanced General Equipment (C.7.5.2), since the node made it.

Type 2 attributes must be present, empty when unknown (PS3.5 7.4.3); anonymised and research series
often leave them out, so :func:`patient_study` writes them empty. A value its VR cannot hold (PatientSex
outside ``M``/``F``/``O``, a date or time that does not parse, an AccessionNumber longer than SH's 16
characters) is written empty for a Type 2 attribute and left out for a Type 3 one: the derived object must
be valid, and the source keeps the original.

One helper for every writer::

    target.update(patient_study(source))                       # the patient and study of the source
    target.update(node_equipment())                            # who made the object
    stand_in = with_patient_study(source)                      # a source highdicom can read (Type 2 there)
"""

from __future__ import annotations

import copy

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from node import __version__

#: Patient module (PS3.3 C.7.1.1), root level: (keyword, type).
PATIENT_MODULE: tuple[tuple[str, str], ...] = (
    ("PatientName", "2"), ("PatientID", "2"), ("IssuerOfPatientID", "3"), ("TypeOfPatientID", "3"),
    ("IssuerOfPatientIDQualifiersSequence", "3"), ("PatientBirthDate", "2"), ("PatientBirthTime", "3"),
    ("PatientSex", "2"), ("QualityControlSubject", "3"), ("OtherPatientNames", "3"),
    ("OtherPatientIDsSequence", "3"), ("EthnicGroup", "3"), ("EthnicGroupCodeSequence", "3"),
    ("PatientSpeciesDescription", "1C"), ("PatientSpeciesCodeSequence", "1C"),
    ("PatientBreedDescription", "2C"), ("PatientBreedCodeSequence", "2C"), ("BreedRegistrationSequence", "2C"),
    ("ResponsiblePerson", "2C"), ("ResponsiblePersonRole", "1C"), ("ResponsibleOrganization", "2C"),
    ("PatientComments", "3"), ("PatientIdentityRemoved", "3"), ("DeidentificationMethod", "1C"),
    ("DeidentificationMethodCodeSequence", "1C"),
)
#: General Study module (PS3.3 C.7.2.1), root level.
GENERAL_STUDY_MODULE: tuple[tuple[str, str], ...] = (
    ("StudyInstanceUID", "1"), ("StudyDate", "2"), ("StudyTime", "2"), ("ReferringPhysicianName", "2"),
    ("ReferringPhysicianIdentificationSequence", "3"), ("ConsultingPhysicianName", "3"), ("StudyID", "2"),
    ("AccessionNumber", "2"), ("IssuerOfAccessionNumberSequence", "3"), ("StudyDescription", "3"),
    ("PhysiciansOfRecord", "3"), ("NameOfPhysiciansReadingStudy", "3"), ("ProcedureCodeSequence", "3"),
    ("ReasonForPerformedProcedureCodeSequence", "3"), ("RequestingService", "3"),
)
#: Patient Study module (PS3.3 C.7.2.2), root level: all Type 3 or conditional.
PATIENT_STUDY_MODULE: tuple[tuple[str, str], ...] = (
    ("AdmittingDiagnosesDescription", "3"), ("PatientAge", "3"), ("PatientSize", "3"), ("PatientWeight", "3"),
    ("PatientBodyMassIndex", "3"), ("MedicalAlerts", "3"), ("Allergies", "3"), ("Occupation", "3"),
    ("SmokingStatus", "3"), ("AdditionalPatientHistory", "3"), ("PregnancyStatus", "3"),
    ("PatientSexNeutered", "2C"), ("AdmissionID", "3"),
)
#: Clinical Trial Subject (C.7.1.3) and Clinical Trial Study (C.7.2.3): copied as the source has them.
CLINICAL_TRIAL_MODULES: tuple[tuple[str, str], ...] = (
    ("ClinicalTrialSponsorName", "1"), ("ClinicalTrialProtocolID", "1"), ("ClinicalTrialProtocolName", "2"),
    ("ClinicalTrialSiteID", "2"), ("ClinicalTrialSiteName", "2"), ("ClinicalTrialSubjectID", "1C"),
    ("ClinicalTrialSubjectReadingID", "1C"), ("ClinicalTrialTimePointID", "2"),
    ("ClinicalTrialTimePointDescription", "3"),
)
#: Every attribute copied, in module order.
MODULE_KEYWORDS = tuple(k for k, _ in PATIENT_MODULE + GENERAL_STUDY_MODULE + PATIENT_STUDY_MODULE
                        + CLINICAL_TRIAL_MODULES)
#: Type 2 attributes every derived object carries, empty when the source has none.
TYPE2 = tuple(k for k, t in PATIENT_MODULE + GENERAL_STUDY_MODULE if t == "2")
#: The enumerated values of PatientSex (PS3.3 C.7.1.1).
PATIENT_SEX = frozenset({"M", "F", "O"})
#: The node's Manufacturer in every object it makes (the marker :mod:`node.rules` keeps off the router).
MANUFACTURER = "segnode"


def _valid(element: DataElement) -> bool:
    """Whether the element's value is one its VR can hold (length, characters, dates and times: pydicom's
    checks of PS3.5 6.2), and PatientSex one of its enumerated values."""
    value = element.value
    if value is None or element.VR == "SQ" or (isinstance(value, str) and value == ""):
        return True
    if element.keyword == "PatientSex" and str(value) not in PATIENT_SEX:
        return False
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        for v in values:  # pydicom checks numbers in text form (DS, IS) as strings
            validate_value(element.VR, str(v) if element.VR in ("DS", "IS") else v, config.RAISE)
    except (TypeError, ValueError):
        return False
    return True


def patient_study(source: Dataset) -> Dataset:
    """The patient and study modules of ``source``, as a derived object carries them.

    Every attribute of the modules above that ``source`` has is copied (sequences deep-copied); each Type 2
    one of the mandatory Patient and General Study modules it lacks, or holds in a form its VR cannot, is
    added empty (the optional modules are copied as the source has them). ``StudyInstanceUID`` (Type 1) is copied
    as it is: a source without one is refused before any writer runs (ingest, the volume loader).
    """
    out = Dataset()
    for keyword in MODULE_KEYWORDS:
        element = _as_dictionary_vr(source[keyword]) if keyword in source else None
        if element is not None and _valid(element):
            out.add(copy.deepcopy(element))
        elif keyword in TYPE2:  # the optional modules' Type 2 only when the module is there: copied
            setattr(out, keyword, "")
    return out


def _as_dictionary_vr(element: DataElement) -> DataElement:
    """The element with its data dictionary VR (a sender may have written PatientAge as LO, or UN)."""
    vr = dictionary_VR(element.tag)
    if element.VR == vr or element.VR == "SQ":
        return element
    value = element.value
    if isinstance(value, bytes):  # UN: not decoded
        value = value.decode("ascii", "replace").rstrip("\0 ")
    return DataElement(element.tag, vr, value)


def with_patient_study(source: Dataset) -> Dataset:
    """A shallow copy of ``source`` whose patient and study modules are :func:`patient_study`'s, and
    whose Image Plane module (PS3.3 C.7.6.2) has its Type 2 ``SliceThickness`` (empty when unknown).

    For libraries that read the source's Type 2 attributes as Python attributes (highdicom's SOP classes
    do: a source without ``PatientBirthDate`` or ``SliceThickness`` raises ``AttributeError``);
    ``source`` itself is unchanged.
    """
    stand_in = Dataset()
    for element in source:
        stand_in.add(element)
    if hasattr(source, "file_meta"):
        stand_in.file_meta = source.file_meta
    for keyword in MODULE_KEYWORDS:  # only the valid ones, as patient_study gives them
        if keyword in stand_in:
            del stand_in[keyword]
    for element in patient_study(source):
        stand_in.add(element)
    if "PixelSpacing" in source and "SliceThickness" not in source:  # a single-frame image plane
        stand_in.SliceThickness = None
    return stand_in


def node_equipment(model: str = "segnode", serial: str = "segnode") -> Dataset:
    """General Equipment (PS3.3 C.7.5.1) and Enhanced General Equipment (C.7.5.2) of the node itself."""
    out = Dataset()
    out.Manufacturer = MANUFACTURER
    out.ManufacturerModelName = model
    out.DeviceSerialNumber = serial
    out.SoftwareVersions = __version__
    return out
