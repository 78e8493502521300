"""Every line of the README's seed-workflow table, run as written (the command is read from the README),
on the tiny phantom; the engine is the config's (threshold) unless a line needs TotalSegmentator's classes.

Also: on/off flags take ``true|false`` and show as flags in help, and both spellings of ``--roi_subset``."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from node.cli import app
from node.nifti import read_nifti, write_nifti
from node.phantom import TINY, write_phantom
from node.volume import Volume

README = Path(__file__).resolve().parents[2] / "README.md"


def table() -> dict[int, str]:
    """Row number -> the segnode command of that row of the README's seed-workflow table."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Coming from the seed workflow") :]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| (\d+) \| .* \| `(segnode [^`]+)`", line)
        if match:
            rows[int(match.group(1))] = match.group(2)
        elif rows and not line.startswith("|"):
            break
    return rows


ROWS = table()
#: Rows whose outputs a row reads.
NEEDS = {2: [1], 3: [1], 4: [3], 5: [2, 3]}


def test_the_table_has_the_seed_workflow() -> None:
    assert sorted(ROWS) == list(range(1, 11))


class Workspace:
    """A folder laid out as the seed workflow's: the series, its NIfTI, TotalSegmentator-style support masks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        phantom = write_phantom(TINY, root / "phantom")
        shutil.copytree(phantom["dicom"], root / "dicom_series")
        (root / "data").mkdir()
        shutil.copy(phantom["ct"], root / "data" / "case01.nii.gz")
        self.labels = read_nifti(phantom["labels"])
        # What `TotalSegmentator --roi_subset ...` writes: one mask per class (its liver includes the vessels).
        (root / "split_support").mkdir()
        for name, ids in (
            ("liver", (5, 201, 202)),
            ("portal_vein_and_splenic_vein", (64,)),
            ("inferior_vena_cava", (63,)),
        ):
            mask = Volume(
                np.isin(self.labels.array, ids).astype(np.uint8), self.labels.geometry, self.labels.source
            )
            write_nifti(mask, root / "split_support" / f"{name}.nii.gz")
        (root / "custom_materials.json").write_text(json.dumps({"liver": [0.35, 0.05, 0.04, 1.0]}))
        self.done: dict[int, Any] = {}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("seed"))


def segnode(ws: Workspace, monkeypatch: pytest.MonkeyPatch, command: str, **env: str):
    """``command`` (``segnode ...``) in the workspace, through the app as the console script runs it."""
    monkeypatch.chdir(ws.root)
    monkeypatch.delenv("SEGNODE_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    words = shlex.split(command)
    assert words[0] == "segnode"
    return CliRunner().invoke(app, words[1:])


def row(ws: Workspace, monkeypatch: pytest.MonkeyPatch, n: int, **env: str):
    for before in NEEDS.get(n, []):
        if before not in ws.done:
            result = row(ws, monkeypatch, before)
            assert result.exit_code == 0, result.output
    ws.done[n] = segnode(ws, monkeypatch, ROWS[n], **env)
    return ws.done[n]


def needs_blender() -> None:
    from node.artifacts.blender import find_blender

    if find_blender() is None:
        pytest.skip("no Blender: bpy in .venv-blender, SEGNODE_BLENDER or blender on PATH")


def test_1_dicom_to_nifti(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    result = row(ws, monkeypatch, 1)
    assert result.exit_code == 0, result.output
    volume = read_nifti(ws.root / "out_nii" / "case01.nii.gz")
    assert volume.shape_ijk == (64, 64, 40) and volume.array.dtype == np.int16


def test_2_png_slices_with_a_percentile_window(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    result = row(ws, monkeypatch, 2)
    assert result.exit_code == 0, result.output
    counts = {
        p: len(list((ws.root / "dicom_slices" / p).glob("*.png"))) for p in ("axial", "coronal", "sagittal")
    }
    assert counts == {"axial": 40, "coronal": 64, "sagittal": 64}


def test_3_segmentation_and_stl_meshes_in_metres(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    result = row(ws, monkeypatch, 3)
    assert result.exit_code == 0, result.output
    out = ws.root / "out_total_all"
    index = json.loads((out / "meshes" / "meshes.json").read_text())
    classes = {c["name"] for c in json.loads((out / "classes.json").read_text())}
    assert {e["name"] for e in index["meshes"]} == classes
    assert {p.stem for p in (out / "meshes").glob("*.stl")} == classes
    assert all(e["watertight"] for e in index["meshes"] if not e["empty"])
    report = json.loads((out / "report.json").read_text())
    assert report["qc"]["meshes"]["format"] == "stl" and report["qc"]["meshes"]["units"] == "m"
    assert (index["format"], index["units"], index["smooth_iters"]) == ("stl", "m", 10)


def test_4_blender_scene_from_the_stl_folder(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    needs_blender()
    result = row(ws, monkeypatch, 4)
    assert result.exit_code == 0, result.output
    meshes = len(list((ws.root / "out_total_all" / "meshes").glob("*.stl")))
    assert f"out/scene-setup.blend: {meshes} objects" in result.output
    assert (ws.root / "out" / "scene-setup.blend").stat().st_size > 100_000


def test_5_materials_and_the_slice_add_on(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    needs_blender()
    result = row(ws, monkeypatch, 5)
    assert result.exit_code == 0, result.output
    assert "out/custom-colored.blend:" in result.output
    assert (ws.root / "out" / "custom-colored.blend").stat().st_size > 100_000


def _weights_missing(output: str) -> None:
    assert "[weights_missing]" in output
    assert (
        "Dataset291_TotalSegmentator_part1_organs_1559subj.zip from "
        "https://github.com/wasserth/TotalSegmentator/releases/tag/v2.0.0-weights"
    ) in output


def test_6_support_labels_need_totalsegmentator_and_name_its_zips(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = row(
        ws,
        monkeypatch,
        6,
        SEGNODE_SEGMENTATION__ENGINE="totalsegmentator",
        SEGNODE_SEGMENTATION__WEIGHTS_DIR=str(ws.root / "no-weights"),
    )
    assert result.exit_code == 1
    assert (
        "TotalSegmentator task 'total' --roi_subset portal_vein_and_splenic_vein inferior_vena_cava liver "
        "needs weights"
    ) in result.output
    _weights_missing(result.output)


def test_7_enhanced_liver_mode_runs_the_liver_vessel_stage(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = row(ws, monkeypatch, 7)
    assert result.exit_code == 0, result.output
    report = json.loads((ws.root / "results_case01" / "report.json").read_text())
    assert report["post"] == ["liver_vessels"] and report["engine"]["robust_crop"] is True
    (stage,) = [s for s in report["stages"] if s["name"] == "liver_vessels"]
    # The threshold engine finds no liver; the stage says so (TotalSegmentator's classes would have one).
    assert (stage["state"], stage["message"]) == ("skipped", "no liver and no liver_vessels in the labels")


def test_8_split_with_support_labels(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    result = row(ws, monkeypatch, 8)
    assert result.exit_code == 0, result.output
    out = ws.root / "results_case01"
    meta = json.loads((out / "enhanced_liver_vessels_metadata.json").read_text())
    assert meta["support_source"] == {
        "liver": "split_support_dir",
        "inferior_vena_cava": "split_support_dir",
        "portal_vein_and_splenic_vein": "split_support_dir",
    }
    assert meta["liver_voxels"] == int(read_nifti(ws.root / "split_support" / "liver.nii.gz").array.sum())
    assert "portal_hepatic_split_qc" in meta
    for name in ("enhanced_liver_vessels", "portal_vein_branches", "hepatic_veins", "liver_vessels_labeled"):
        assert (out / f"{name}.nii.gz").is_file()


def test_9_generated_support_needs_totalsegmentator_weights(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = row(ws, monkeypatch, 9, SEGNODE_SEGMENTATION__WEIGHTS_DIR=str(ws.root / "no-weights"))
    assert result.exit_code == 1
    assert "liver_vessels: failed" in result.output
    _weights_missing(result.output)


@pytest.mark.parametrize("tail, fast", [("", True), (" true", True), (" false", False), ("=yes", True)])
def test_10_fast_as_a_flag_or_with_a_value(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, tail: str, fast: bool
) -> None:
    command = ROWS[10].split(" (")[0] if tail == "" else ROWS[10].replace("--fast", f"--fast{tail}")
    result = segnode(ws, monkeypatch, command)
    assert result.exit_code == 0, result.output
    assert json.loads((ws.root / "segmentations" / "report.json").read_text())["engine"]["fast"] is fast


def test_flags_show_as_flags_and_roi_subset_has_both_spellings(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    help_text = segnode(ws, monkeypatch, "segnode run --help", COLUMNS="200").output
    fast = next(line for line in help_text.splitlines() if "--fast " in line and "3 mm" in line)
    assert "<bool>" not in fast
    assert all("<bool>" not in line for line in help_text.splitlines())  # --help, --write-empty ... too
    weights_help = segnode(ws, monkeypatch, "segnode weights status --help", COLUMNS="200").output
    assert "--json" in weights_help and "<bool>" not in weights_help  # sub-apps' flags as well
    assert "--roi_subset,--roi-subset" in help_text
    for spelling in ("--roi_subset", "--roi-subset"):
        result = segnode(ws, monkeypatch, f"segnode run data/case01.nii.gz roi {spelling} fat bone")
        assert result.exit_code == 0, result.output
        names = [c["name"] for c in json.loads((ws.root / "roi" / "classes.json").read_text())]
        assert names == ["bone", "fat"]
    result = segnode(ws, monkeypatch, "segnode run data/case01.nii.gz roi --fast maybe")
    assert result.exit_code == 2  # 'maybe' is a third positional: refused
