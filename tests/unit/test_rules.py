"""Routing rules: every selector, missing tags, the never-route guard, first match wins, `rules test`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from node.dicom.writer import SeriesInfo, write_series
from node.ingest import Sender
from node.rules import (
    DEFAULT_RULES,
    Match,
    PipelineSpec,
    Rule,
    RulesError,
    check_rule,
    destinations_of,
    load_rules,
    orientation_of,
    read_facts,
    route,
)
from tests.unit.test_series import ramp_volume

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-slice axial CT (ramp), ABDOMEN, 2.5 mm, Manufacturer segnode, ORIGINAL\\PRIMARY\\AXIAL."""
    folder = tmp_path_factory.mktemp("rules") / "ct"
    write_series(ramp_volume(), folder, SeriesInfo(uid_seed="rules", series_description="Abd PV 2.5mm"))
    return folder


def edited(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of the series with attributes changed (value None deletes the attribute)."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(dst / path.name)
    return dst


def one(match: Match, facts) -> tuple[bool, str]:
    (check,) = check_rule(Rule(name="r", match=match), facts).checks
    return check.passed, check.detail


def test_facts_from_the_first_instance_and_the_folder(series: Path) -> None:
    facts = read_facts(series, Sender("dimse", "CT1", "10.1.2.3"))
    assert (facts.modality, facts.sop_class_uid, facts.body_part) == ("CT", "1.2.840.10008.5.1.4.1.1.2", "ABDOMEN")
    assert (facts.series_description, facts.slice_thickness, facts.orientation) == ("Abd PV 2.5mm", 2.5, "axial")
    assert facts.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert facts.instance_count == 6 and len(facts.sop_instance_uids) == 6
    assert facts.sop_instance_uids == tuple(sorted(facts.sop_instance_uids))
    assert facts.manufacturer == "segnode"


def test_each_selector_passes_and_fails(series: Path) -> None:
    f = read_facts(series, Sender("dimse", "CT1", "10.1.2.3"))
    assert one(Match(modality=["ct", "MR"]), f) == (True, "Modality CT in ['CT', 'MR']")
    assert one(Match(modality=["MR"]), f) == (False, "Modality CT not in ['MR']")
    assert one(Match(sop_class=["CTImageStorage"]), f) == (
        True, "SOPClassUID 1.2.840.10008.5.1.4.1.1.2 in ['1.2.840.10008.5.1.4.1.1.2']")
    assert one(Match(sop_class=["1.2.840.10008.5.1.4.1.1.4"]), f)[0] is False
    assert one(Match(body_part=["*abd*"]), f) == (True, "BodyPartExamined ABDOMEN matches ['*ABD*']")
    assert one(Match(body_part=["CHEST"]), f) == (False, "BodyPartExamined ABDOMEN does not match ['CHEST']")
    assert one(Match(series_description=r"\bpv\b"), f) == (
        True, "SeriesDescription 'Abd PV 2.5mm' matches /\\bpv\\b/i")
    assert one(Match(series_description="arterial"), f)[0] is False
    assert one(Match(slice_thickness=(0.5, 2.5)), f) == (True, "SliceThickness 2.5 within [0.5, 2.5]")
    assert one(Match(slice_thickness=(3, 5)), f) == (False, "SliceThickness 2.5 outside [3, 5]")
    assert one(Match(slices=(6, 6)), f) == (True, "slices 6 within [6, 6]")
    assert one(Match(slices=(20, 3000)), f) == (False, "slices 6 outside [20, 3000]")
    assert one(Match(image_type=["original", "!LOCALIZER"]), f) == (
        True, "ImageType ORIGINAL\\PRIMARY\\AXIAL has ['ORIGINAL', '!LOCALIZER']")
    assert one(Match(image_type=["!AXIAL"]), f) == (False, "ImageType ORIGINAL\\PRIMARY\\AXIAL fails ['!AXIAL']")
    assert one(Match(orientation=["axial"]), f) == (True, "orientation axial in ['axial']")
    assert one(Match(orientation=["coronal", "sagittal"]), f)[0] is False
    assert one(Match(calling_aet=["CT1 "]), f) == (True, "calling AE (via dimse) CT1 in ['CT1']")
    assert one(Match(calling_aet=["CT2"]), f)[0] is False
    assert one(Match(via=["stow"]), f) == (False, "arrived via dimse not in ['stow']")
    assert one(Match(source=["10.1.0.0/16"]), f) == (True, "address 10.1.2.3 in ['10.1.0.0/16']")
    assert one(Match(source=["127.0.0.1"]), f) == (False, "address 10.1.2.3 not in ['127.0.0.1']")


def test_orientation_from_iop() -> None:
    assert orientation_of([1, 0, 0, 0, 1, 0]) == "axial"
    assert orientation_of([1, 0, 0, 0, 0, -1]) == "coronal"
    assert orientation_of([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation_of([1, 0, 0, 0, 0.7071, 0.7071]) == "oblique"
    assert orientation_of([1, 0, 0, 0, 0.9397, 0.3420]) == "axial"  # 20 degrees of tilt
    assert orientation_of(["x", 0, 0, 0, 1, 0]) is None
    assert orientation_of([1, 0, 0]) is None


def test_missing_tags_fail_their_condition_and_never_raise(series: Path, tmp_path: Path) -> None:
    bare = edited(series, tmp_path / "bare", BodyPartExamined=None, SeriesDescription=None, SliceThickness=None,
                  ImageType=None, ImageOrientationPatient=None)
    facts = read_facts(bare, Sender("stow"))
    rule = Rule(name="strict", match=Match(
        modality=["CT"], body_part=["ABDOMEN"], series_description="PV", slice_thickness=(1, 5),
        image_type=["ORIGINAL"], orientation=["axial"], calling_aet=["CT1"], source=["10.0.0.0/8"]))
    decision = route(facts, [rule, Rule(name="catch-all")])
    assert decision.rule is not None and decision.rule.name == "catch-all"
    details = [(c.condition, c.passed, c.detail) for c in decision.results[0].checks]
    assert details == [
        ("modality", True, "Modality CT in ['CT']"),
        ("body_part", False, "BodyPartExamined missing"),
        ("series_description", False, "SeriesDescription missing"),
        ("slice_thickness", False, "SliceThickness missing"),
        ("image_type", False, "ImageType missing"),
        ("orientation", False, "orientation missing"),
        ("calling_aet", False, "calling AE (via stow) missing"),
        ("source", False, "sender address unknown"),
    ]


def test_malformed_value_is_missing_not_a_crash(series: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    ds = pydicom.dcmread(next(iter(sorted(series.iterdir()))))
    ds[0x00180050] = RawDataElement(Tag(0x00180050), "DS", 4, b"abc ", 0, False, True)  # SliceThickness
    ds[0x00200037] = RawDataElement(Tag(0x00200037), "DS", 4, b"1\\0 ", 0, False, True)  # IOP: 2 values
    ds.save_as(bad / "a.dcm")
    facts = read_facts(bad)
    assert facts.slice_thickness is None and facts.orientation is None
    assert one(Match(slice_thickness=(1, 5)), facts) == (False, "SliceThickness missing")


def test_seg_sr_rtstruct_pr_ko_and_own_outputs_are_never_routed(series: Path, tmp_path: Path) -> None:
    catch_all = [Rule(name="all")]
    cases = {
        "SEG": ("SEG", "1.2.840.10008.5.1.4.1.1.66.4"),
        "SR": ("SR", "1.2.840.10008.5.1.4.1.1.88.33"),
        "RTSTRUCT": ("RTSTRUCT", "1.2.840.10008.5.1.4.1.1.481.3"),
        "PR": ("PR", "1.2.840.10008.5.1.4.1.1.11.1"),
        "KO": ("KO", "1.2.840.10008.5.1.4.1.1.88.59"),
    }
    base = read_facts(series)
    for modality, sop_class in cases.values():
        decision = route(replace(base, modality=modality), catch_all)
        assert (decision.rule, decision.reason) == (None, f"never routed: Modality {modality} is not an image to segment")
        # A wrong Modality does not hide the SOP class either.
        decision = route(replace(base, sop_class_uid=sop_class), catch_all)
        assert decision.rule is None and decision.refused.startswith("SOP class ")
    derived = edited(series, tmp_path / "derived", ImageType=["DERIVED", "SECONDARY"])
    decision = route(read_facts(derived), catch_all)
    assert decision.reason == "never routed: a segnode output (Manufacturer segnode, ImageType DERIVED)"
    # A derived series from another vendor and the (ORIGINAL) phantom are routable.
    other = edited(series, tmp_path / "other", ImageType=["DERIVED", "SECONDARY"], Manufacturer="ACME")
    assert route(read_facts(other), catch_all).rule.name == "all"
    assert route(base, catch_all).rule.name == "all"


def test_empty_folder_is_refused_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("not dicom")
    facts = read_facts(tmp_path)
    assert facts.unreadable == 1
    assert route(facts, DEFAULT_RULES).reason == "never routed: no readable DICOM instance"


def test_first_matching_rule_wins(series: Path) -> None:
    facts = read_facts(series)
    rules = [Rule(name="mr", match=Match(modality=["MR"])), Rule(name="ct-thin", match=Match(modality=["CT"])),
             Rule(name="ct-any", match=Match(modality=["CT"]))]
    decision = route(facts, rules)
    assert decision.rule.name == "ct-thin"
    assert decision.reason == "rule 'ct-thin' matched (the first matching rule wins)"
    assert [r.matched for r in decision.results] == [False, True, True]
    assert route(facts, rules[:1]).reason == "no rule matched"
    assert route(facts, []).reason == "no rules"


def test_rules_file_loading_and_errors(tmp_path: Path) -> None:
    rules = load_rules(REPO / "configs" / "rules.toml", destinations=[])
    assert [r.name for r in rules] == ["ct-abdomen-venous", "ct-other"]
    assert rules[0].pipeline.engine == "threshold" and rules[0].pipeline.outputs == ["seg"]
    assert load_rules(tmp_path / "absent.toml") == DEFAULT_RULES
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\n[rule.match]\nslices = [10, 2]\n')
    with pytest.raises(RulesError, match=r"rule\.0\.match: Value error, slices: min 10 is above max 2"):
        load_rules(bad)
    bad.write_text('[[rule]]\nname = "x"\n[rule.match]\nmodalty = ["CT"]\n')
    with pytest.raises(RulesError, match=r"rule\.0\.match\.modalty: Extra inputs are not permitted"):
        load_rules(bad)
    bad.write_text('[[rule]]\nname = "x"\n[rule.match]\nsop_class = ["NoSuchStorage"]\n')
    with pytest.raises(RulesError, match="unknown SOP class 'NoSuchStorage'"):
        load_rules(bad)
    bad.write_text('[[rule]]\nname = "x"\ndestinations = ["pacs"]\n')
    with pytest.raises(RulesError, match=r"rule 'x': unknown destination\(s\) \['pacs'\]"):
        load_rules(bad, destinations=["orthanc"])


def test_destinations_and_pipeline_version() -> None:
    rule = Rule(name="r", destinations=["b", "*"])
    assert destinations_of(rule, ["a", "b"]) == ["b", "a"]
    assert PipelineSpec().version() == PipelineSpec(outputs=["seg"]).version()
    assert PipelineSpec().version() != PipelineSpec(engine="totalsegmentator").version()


def segnode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True)


def test_rules_test_command_shows_each_condition(series: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "thin"\n[rule.match]\nmodality = ["CT"]\nslice_thickness = [0.5, 1.5]\n\n'
        '[[rule]]\nname = "ct"\n[rule.match]\nmodality = ["CT"]\ncalling_aet = ["CT1"]\n\n'
        '[[rule]]\nname = "any"\n'
    )
    result = segnode("rules", "test", str(series), "--rules", str(rules), "--calling-aet", "CT1", "--via", "dimse")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"rules: {rules}",
        ("series: modality=CT, sop_class=1.2.840.10008.5.1.4.1.1.2, body_part=ABDOMEN, "
         "series_description=Abd PV 2.5mm, slice_thickness=2.5, slices=6, "
         "image_type=['ORIGINAL', 'PRIMARY', 'AXIAL'], orientation=axial, calling_aet=CT1, via=dimse"),
        "rule thin: no match",
        "  pass  modality: Modality CT in ['CT']",
        "  FAIL  slice_thickness: SliceThickness 2.5 outside [0.5, 1.5]",
        "rule ct: MATCH",
        "  pass  modality: Modality CT in ['CT']",
        "  pass  calling_aet: calling AE (via dimse) CT1 in ['CT1']",
        "rule any: match, not used (an earlier rule won)",
        "result: rule 'ct' matched (the first matching rule wins)",
    ]
    as_json = json.loads(segnode("rules", "test", str(series), "--rules", str(rules), "--json").stdout)
    assert as_json["matched"] == "any"
    assert as_json["rules"][1]["checks"][1] == {
        "condition": "calling_aet", "passed": False, "detail": "calling AE (via file) missing"}
    missing = segnode("rules", "test", str(series), "--rules", str(tmp_path / "none.toml"))
    assert (missing.returncode, missing.stderr.strip()) == (2, f"error: {tmp_path / 'none.toml'}: no such rules file")
