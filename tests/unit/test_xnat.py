"""XNAT import: inventories, selection, per-object NIfTI on the series' grid, merges, DICOM-SEG.

The case folders are built by :mod:`tests.xnat_fixtures` from the phantom (stacked, sparse,
multi-segment SEGs, some with re-assigned per-frame UIDs) plus dcmqi's real liver SEG; every output
is compared voxel for voxel with the ground truth the fixtures drew.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.nifti import read_nifti
from node.volume import Geometry, Volume
from node.xnat.catalog import CatalogError, read_catalog, scan_catalog_xml, seg_catalog_xml
from node.xnat.export import (
    ExportError,
    ExportOptions,
    Merge,
    failed,
    object_file,
    parse_merge,
    plan_objects,
    run,
    safe_name,
)
from node.xnat.inventory import XnatError, find_cases, run_inventory
from node.xnat.select import Selection, SelectionError, match, normalize_case, parse_names, read_sheet
from tests.xnat_fixtures import (
    DCMQI,
    INITIAL,
    NO_CATALOG,
    ORPHAN,
    RTSTRUCT,
    SHIFTED,
    VERIFIED,
    SegObject,
    build_dcmqi_case,
    build_phantom_case,
    write_scan,
    write_seg,
)

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (to prove nothing was written)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory):
    """A parent of four cases: the phantom case 2072, 2073 (ASSESSORS only), 2074 (neither folder) and
    dcmqi's real SEG; returns (root, phantom fixture, ground-truth objects)."""
    root = tmp_path_factory.mktemp("xnat") / "cases"
    fixture = build_phantom_case(root, "2072")
    truth = fixture.truth
    scan = fixture.scans["2"]
    write_seg(root / "2073", "SEG_20250101_000000_000_S2", scan, [SegObject("liver", truth["liver"])],
              name="liver only")
    (root / "2074" / "notes").mkdir(parents=True)
    build_dcmqi_case(root, "dcmqi")
    return root, fixture, truth


@pytest.fixture(scope="module")
def exported(cases, tmp_path_factory: pytest.TempPathFactory):
    """``run`` (export) over the whole parent folder with a merge; (out, reports, input tree before)."""
    root = cases[0]
    before = _tree(root)
    out = tmp_path_factory.mktemp("export")
    options = ExportOptions(merges=(parse_merge("pancreas=pancreas+mass+duct"),))
    reports = run(root, out, options)
    return out, {r["case"]: r for r in reports}, before


def _frames(mask: np.ndarray) -> int:
    return int(sum(bool(mask[k].any()) for k in range(mask.shape[0])))


# --- catalogs ----------------------------------------------------------------------------------


def test_catalogs_round_trip_and_refuse_garbage(tmp_path: Path) -> None:
    scan = tmp_path / "scan_2_catalog.xml"
    scan.write_text(scan_catalog_xml("1.2.3", [("2-0001.dcm", "1.2.3.1"), ("2-0002.dcm", "1.2.3.2")]))
    catalog = read_catalog(scan)
    assert (catalog.kind, catalog.uid) == ("DCMCatalog", "1.2.3")
    assert [(e.uri, e.uid, e.content) for e in catalog.entries] == [
        ("2-0001.dcm", "1.2.3.1", "RAW"), ("2-0002.dcm", "1.2.3.2", "RAW")]
    seg = tmp_path / "SEG_catalog.xml"
    seg.write_text(seg_catalog_xml("SEG_x.dcm", "sdamirsa", "2024-01-18T23:52:51.346-05:00"))
    catalog = read_catalog(seg)
    assert (catalog.kind, catalog.created_by, catalog.created_time) == (
        "Catalog", "sdamirsa", "2024-01-18T23:52:51.346-05:00")
    # Another prefix for the same namespace, as other XNAT versions write it.
    other = tmp_path / "other.xml"
    other.write_text('<c:Catalog xmlns:c="http://nrg.wustl.edu/catalog"><c:entries>'
                     '<c:entry URI="a.dcm" createdBy="u1" createdTime="t1"/></c:entries></c:Catalog>')
    assert read_catalog(other).created_by == "u1"
    bad = tmp_path / "bad.xml"
    bad.write_text("<cat:Catalog")
    with pytest.raises(CatalogError) as info:
        read_catalog(bad)
    assert info.value.code == "catalog_unreadable"
    wrong = tmp_path / "wrong.xml"
    wrong.write_text("<html/>")
    with pytest.raises(CatalogError) as info:
        read_catalog(wrong)
    assert info.value.code == "catalog_invalid"


# --- inventory ---------------------------------------------------------------------------------


def test_find_cases(cases, tmp_path: Path) -> None:
    root = cases[0]
    assert [p.name for p in find_cases(root)] == ["2072", "2073", "2074", "dcmqi"]
    assert find_cases(root / "2072") == [root / "2072"]
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(XnatError) as info:
        find_cases(tmp_path / "empty")
    assert info.value.code == "no_cases"
    with pytest.raises(XnatError) as info:
        find_cases(tmp_path / "missing")
    assert info.value.code == "not_found"


def test_inventory_json(cases, tmp_path: Path) -> None:
    root, fixture, truth = cases
    before = _tree(root)
    summaries = run_inventory(root, tmp_path / "out")
    assert _tree(root) == before  # nothing written into the input
    assert [(s["case"], s["series"], s["segmentations"]) for s in summaries] == [
        ("2072", 3, 6), ("2073", 0, 1), ("2074", 0, 0), ("dcmqi", 1, 1)]

    series = json.loads((tmp_path / "out" / "2072" / "StudySeries_info.json").read_text())
    assert series["case"] == "2072" and series["problems"] == []
    s2 = series["series"]["2"]
    scan = fixture.scans["2"]
    assert {k: s2[k] for k in ("series_number", "series_uid", "series_description", "sop_class_uid", "modality",
                              "files", "files_read", "catalog", "catalog_uid", "catalog_entries",
                              "disagreements", "warnings", "error")} == {
        "series_number": 2, "series_uid": scan.series_uid, "series_description": "Abdomen portal venous",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "modality": "CT", "files": 40,
        "files_read": ["2-0001.dcm", "2-0040.dcm"], "catalog": "SCANS/2/DICOM/scan_2_catalog.xml",
        "catalog_uid": scan.series_uid, "catalog_entries": 40, "disagreements": {}, "warnings": [],
        "error": None}
    assert s2["path"] == str((root / "2072" / "SCANS" / "2" / "DICOM").resolve())
    assert series["series"]["3"]["disagreements"] == {
        "series_description": ["Abdomen arterial", "Abdomen arterial (edited)"]}
    assert series["series"]["3"]["series_description"] == "Abdomen arterial"
    assert series["series"]["4"]["error"] == {"code": "no_dicom", "message": "none of the 1 file(s) in SCANS/4 is DICOM"}

    segs = json.loads((tmp_path / "out" / "2072" / "Segmentations_info.json").read_text())["segmentations"]
    assert sorted(segs) == sorted([VERIFIED, INITIAL, SHIFTED, ORPHAN, NO_CATALOG, RTSTRUCT])
    v = segs[VERIFIED]
    assert {k: v[k] for k in ("name", "author", "created", "referenced_series_uid", "matched_series",
                              "referenced_sop_class_uid", "segmentation_type", "rows", "columns", "frames",
                              "pixel_spacing", "slice_thickness", "spacing_between_slices",
                              "image_orientation", "catalog", "warnings", "error")} == {
        "name": "verified", "author": "sdamirsa", "created": "2024-01-18T23:52:51.346-05:00",
        "referenced_series_uid": scan.series_uid, "matched_series": "2",
        "referenced_sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "segmentation_type": "BINARY",
        "rows": 64, "columns": 64,
        "frames": _frames(truth["pancreas"]) + _frames(truth["mass"]) + _frames(truth["stomach"]),
        "pixel_spacing": [3.2, 3.2], "slice_thickness": 6.0, "spacing_between_slices": 6.0,
        "image_orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "catalog": f"ASSESSORS/{VERIFIED}/SEG/SEG_catalog.xml", "warnings": [], "error": None}
    assert [(s["number"], s["label"], s["frames"], s["color_rgb"], s["type"]) for s in v["segments"]] == [
        (1, "pancreas", _frames(truth["pancreas"]), [249, 180, 111], "Anatomical structure"),
        (2, "mass", _frames(truth["mass"]), [200, 0, 0], "Anatomical structure"),
        (3, "stomach", _frames(truth["stomach"]), [216, 132, 105], "Anatomical structure")]
    assert segs[INITIAL]["author"] == "radiologist2"
    assert segs[INITIAL]["created"] == "2024-10-20T13:02:24.332+02:00"
    # No catalog: recorded, and the author comes from the SEG's ContentCreatorName instead.
    assert segs[NO_CATALOG]["warnings"] == [
        {"code": "no_catalog", "message": "no SEG_catalog.xml: author and creation time unknown"}]
    assert (segs[NO_CATALOG]["author"], segs[NO_CATALOG]["created"], segs[NO_CATALOG]["error"]) == (
        "sdamirsa", None, None)
    assert segs[ORPHAN]["matched_series"] is None
    assert [w["code"] for w in segs[ORPHAN]["warnings"]] == ["series_not_found"]
    assert segs[RTSTRUCT]["error"] == {"code": "not_seg", "message": "not a DICOM-SEG assessor (RT Structure Set Storage)"}

    def problems(case: str) -> list[str]:
        return [p["code"] for p in json.loads((tmp_path / "out" / case / "StudySeries_info.json").read_text())["problems"]]

    assert problems("2073") == ["no_scans"]
    assert problems("2074") == ["not_a_case"]
    dcmqi = json.loads((tmp_path / "out" / "dcmqi" / "Segmentations_info.json").read_text())["segmentations"]
    (liver,) = dcmqi.values()
    assert (liver["name"], liver["author"], liver["matched_series"], liver["frames"]) == (
        "Liver Segmentation", "dcmqi", "2", 3)
    assert [(s["label"], s["category"], s["type"], s["frames"]) for s in liver["segments"]] == [
        ("Liver", "Tissue", "Liver", 3)]
    cases_info = json.loads((tmp_path / "out" / "Cases_info.json").read_text())
    assert [c["case"] for c in cases_info["cases"]] == ["2072", "2073", "2074", "dcmqi"]


def test_output_inside_input_is_refused(cases) -> None:
    root = cases[0]
    for out in (root / "out", root / "2072" / "x"):
        with pytest.raises(XnatError) as info:
            run_inventory(root, out)
        assert info.value.code == "output_in_input"
    with pytest.raises(XnatError) as info:  # OUT/2072 would be the case folder itself
        run(root / "2072", root)
    assert info.value.code == "output_in_input"
    assert not (root / "out").exists() and not (root / "Cases_info.json").exists()


# --- selection ---------------------------------------------------------------------------------


def test_parse_names_and_cases() -> None:
    assert parse_names("['pancreas', 'stomach']") == ["pancreas", "stomach"]
    assert parse_names('["verified"]') == ["verified"]
    assert parse_names("('a',)") == ["a"]
    assert parse_names("[a, b]") == ["a", "b"]  # unquoted, as people type it
    assert parse_names("  verified ") == ["verified"]
    assert parse_names(None) == parse_names("") == []
    assert (normalize_case(2072.0), normalize_case(2072), normalize_case(" 2072 ")) == ("2072", "2072", "2072")
    segs = {VERIFIED: {"name": "verified"}, INITIAL: {"name": "initialAAA"}}
    assert match(segs, ("INITIALaaa", VERIFIED.lower(), "nope")) == ([VERIFIED, INITIAL], ["nope"])
    assert match(segs, ()) == ([VERIFIED, INITIAL], [])


def test_read_sheet_csv_and_xlsx(tmp_path: Path) -> None:
    from openpyxl import Workbook

    rows = [("Case", "Segmentation"), ("2072", "['verified', 'initialAAA']"), ("2072", NO_CATALOG),
            ("dcmqi", ""), ("9999", "x")]
    path = tmp_path / "select.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    expected = {"2072": ("verified", "initialAAA", NO_CATALOG), "dcmqi": (), "9999": ("x",)}
    assert read_sheet(path) == expected
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text("\n".join(";".join(r) for r in rows) + "\n")
    assert read_sheet(semicolons) == expected

    book = Workbook()
    ws = book.active
    ws.title = "first"
    ws.append(["notes"])
    extra = book.create_sheet("selection")
    extra.append(["case number", "comment", "names"])
    extra.append([2072, "ok", "['verified']"])
    extra.append([2073.0, None, None])
    xlsx = tmp_path / "select.xlsx"
    book.save(xlsx)
    assert read_sheet(xlsx, sheet="selection") == {"2072": ("verified",), "2073": ()}
    assert read_sheet(xlsx, sheet="selection", case_column="Case Number", name_column="comment") == {
        "2072": ("ok",), "2073": ()}
    with pytest.raises(SelectionError) as info:
        read_sheet(xlsx)  # the first sheet has no case column
    assert info.value.code == "no_column"
    with pytest.raises(SelectionError) as info:
        read_sheet(xlsx, sheet="nope")
    assert info.value.code == "no_sheet"
    with pytest.raises(SelectionError) as info:
        read_sheet(tmp_path / "select.ods")
    assert info.value.code == "not_found"


def test_export_from_sheet_selects_per_case(cases, tmp_path: Path) -> None:
    root = cases[0]
    sheet = tmp_path / "select.csv"
    sheet.write_text(f"case,segmentation\n2072,\"['initialAAA', 'nothing']\"\n2072,{NO_CATALOG}\ndcmqi,\n9999,x\n")
    reports = run(root, tmp_path / "out", ExportOptions(Selection(sheet=read_sheet(sheet))))
    assert [r["case"] for r in reports] == ["2072", "dcmqi"]
    by_case = {r["case"]: r for r in reports}
    assert by_case["2072"]["selection"]["selected"] == [INITIAL, NO_CATALOG]
    assert by_case["2072"]["selection"]["unmatched"] == ["nothing"]
    assert by_case["2072"]["problems"] == [
        {"code": "name_not_found", "message": "no segmentation named nothing in case 2072"}]
    assert list(by_case["dcmqi"]["segmentations"]) == ["SEG_20160318_174852_000_S2"]
    info = json.loads((tmp_path / "out" / "Cases_info.json").read_text())
    assert (info["not_selected"], info["sheet_cases_not_found"]) == (["2073", "2074"], ["9999"])
    assert sorted(p.name for p in (tmp_path / "out" / "2072" / "Curated_Output").iterdir()) == sorted([
        "2.nii.gz", object_file("2", "liver", INITIAL), object_file("2", "spleen", NO_CATALOG),
        object_file("2", "spleen", INITIAL)])


# --- export ------------------------------------------------------------------------------------


def test_merge_parsing_and_planning() -> None:
    assert parse_merge(" pancreas = pancreas + mass+duct ") == Merge("pancreas", ("pancreas", "mass", "duct"))
    for bad in ("pancreas", "=a+b", "p=a++b", "p="):
        with pytest.raises(ExportError) as info:
            parse_merge(bad)
        assert info.value.code == "bad_merge"
    segments = [{"number": 1, "label": "P"}, {"number": 2, "label": "M"}, {"number": 3, "label": "p"},
                {"number": 4, "label": "G"}]
    objects, merges, warnings = plan_objects(segments, [Merge("all", ("P_1", "M", "p_3", "x")),
                                                        Merge("none", ("x", "y")), Merge("G", ("G", "M"))])
    assert [(o.name, o.segments, o.merged_from) for o in objects] == [
        ("P_1", (1,), ()), ("M", (2,), ()), ("p_3", (3,), ()), ("G", (2, 4), ("G", "M")),
        ("all", (1, 2, 3), ("P_1", "M", "p_3"))]
    assert [(m["object"], m["missing"], m["written"]) for m in merges] == [
        ("all", ["x"], True), ("none", ["x", "y"], False), ("G", [], True)]
    assert [w["code"] for w in warnings] == ["duplicate_label", "duplicate_label", "merge_partial", "merge_empty"]
    assert safe_name("left kidney/cyst?") == "left_kidney_cyst"
    assert object_file("2", "main duct", "SEG_1") == "2_ON_main_duct_FN_SEG_1.nii.gz"


def test_export_is_voxel_exact_on_the_series_grid(cases, exported) -> None:
    root, fixture, truth = cases
    out, reports, before = exported
    assert _tree(root) == before  # never writes into the input
    curated = out / "2072" / "Curated_Output"
    ct = fixture.scans["2"].volume
    series = read_nifti(curated / "2.nii.gz")
    assert series.geometry.same_grid(ct.geometry, atol_mm=1e-4)
    assert series.array.dtype == np.int16 and np.array_equal(series.array, ct.array)

    expected = {
        (VERIFIED, "pancreas"): truth["pancreas_total"],  # merged: pancreas + mass (+ duct, absent)
        (VERIFIED, "mass"): truth["mass"], (VERIFIED, "stomach"): truth["stomach"],
        (INITIAL, "liver"): truth["liver"], (INITIAL, "spleen"): truth["spleen"],
        (NO_CATALOG, "spleen"): truth["spleen"],
    }
    assert sorted(p.name for p in curated.iterdir()) == sorted(
        ["2.nii.gz", *(object_file("2", obj, folder) for folder, obj in expected)])
    for (folder, obj), mask in expected.items():
        nifti = read_nifti(curated / object_file("2", obj, folder))
        assert nifti.geometry.same_grid(ct.geometry, atol_mm=1e-4), (folder, obj)
        assert nifti.array.dtype == np.uint8 and set(np.unique(nifti.array)) <= {0, 1}
        assert np.array_equal(nifti.array.astype(bool), mask), (folder, obj)

    segs = reports["2072"]["segmentations"]
    assert list(segs) == [VERIFIED, INITIAL, SHIFTED, ORPHAN, NO_CATALOG]  # not the RTSTRUCT
    assert [segs[f]["placement"]["method"] for f in (VERIFIED, INITIAL, NO_CATALOG)] == [
        "position", "reference", "position"]
    n = segs[VERIFIED]["objects"]
    assert [(o["object"], o["segments"], o["merged_from"], o["voxels"], o["status"]) for o in n] == [
        ("pancreas", [1, 2], ["pancreas", "mass"], int(truth["pancreas_total"].sum()), "written"),
        ("mass", [2], [], int(truth["mass"].sum()), "written"),
        ("stomach", [3], [], int(truth["stomach"].sum()), "written")]
    assert segs[VERIFIED]["merges"] == [{"object": "pancreas", "parts": ["pancreas", "mass", "duct"],
                                         "merged": ["pancreas", "mass"], "missing": ["duct"], "written": True}]
    assert [w["code"] for w in segs[VERIFIED]["warnings"]] == ["merge_partial"]
    assert segs[INITIAL]["merges"] == [{"object": "pancreas", "parts": ["pancreas", "mass", "duct"],
                                        "merged": [], "missing": ["pancreas", "mass", "duct"], "written": False}]
    frames = _frames(truth["stomach"])
    assert segs[SHIFTED]["error"]["code"] == "frames_unmatched"
    assert segs[SHIFTED]["error"]["message"].startswith(f"{frames} of {frames} frame(s) match no slice")
    assert segs[SHIFTED]["objects"] == []
    assert segs[ORPHAN]["error"]["code"] == "series_not_found"
    assert reports["2072"]["problems"] == []
    assert reports["2072"]["series_nifti"] == {"2": "written"}
    assert json.loads((out / "2072" / "Export_info.json").read_text()) == reports["2072"]


def test_bad_cases_are_reported_and_others_go_on(exported) -> None:
    out, reports, _ = exported
    assert list(reports) == ["2072", "2073", "2074", "dcmqi"]
    assert [p["code"] for p in reports["2073"]["problems"]] == ["no_scans"]
    (seg,) = reports["2073"]["segmentations"].values()
    assert seg["error"]["code"] == "series_not_found"
    assert [p["code"] for p in reports["2074"]["problems"]] == ["not_a_case", "nothing_selected"]
    assert failed(list(reports.values()))
    info = json.loads((out / "Cases_info.json").read_text())
    assert [(c["case"], c["selected"], c["ok"], [f["code"] for f in c["failed"]]) for c in info["cases"]] == [
        ("2072", 5, 3, ["frames_unmatched", "series_not_found"]), ("2073", 1, 0, ["series_not_found"]),
        ("2074", 0, 0, []), ("dcmqi", 1, 1, [])]


def test_dcmqi_liver_matches_its_label_map(exported) -> None:
    import SimpleITK as sitk

    out, reports, _ = exported
    (seg,) = reports["dcmqi"]["segmentations"].values()
    assert seg["placement"]["method"] == "reference" and seg["error"] is None
    nifti = read_nifti(out / "dcmqi" / "Curated_Output" / object_file("2", "Liver", "SEG_20160318_174852_000_S2"))
    truth = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))
    assert np.allclose(nifti.geometry.origin, truth.GetOrigin(), atol=1e-3)
    assert np.allclose(nifti.geometry.spacing, truth.GetSpacing(), atol=1e-4)
    assert np.array_equal(nifti.array.astype(bool), sitk.GetArrayFromImage(truth) > 0)
    assert int(nifti.array.sum()) == 36233 + 35645 + 35220


def test_existing_outputs_are_skipped_unless_overwrite(cases, tmp_path: Path) -> None:
    root, _, truth = cases
    options = ExportOptions(Selection(names=("initialAAA",)))
    run(root / "2072", tmp_path, options)
    curated = tmp_path / "2072" / "Curated_Output"
    liver = curated / object_file("2", "liver", INITIAL)
    spleen = curated / object_file("2", "spleen", INITIAL)
    mtimes = {p.name: p.stat().st_mtime_ns for p in curated.iterdir()}
    # A file of another shape is not a finished output: it is written again.
    from node.nifti import write_nifti

    write_nifti(Volume(np.zeros((2, 3, 4), np.uint8), Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))), spleen)
    (report,) = run(root / "2072", tmp_path, options)
    seg = report["segmentations"][INITIAL]
    assert [(o["object"], o["status"]) for o in seg["objects"]] == [("liver", "skipped_existing"),
                                                                   ("spleen", "written")]
    assert (seg["series_status"], report["series_nifti"]) == ("skipped_existing", {"2": "skipped_existing"})
    assert liver.stat().st_mtime_ns == mtimes[liver.name]
    assert np.array_equal(read_nifti(spleen).array.astype(bool), truth["spleen"])
    (report,) = run(root / "2072", tmp_path, ExportOptions(Selection(names=(INITIAL,)), overwrite=True))
    seg = report["segmentations"][INITIAL]
    assert [o["status"] for o in seg["objects"]] == ["written", "written"] and seg["series_status"] == "written"


def test_oblique_feet_first_series_and_partial_files(tmp_path: Path) -> None:
    """A series whose slice normal points to the feet, rotated in-plane, and a truncated SEG."""
    from node.dicom.writer import SeriesInfo

    c, s = float(np.cos(np.radians(30))), float(np.sin(np.radians(30)))
    # Columns: along a row (c, s, 0), down a column (s, -c, 0), the normal (0, 0, -1) towards the feet.
    geometry = Geometry((10.0, -20.0, 30.0), (0.9, 1.1, 2.5), ((c, s, 0.0), (s, -c, 0.0), (0.0, 0.0, -1.0)))
    rng = np.random.default_rng(7)
    ct = Volume(rng.integers(-200, 300, (12, 24, 20), dtype=np.int16), geometry)
    kk, jj, ii = np.indices(ct.array.shape)
    a = (kk >= 2) & (kk <= 6) & (jj > 4) & (jj < 12) & (ii > 3) & (ii < 15)
    b = (kk >= 5) & (kk <= 10) & ((jj - 16) ** 2 + (ii - 10) ** 2 < 20)
    case = tmp_path / "in" / "77"
    scan = write_scan(case, "5", ct, SeriesInfo(uid_seed="oblique", series_number=5))
    write_seg(case, "SEG_A", scan, [SegObject("a", a), SegObject("b", b)], name="oblique")
    seg = write_seg(case, "SEG_B", scan, [SegObject("a", a)], name="truncated", reassign_uids=False)
    data = seg.path.read_bytes()
    seg.path.write_bytes(data[: len(data) - 40])
    (report,) = run(case, tmp_path / "out")
    a_seg, b_seg = report["segmentations"]["SEG_A"], report["segmentations"]["SEG_B"]
    assert a_seg["placement"]["method"] == "position"
    for name, mask in (("a", a), ("b", b)):
        nifti = read_nifti(tmp_path / "out" / "77" / "Curated_Output" / object_file("5", name, "SEG_A"))
        assert nifti.geometry.same_grid(ct.geometry, atol_mm=1e-4)
        assert np.array_equal(nifti.array.astype(bool), mask)
    assert b_seg["error"]["code"] == "pixel_data" and b_seg["objects"] == []


# --- back to DICOM-SEG and the command --------------------------------------------------------


def test_to_seg_writes_one_clean_multisegment_seg(cases, tmp_path: Path) -> None:
    from node.dicom.seg import parse_seg, read_seg_masks

    root, fixture, truth = cases
    options = ExportOptions(Selection(names=("verified",)))
    (report,) = run(root / "2072", tmp_path, options, mode="to-seg")
    seg_report = report["segmentations"][VERIFIED]
    assert (seg_report["error"], seg_report["status"], seg_report["placement"]["method"]) == (
        None, "written", "position")
    path = tmp_path / "2072" / seg_report["seg"]
    assert path.name == "2_SEG_FN_SEG_20240118_235251_213_S2.dcm"
    parsed = parse_seg(path)
    ds = parsed.dataset
    scan = fixture.scans["2"]
    assert (str(ds.SeriesDescription), ds.SegmentationType, ds.ReferencedSeriesSequence[0].SeriesInstanceUID) == (
        "verified", "BINARY", scan.series_uid)
    assert [(s.label, s.color, s.type.value if s.type else None) for s in parsed.segments.values()] == [
        ("pancreas", (249, 180, 111), "91723000"), ("mass", (200, 0, 0), "91723000"),
        ("stomach", (216, 132, 105), "91723000")]
    masks = read_seg_masks(path, scan.path)
    by_name = {masks.classes[i].name: m for i, m in masks.masks.items()}
    for name in ("pancreas", "mass", "stomach"):
        assert np.array_equal(by_name[name], truth[name]), name
    # Deterministic UIDs: the same XNAT SEG gives the same instance again (the outbox sends it once).
    (again,) = run(root / "2072", tmp_path, ExportOptions(Selection(names=("verified",)), overwrite=True),
                   mode="to-seg")
    assert again["segmentations"][VERIFIED]["status"] == "written"
    assert parse_seg(path).dataset.SOPInstanceUID == ds.SOPInstanceUID
    # A merge that overlaps another object: a label map keeps one object per voxel (recorded).
    merge = ExportOptions(Selection(names=("verified",)), (parse_merge("pancreas=pancreas+mass"),), True)
    (merged,) = run(root / "2072", tmp_path / "m", merge, mode="to-seg")
    warnings = merged["segmentations"][VERIFIED]["warnings"]
    assert [w["code"] for w in warnings] == ["overlap"]
    assert warnings[0]["message"].startswith(f"mass overlaps earlier objects in {int(truth['mass'].sum())} voxel(s)")


def test_to_seg_of_the_real_dcmqi_seg(cases, tmp_path: Path) -> None:
    from node.dicom.seg import read_seg_masks

    root = cases[0]
    (report,) = run(root / "dcmqi", tmp_path, mode="to-seg")
    (seg,) = report["segmentations"].values()
    assert (seg["error"], seg["placement"]["method"]) == (None, "reference")
    original = read_seg_masks(DCMQI / "liver.dcm", DCMQI / "ct-3slice")
    again = read_seg_masks(tmp_path / "dcmqi" / seg["seg"], DCMQI / "ct-3slice")
    assert [c.name for c in again.classes.values()] == ["Liver"]
    assert np.array_equal(next(iter(again.masks.values())), next(iter(original.masks.values())))


def _segnode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True,
                          check=False)


def test_cli_inventory_export_and_refusals(cases, tmp_path: Path) -> None:
    root = cases[0]
    single = tmp_path / "in"
    shutil.copytree(root / "2072", single / "2072", ignore=shutil.ignore_patterns(SHIFTED, ORPHAN))
    result = _segnode("xnat", "inventory", str(single), str(tmp_path / "inv"), "--json")
    assert result.returncode == 0, result.stderr
    assert [s["case"] for s in json.loads(result.stdout)] == ["2072"]
    result = _segnode("xnat", "export", str(single / "2072"), str(tmp_path / "out"), "--name", "verified",
                      "--name", NO_CATALOG, "--merge", "pancreas=pancreas+mass")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "position" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "2072" / "Curated_Output").iterdir()) == sorted([
        "2.nii.gz", object_file("2", "pancreas", VERIFIED), object_file("2", "mass", VERIFIED),
        object_file("2", "stomach", VERIFIED), object_file("2", "spleen", NO_CATALOG)])
    result = _segnode("xnat", "export", str(single), str(tmp_path / "out2"), "--name", "nothing-like-this")
    assert result.returncode == 1
    assert "name_not_found" in result.stdout
    result = _segnode("xnat", "export", str(single), str(single / "2072" / "out"))
    assert result.returncode == 2 and "[output_in_input]" in result.stderr
    result = _segnode("xnat", "export", str(single), str(tmp_path / "o3"), "--merge", "pancreas")
    assert result.returncode == 2 and "[bad_merge]" in result.stderr
    result = _segnode("xnat", "export", str(single), str(tmp_path / "o4"), "--sheet", str(tmp_path / "none.csv"))
    assert result.returncode == 2 and "[not_found]" in result.stderr
