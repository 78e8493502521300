"""Names for a label file's ids come from the file's own table: the label table TotalSegmentator writes into
the NIfTI header (its real ``add_label_map_to_nifti``), ``<name>.classes.json`` beside it (what ``segnode seg
to-nifti`` writes); only without one the ``--task`` map is assumed, with a warning when ids do not fit it."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from node.artifacts import class_table_path, load_labels, nifti_label_table
from node.cli import app


def label_file(path: Path, ids: list[int], label_map: dict[int, str] | None = None) -> Path:
    data = np.zeros((12, 10, 8), np.uint8)
    for n, label in enumerate(ids):
        data[1 + n % 5 * 2: 3 + n % 5 * 2, 2 + n // 5 * 3: 4 + n // 5 * 3, 2:6] = label
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
    if label_map is not None:
        from totalsegmentator.nifti_ext_header import add_label_map_to_nifti

        img = add_label_map_to_nifti(img, label_map)
    nib.save(img, path)
    return path


def test_totalsegmentators_mr_labels_are_named_by_their_own_header(tmp_path: Path, caplog) -> None:
    from totalsegmentator.map_to_binary import class_map

    mr = {int(k): v for k, v in class_map["total_mr"].items()}
    path = label_file(tmp_path / "mr_labels.nii.gz", [10, 23, 46], mr)
    assert nifti_label_table(path) == mr
    with caplog.at_level(logging.INFO):
        volume, table = load_labels(path, None, "total")  # the CT map would say "lung_upper_lobe_right"...
    assert {i: c.name for i, c in volume.classes.items()} == {10: "lung_left", 23: "aorta", 46: "autochthon_left"}
    assert len(table) == 50 and "class names from the label table in its NIfTI header (50 classes)" in caplog.text
    assert "no class table" not in caplog.text


def test_a_table_named_after_the_file_wins_over_the_folders(tmp_path: Path) -> None:
    path = label_file(tmp_path / "a.nii.gz", [1, 2])
    class_table_path(path).write_text('{"1": "left thing", "2": "right thing"}')
    (tmp_path / "classes.json").write_text('{"1": "other", "2": "other2"}')
    volume, _ = load_labels(path)
    assert {i: c.name for i, c in volume.classes.items()} == {1: "left thing", 2: "right thing"}
    assert class_table_path(tmp_path / "x" / "labels.nii.gz") == tmp_path / "x" / "labels.classes.json"


def test_ids_the_assumed_map_lacks_are_warned_on_log_and_console(tmp_path: Path, caplog) -> None:
    path = label_file(tmp_path / "odd.nii.gz", [5, 140, 141])
    with caplog.at_level(logging.WARNING):
        volume, _ = load_labels(path, None, "total")
    assert {i: c.name for i, c in volume.classes.items()} == {5: "liver", 140: "label_140", 141: "label_141"}
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().startswith("odd.nii.gz has no class table: names assumed from TotalSegmentator's "
                                          "'total' map, which has no label id(s) 140, 141 (named label_<id>)")
    ok = label_file(tmp_path / "ok.nii.gz", [5, 52])
    caplog.clear()
    load_labels(ok, None, "total")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "ok.nii.gz has no class table: names assumed from TotalSegmentator's 'total' map; give --classes or "
        "--task if it is another task's"]
    done = CliRunner().invoke(app, ["mesh", str(path), str(tmp_path / "meshes"), "--mesh-smooth-iters", "0",
                                    "--workers", "1"])
    assert done.exit_code == 0, done.output
    assert "which has no label id(s) 140, 141" in done.output
    assert sorted(p.name for p in (tmp_path / "meshes").glob("*.stl")) == ["label_140.stl", "label_141.stl",
                                                                            "liver.stl"]


@pytest.mark.parametrize("content", [b"not xml at all", b"<x><LabelTable></LabelTable></x>"])
def test_headers_without_a_usable_table_are_ignored(tmp_path: Path, content: bytes) -> None:
    path = label_file(tmp_path / "h.nii.gz", [1])
    img = nib.load(path)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, content))
    nib.save(img, path)
    assert nifti_label_table(path) is None
