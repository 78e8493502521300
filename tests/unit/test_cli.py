"""The segnode command as users run it: help, config, volume-info, convert, and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from node.dicom.writer import SeriesInfo, write_series
from tests.unit.test_series import ramp_volume

REPO = Path(__file__).resolve().parents[2]


def segnode(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=cwd, capture_output=True, text=True)


def test_help_lists_every_command() -> None:
    result = segnode("--help")
    assert result.returncode == 0
    for command in ("config", "phantom", "volume-info", "convert"):
        assert command in result.stdout


def test_config_show_masks_and_config_errors_exit_2(tmp_path: Path) -> None:
    shown = segnode("config", "show")
    assert shown.returncode == 0
    assert 'ae_title = "SEGNODE"' in shown.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 'abc'\n")
    result = segnode("--config", str(bad), "config", "show")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"config error: {bad}: dicom.port = 'abc': Input should be a valid integer, "
        "unable to parse string as an integer"
    )


def test_volume_info_and_convert(tmp_path: Path) -> None:
    write_series(ramp_volume(), tmp_path / "s", SeriesInfo(uid_seed="cli"))
    info = segnode("volume-info", str(tmp_path / "s"), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["shape_ijk"] == [24, 20, 6]
    assert data["spacing"] == [0.9, 0.8, 2.5]
    assert data["modality"] == "CT"
    converted = segnode("convert", str(tmp_path / "s"), str(tmp_path / "ct.nii.gz"))
    assert converted.returncode == 0, converted.stderr
    image = nib.load(tmp_path / "ct.nii.gz")
    assert image.shape == (24, 20, 6)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), ramp_volume().array)


def test_refusal_is_one_line_and_exit_1(tmp_path: Path) -> None:
    write_series(ramp_volume(), tmp_path / "s", SeriesInfo(uid_seed="cli"))
    (tmp_path / "s" / "IM00003.dcm").unlink()
    result = segnode("volume-info", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "gap in slice positions" in result.stderr and "[missing_slices]" in result.stderr


def test_run_with_the_liver_vessel_flags_splits_the_phantom_trees(tmp_path: Path) -> None:
    """Organ labels without the intrahepatic vessels in; vessels found in the CT and split into two trees."""
    import json as _json

    from node.nifti import read_nifti, write_nifti
    from node.phantom import PhantomSpec, write_phantom

    # TINY's 3.2 x 6 mm voxels blur the thin branches below what CT enhancement can find.
    paths = write_phantom(PhantomSpec(size=(128, 128, 80), spacing=(1.6, 1.6, 3.0)), tmp_path / "phantom")
    truth = read_nifti(paths["labels"])
    support = truth.array.copy()
    support[np.isin(support, [201, 202])] = 5  # the liver as TotalSegmentator gives it: vessels included
    write_nifti(truth.with_array(support), tmp_path / "support.nii.gz")
    result = segnode(
        "run", str(paths["dicom"]), str(tmp_path / "out"), "--engine", "labelmap",
        "--labels", str(tmp_path / "support.nii.gz"), "--split_portal_hepatic", "--no_skeleton",
        "--min_component_size", "5",
    )
    assert result.returncode == 0, result.stderr
    report = _json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["load", "segment", "liver_vessels", "write"]
    qc = report["qc"]["liver_vessels"]
    assert qc["min_component_size"] == 5
    assert qc["portal_hepatic_split_qc"]["use_skeleton"] is False
    labels = read_nifti(tmp_path / "out" / "labels.nii.gz").array
    found = np.isin(labels, [201, 202]) & np.isin(truth.array, [201, 202])
    agree = (labels[found] == truth.array[found]).mean()
    assert found.sum() > 0.85 * np.isin(truth.array, [201, 202]).sum()
    assert agree >= 0.95


def test_outbox_status_before_anything_was_queued_and_tables_not_cut_in_a_pipe(tmp_path: Path) -> None:
    import os

    name = "archive-of-the-radiology-department-main-building-second-floor"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[[destinations]]\nname = "{name}"\nkind = "folder"\npath = "{tmp_path / "out"}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    shown = subprocess.run([sys.executable, "-m", "node", "--config", str(config), "outbox", "status"], cwd=REPO,
                           capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if name in line)  # one line, not folded at 80
    assert len(row) > 100 and [c.strip() for c in row.split("│")[1:-1]][:7] == [
        name, "folder", "0", "0", "0", "0", "0"]
    as_json = subprocess.run([sys.executable, "-m", "node", "--config", str(config), "outbox", "status", "--json"],
                             cwd=REPO, capture_output=True, text=True, env=env)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)[0]["destination"] == name
