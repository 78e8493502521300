"""Routing: which series get which pipeline, and where the results go.

A rules file (``configs/rules.toml``) is a list of ``[[rule]]`` tables, each with conditions
(``[rule.match]``), a pipeline (``[rule.pipeline]``) and destination names. **The first rule whose
conditions all hold wins.** Conditions read the first instance of the series (sorted by file name)
plus the instance count of its folder and who sent it. A tag that is missing or unreadable makes its
condition *not hold*, with the reason; it never raises (mercure#35).

Before any rule, a guard refuses what must never be segmented: SEG, SR, RTSTRUCT, presentation
states, key objects, and the node's own outputs (:func:`is_own_output`), because a result stored
back into the archive arrives again like any other series.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node import __version__
from node.ingest import Sender

#: The marker of the node's own derived outputs: Manufacturer ``segnode`` and ``DERIVED`` in
#: ImageType. (The phantom is Manufacturer ``segnode`` too but ORIGINAL, so it stays routable.)
OWN_MANUFACTURER = "segnode"

#: Modalities that are never images to segment.
NEVER_MODALITIES = {"SEG", "SR", "RTSTRUCT", "PR", "KO", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "REG", "M3D"}
#: SOP class UID prefixes that are never images to segment (SEG, label map SEG, SR family incl.
#: KO, RT objects, presentation states, encapsulated documents, registrations).
NEVER_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66.",  # segmentation, surface seg, registration
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.481.",  # RT structure set, plan, dose, ...
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL/OBJ/MTL
)

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]
#: The sender of series read from a folder by hand (``segnode rules test``).
FILE_SENDER = Sender("file")


# --- what a series looks like to the rules ------------------------------------------------------

@dataclass(frozen=True)
class SeriesFacts:
    """The attributes rules look at. ``None`` means missing or unreadable."""

    modality: str | None = None
    sop_class_uid: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    slice_thickness: float | None = None
    image_type: tuple[str, ...] | None = None
    orientation: Orientation | None = None
    manufacturer: str | None = None
    instance_count: int = 0
    sop_instance_uids: tuple[str, ...] = ()
    sender: Sender = FILE_SENDER
    #: Files that could not be read as DICOM (skipped).
    unreadable: int = 0


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element: treat as missing
        return None
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _shared_item(ds: Dataset, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the shared functional groups (enhanced multi-frame)."""
    try:
        return ds.SharedFunctionalGroupsSequence[0][sequence][0]
    except Exception:
        return None


def _slice_thickness(ds: Dataset) -> float | None:
    for source in (ds, _shared_item(ds, "PixelMeasuresSequence")):
        try:
            value = source.get("SliceThickness") if source is not None else None
            if value not in (None, ""):
                return float(value)
        except Exception:
            pass
    return None


def orientation_of(iop: object) -> Orientation | None:
    """axial/coronal/sagittal by the dominant axis of the slice normal; oblique when none dominates
    (normal more than ~37 degrees from every axis)."""
    try:
        cosines = np.asarray([float(v) for v in iop], dtype=float)  # type: ignore[union-attr]
        if cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
            return None
        normal = np.cross(cosines[:3], cosines[3:])
        length = float(np.linalg.norm(normal))
        if length < 0.5:
            return None
        normal = np.abs(normal / length)
    except Exception:
        return None
    axis = int(np.argmax(normal))
    if normal[axis] < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def facts_from_dataset(ds: Dataset, *, instance_count: int = 1, sop_uids: tuple[str, ...] = (),
                       sender: Sender = FILE_SENDER, unreadable: int = 0) -> SeriesFacts:
    try:
        image_type = tuple(str(v).strip().upper() for v in ds.get("ImageType") or ()) or None
    except Exception:
        image_type = None
    plane = _shared_item(ds, "PlaneOrientationSequence")
    iop = ds.get("ImageOrientationPatient") or (plane.get("ImageOrientationPatient") if plane else None)
    return SeriesFacts(
        modality=(_text(ds, "Modality") or "").upper() or None,
        sop_class_uid=_text(ds, "SOPClassUID"),
        body_part=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        slice_thickness=_slice_thickness(ds),
        image_type=image_type,
        orientation=orientation_of(iop) if iop is not None else None,
        manufacturer=_text(ds, "Manufacturer"),
        instance_count=instance_count,
        sop_instance_uids=sop_uids,
        sender=sender,
        unreadable=unreadable,
    )


def _series_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(
        Path(entry.path) for entry in os.scandir(path)
        if entry.is_file() and not entry.name.startswith(".") and not entry.name.endswith((".tmp", ".part"))
    )


def read_facts(path: Path, sender: Sender = FILE_SENDER, sop_uids: list[str] | None = None) -> SeriesFacts:
    """Facts of the series in ``path`` (a folder of one series, or one file): attributes of the first
    readable instance; count and SOP instance UIDs of all of them (frames for one multi-frame file).

    ``sop_uids``, when the caller knows them (the spool's index), spares reading every file."""
    first: Dataset | None = None
    uids: set[str] = set(sop_uids or ())
    unreadable = 0
    for file in _series_files(Path(path)):
        try:
            if first is None:
                ds = pydicom.dcmread(file, stop_before_pixels=True)
            elif sop_uids is None:
                ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            else:
                break
            uid = str(ds.SOPInstanceUID)
        except Exception:
            unreadable += 1
            continue
        first = first if first is not None else ds
        uids.add(uid)
    if first is None:
        return SeriesFacts(sender=sender, unreadable=unreadable)
    count = len(uids)
    if count == 1:
        try:
            count = max(1, int(first.get("NumberOfFrames") or 1))
        except (TypeError, ValueError):
            pass
    return facts_from_dataset(first, instance_count=count, sop_uids=tuple(sorted(uids)),
                              sender=sender, unreadable=unreadable)


# --- the guard ----------------------------------------------------------------------------------

def is_own_output(facts: SeriesFacts) -> bool:
    """True for the node's own derived objects: Manufacturer ``segnode`` with ``DERIVED`` ImageType."""
    return (facts.manufacturer or "").lower() == OWN_MANUFACTURER and "DERIVED" in (facts.image_type or ())


def never_routed(facts: SeriesFacts) -> str | None:
    """Why this series must never be segmented, or ``None`` if rules may look at it."""
    if facts.sop_class_uid is None and facts.modality is None:
        return "no readable DICOM instance"
    if facts.modality in NEVER_MODALITIES:
        return f"Modality {facts.modality} is not an image to segment"
    if facts.sop_class_uid and facts.sop_class_uid.startswith(NEVER_SOP_PREFIXES):
        name = UID(facts.sop_class_uid).name
        return f"SOP class {name} is not an image to segment"
    if is_own_output(facts):
        return "a segnode output (Manufacturer segnode, ImageType DERIVED)"
    return None


# --- rules --------------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _upper(values: list[str] | None) -> list[str] | None:
    return None if values is None else [v.strip().upper() for v in values]


class Match(_Model):
    """Conditions; all given ones must hold. Lists mean "any of"."""

    modality: list[str] | None = None
    #: SOP class UIDs or pydicom keywords (``CTImageStorage``).
    sop_class: list[str] | None = None
    #: Shell-style patterns, case-insensitive: ``["ABDOMEN", "*CHEST*"]``.
    body_part: list[str] | None = None
    #: A regular expression searched in SeriesDescription, case-insensitive.
    series_description: str | None = None
    #: [min, max] mm, inclusive.
    slice_thickness: tuple[float, float] | None = None
    #: [min, max] instances (frames for one multi-frame object), inclusive.
    slices: tuple[int, int] | None = None
    #: Values that ImageType must contain; ``"!LOCALIZER"`` must not contain.
    image_type: list[str] | None = None
    orientation: list[Orientation] | None = None
    calling_aet: list[str] | None = None
    #: How the series arrived.
    via: list[Literal["dimse", "stow", "orthanc", "file"]] | None = None
    #: Sender addresses or networks: ``["10.1.0.0/16", "127.0.0.1"]``.
    source: list[str] | None = None

    @field_validator("modality", "image_type", "body_part")
    @classmethod
    def _upper_lists(cls, v: list[str] | None) -> list[str] | None:
        return _upper(v)

    @field_validator("calling_aet")
    @classmethod
    def _strip_aets(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [a.strip() for a in v]

    @field_validator("sop_class")
    @classmethod
    def _sop_uids(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        from pydicom.uid import UID_dictionary

        by_keyword = {entry[4]: uid for uid, entry in UID_dictionary.items() if entry[4]}
        out = []
        for item in v:
            if re.fullmatch(r"[0-9.]+", item):
                out.append(item)
            elif item in by_keyword:
                out.append(by_keyword[item])
            else:
                raise ValueError(f"unknown SOP class {item!r} (a UID or a keyword such as CTImageStorage)")
        return out

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return v

    @field_validator("source")
    @classmethod
    def _networks(cls, v: list[str] | None) -> list[str] | None:
        for item in v or ():
            ipaddress.ip_network(item, strict=False)
        return v

    @model_validator(mode="after")
    def _ranges(self) -> Match:
        for name in ("slice_thickness", "slices"):
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] > bounds[1]:
                raise ValueError(f"{name}: min {bounds[0]} is above max {bounds[1]}")
        return self


class PipelineSpec(_Model):
    """What to run: engine and task (TotalSegmentator's flags), post-processing steps, outputs.
    Unset fields take the ``[segmentation]`` settings."""

    engine: str | None = None
    task: str | None = None
    fast: bool | None = None
    roi_subset: list[str] = []
    post: list[str] = []
    outputs: list[str] = ["seg"]
    #: Engine options (``SegmentRequest.options``), e.g. ``{vessel_hu = 120}`` for threshold.
    options: dict[str, Any] = {}
    #: Options per post-processing stage: ``{liver_vessels = {min_component_size = 50}}``.
    stage_options: dict[str, dict[str, Any]] = {}
    #: The kind of device the job needs: ``"gpu"`` jobs are taken only by GPU workers (their own
    #: queue); unset or ``"cpu"``: any worker.
    device: Literal["cpu", "gpu"] | None = None

    def version(self) -> str:
        """Changes when the pipeline would compute something else: the spec and the node version
        (not where it runs)."""
        blob = json.dumps({"node": __version__, **self.model_dump(exclude={"device"})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Rule(_Model):
    name: str = Field(min_length=1)
    match: Match = Match()
    pipeline: PipelineSpec = PipelineSpec()
    #: Names from the config's ``[[destinations]]``.
    destinations: list[str] = []


class RulesFile(_Model):
    rule: list[Rule] = []


class RulesError(Exception):
    """An unreadable or invalid rules file, as one line for people."""


#: Used when no rules file exists: every CT or MR image series, the ``[segmentation]`` engine,
#: every configured destination (``destinations = ["*"]``).
DEFAULT_RULES = (Rule(name="default", match=Match(modality=["CT", "MR"]), destinations=["*"]),)


def load_rules(path: Path | None, destinations: list[str] | None = None) -> tuple[Rule, ...]:
    """Rules from ``path``; :data:`DEFAULT_RULES` when ``path`` is None or does not exist.
    Destination names are checked against ``destinations`` when given."""
    if path is None or not Path(path).exists():
        rules = DEFAULT_RULES
    else:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            rules = tuple(RulesFile(**data).rule)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RulesError(f"{path}: not valid TOML: {exc}") from None
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise RulesError(f"{path}: {where}: {e['msg']}") from None
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise RulesError(f"{path}: rule names must be unique, got {names}")
    if destinations is not None:
        for rule in rules:
            unknown = [d for d in rule.destinations if d != "*" and d not in destinations]
            if unknown:
                raise RulesError(f"{path}: rule {rule.name!r}: unknown destination(s) {unknown}")
    return rules


# --- evaluation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One condition of one rule, evaluated."""

    condition: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    checks: tuple[Check, ...]

    @property
    def matched(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass(frozen=True)
class Decision:
    """Which rule (if any) routes the series, and why; every rule's checks for people."""

    rule: Rule | None
    reason: str
    results: tuple[RuleResult, ...] = ()
    refused: str | None = None


def _one_of(name: str, value: object, allowed: list[str], label: str) -> Check:
    if value is None:
        return Check(name, False, f"{label} missing")
    return Check(name, value in allowed, f"{label} {value} {'in' if value in allowed else 'not in'} {allowed}")


def _between(name: str, value: float | None, bounds: tuple[float, float], label: str) -> Check:
    if value is None:
        return Check(name, False, f"{label} missing")
    ok = bounds[0] <= value <= bounds[1]
    return Check(name, ok, f"{label} {value:g} {'within' if ok else 'outside'} [{bounds[0]:g}, {bounds[1]:g}]")


def _image_type(required: list[str], value: tuple[str, ...] | None) -> Check:
    if value is None:
        return Check("image_type", False, "ImageType missing")
    wrong = [r for r in required if (r[1:] in value if r.startswith("!") else r not in value)]
    shown = "\\".join(value)
    if wrong:
        return Check("image_type", False, f"ImageType {shown} fails {wrong}")
    return Check("image_type", True, f"ImageType {shown} has {required}")


def _source(networks: list[str], address: str) -> Check:
    if not address:
        return Check("source", False, "sender address unknown")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return Check("source", False, f"sender address {address!r} is not an IP address")
    ok = any(ip in ipaddress.ip_network(n, strict=False) for n in networks)
    return Check("source", ok, f"address {address} {'in' if ok else 'not in'} {networks}")


def check_rule(rule: Rule, facts: SeriesFacts) -> RuleResult:
    """Every condition the rule sets, each with pass/fail and the value seen."""
    m, f, checks = rule.match, facts, []
    if m.modality is not None:
        checks.append(_one_of("modality", f.modality, m.modality, "Modality"))
    if m.sop_class is not None:
        checks.append(_one_of("sop_class", f.sop_class_uid, m.sop_class, "SOPClassUID"))
    if m.body_part is not None:
        if f.body_part is None:
            checks.append(Check("body_part", False, "BodyPartExamined missing"))
        else:
            ok = any(fnmatch.fnmatchcase(f.body_part.upper(), p) for p in m.body_part)
            checks.append(Check("body_part", ok, f"BodyPartExamined {f.body_part} "
                                                 f"{'matches' if ok else 'does not match'} {m.body_part}"))
    if m.series_description is not None:
        if f.series_description is None:
            checks.append(Check("series_description", False, "SeriesDescription missing"))
        else:
            ok = re.search(m.series_description, f.series_description, re.IGNORECASE) is not None
            checks.append(Check("series_description", ok, f"SeriesDescription {f.series_description!r} "
                                f"{'matches' if ok else 'does not match'} /{m.series_description}/i"))
    if m.slice_thickness is not None:
        checks.append(_between("slice_thickness", f.slice_thickness, m.slice_thickness, "SliceThickness"))
    if m.slices is not None:
        checks.append(_between("slices", float(f.instance_count), m.slices, "slices"))
    if m.image_type is not None:
        checks.append(_image_type(m.image_type, f.image_type))
    if m.orientation is not None:
        checks.append(_one_of("orientation", f.orientation, list(m.orientation), "orientation"))
    if m.calling_aet is not None:
        aet = f.sender.calling_aet.strip() or None
        checks.append(_one_of("calling_aet", aet, m.calling_aet, f"calling AE (via {f.sender.via})"))
    if m.via is not None:
        checks.append(_one_of("via", f.sender.via, list(m.via), "arrived via"))
    if m.source is not None:
        checks.append(_source(m.source, f.sender.address))
    return RuleResult(rule, tuple(checks))


def route(facts: SeriesFacts, rules: tuple[Rule, ...] | list[Rule]) -> Decision:
    """The first rule whose conditions all hold; every rule is checked so people can see why."""
    refused = never_routed(facts)
    if refused:
        return Decision(None, f"never routed: {refused}", refused=refused)
    results = tuple(check_rule(rule, facts) for rule in rules)
    for result in results:
        if result.matched:
            return Decision(result.rule, f"rule {result.rule.name!r} matched (the first matching rule wins)",
                            results)
    if not rules:
        return Decision(None, "no rules", results)
    return Decision(None, "no rule matched", results)


def destinations_of(rule: Rule, configured: list[str]) -> list[str]:
    """The rule's destination names, ``"*"`` expanded to every configured destination."""
    out: list[str] = []
    for name in rule.destinations:
        for expanded in (configured if name == "*" else [name]):
            if expanded not in out:
                out.append(expanded)
    return out


@dataclass
class Explained:
    """A decision as plain data (for ``segnode rules test --json`` and the API)."""

    matched: str | None
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)


def explain(decision: Decision, facts: SeriesFacts) -> Explained:
    shown = {
        "modality": facts.modality, "sop_class": facts.sop_class_uid, "body_part": facts.body_part,
        "series_description": facts.series_description, "slice_thickness": facts.slice_thickness,
        "slices": facts.instance_count, "image_type": list(facts.image_type or []) or None,
        "orientation": facts.orientation, "calling_aet": facts.sender.calling_aet or None,
        "via": facts.sender.via, "source": facts.sender.address or None,
    }
    rules = [
        {"name": r.rule.name, "matched": r.matched,
         "checks": [{"condition": c.condition, "passed": c.passed, "detail": c.detail} for c in r.checks]}
        for r in decision.results
    ]
    return Explained(decision.rule.name if decision.rule else None, decision.reason, shown, rules)
