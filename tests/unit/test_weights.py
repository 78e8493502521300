"""TotalSegmentator weights (which datasets a run needs, offline import, status) and its class table.

All of it reads the installed TotalSegmentator's tables (2.18.0, pinned in the `seg` extra); none of
it loads torch. The values asserted are that version's: a newer TotalSegmentator that changes its
datasets should make these tests say so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("totalsegmentator")

from node.classes import Code  # noqa: E402
from node.segment import snomed  # noqa: E402
from node.segment.weights import (  # noqa: E402
    WeightsError,
    dataset_folder,
    import_weights,
    installed_datasets,
    required_datasets,
    results_dir,
    task_status,
)

REPO = Path(__file__).resolve().parents[2]
D297 = "Dataset297_TotalSegmentator_total_3mm_1559subj"
D298 = "Dataset298_TotalSegmentator_total_6mm_1559subj"
MODEL = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"


def segnode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True)


def weights_zip(path: Path, dataset: str = D297, prefix: str = "", payload: bytes = b"weights") -> Path:
    """A zip shaped like TotalSegmentator's releases: one dataset folder with a model inside."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}{dataset}/", "")
        zf.writestr(f"{prefix}{dataset}/{MODEL}/plans.json", "{}")
        zf.writestr(f"{prefix}{dataset}/{MODEL}/dataset.json", "{}")
        zf.writestr(f"{prefix}{dataset}/{MODEL}/fold_0/checkpoint_final.pth", payload)
    return path


# --------------------------------------------------------------------------- which datasets


@pytest.mark.parametrize(
    ("task", "kwargs", "ids"),
    [
        ("total", {}, [291, 292, 293, 294, 295]),
        ("total", {"fast": True}, [297]),
        ("total", {"fastest": True}, [298]),
        # the crop model, then every part: python_api downloads all five before it predicts the roi's
        ("total", {"roi_subset": ("liver",)}, [298, 291, 292, 293, 294, 295]),
        ("total", {"roi_subset": ("liver", "vertebrae_L1")}, [298, 291, 292, 293, 294, 295]),
        ("total", {"fast": True, "roi_subset": ("liver",)}, [298, 297]),
        ("total", {"fast": True, "roi_subset": ("liver",), "robust_crop": True}, [297]),
        ("liver_vessels", {}, [298, 8]),
        ("liver_vessels", {"robust_crop": True}, [297, 8]),
        ("total_mr", {"fast": True}, [852]),
        ("total_mr", {"roi_subset": ("liver",)}, [852, 850, 851]),  # MR always crops with its 3 mm model
        ("lung_vessels", {}, [297, 117]),  # robust_crop is this task's own default
        ("vertebrae_pp_refined", {}, [803, 305]),
    ],
)
def test_required_datasets_follow_totalsegmentators_task_config(task, kwargs, ids) -> None:
    assert required_datasets(task, **kwargs) == ids


def test_dataset_folders_and_refusals() -> None:
    assert dataset_folder(297) == D297
    assert dataset_folder(8) == "Dataset008_HepaticVessel"
    with pytest.raises(WeightsError) as caught:
        required_datasets("liver_vessels", fast=True)
    assert caught.value.code == "bad_request"
    with pytest.raises(WeightsError) as caught:
        required_datasets("no_such_task")
    assert caught.value.code == "unknown_task"


# --------------------------------------------------------------------------- import


def test_import_zip_is_idempotent_and_replaces_changed_content(tmp_path: Path) -> None:
    home = tmp_path / "home"
    archive = weights_zip(tmp_path / f"{D297}.zip")

    first = import_weights(archive, home)
    assert [(d.name, d.action) for d in first] == [(D297, "installed")]
    assert first[0].note.startswith("used by: total --fast, ")
    checkpoint = results_dir(home) / D297 / MODEL / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.read_bytes() == b"weights"

    again = import_weights(archive, home)
    assert [(d.name, d.action) for d in again] == [(D297, "unchanged")]

    newer = weights_zip(tmp_path / "newer.zip", payload=b"other weights")
    assert [(d.name, d.action) for d in import_weights(newer, home)] == [(D297, "replaced")]
    assert checkpoint.read_bytes() == b"other weights"
    assert installed_datasets(home) == [D297]  # no staging or old folders left behind
    assert sorted(p.name for p in results_dir(home).iterdir()) == [D297]


def test_import_finds_datasets_below_a_top_folder_and_in_a_folder_of_zips(tmp_path: Path) -> None:
    home = tmp_path / "home"
    source = tmp_path / "downloads"
    source.mkdir()
    weights_zip(source / "a.zip", D297, prefix="weights/")
    unpacked = source / D298 / MODEL / "fold_0"
    unpacked.mkdir(parents=True)
    (unpacked / "checkpoint_final.pth").write_bytes(b"6mm")
    (source / "README.txt").write_text("not weights")

    imported = import_weights(source, home)
    assert sorted((d.name, d.action) for d in imported) == [(D297, "installed"), (D298, "installed")]
    assert (results_dir(home) / D298 / MODEL / "fold_0" / "checkpoint_final.pth").read_bytes() == b"6mm"
    # A dataset folder can be given directly too.
    assert [(d.name, d.action) for d in import_weights(source / D298, home)] == [(D298, "unchanged")]


def test_import_refuses_what_is_not_a_weights_archive(tmp_path: Path) -> None:
    home = tmp_path / "home"
    empty = tmp_path / "other.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("notes/readme.txt", "hello")
    with pytest.raises(WeightsError) as caught:
        import_weights(empty, home)
    assert caught.value.code == "no_datasets"
    assert str(caught.value).startswith(
        f"{empty}: no DatasetNNN_* folder inside; expected a TotalSegmentator weights zip"
    )

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr(f"{D297}/../../escaped.txt", "x")
    with pytest.raises(WeightsError) as caught:
        import_weights(evil, home)
    assert caught.value.code == "unsafe_zip"
    assert not (tmp_path / "escaped.txt").exists()

    text = tmp_path / "weights.zip"
    text.write_text("not a zip")
    with pytest.raises(WeightsError) as caught:
        import_weights(text, home)
    assert caught.value.code == "bad_zip"

    with pytest.raises(WeightsError) as caught:
        import_weights(tmp_path / "absent.zip", home)
    assert caught.value.code == "not_found"
    assert installed_datasets(home) == []


def test_status_reports_modes_ready_once_their_datasets_are_there(tmp_path: Path) -> None:
    home = tmp_path / "home"
    before = {s.task: s for s in task_status(home)}
    assert before["total"].ready_modes == []
    assert [m.mode for m in before["total"].modes] == ["default", "fast", "fastest"]
    assert before["liver_vessels"].modes[0].missing == (D298, "Dataset008_HepaticVessel")
    assert before["coronary_arteries"].license_required is True

    import_weights(weights_zip(tmp_path / "a.zip", D297), home)
    import_weights(weights_zip(tmp_path / "b.zip", D298), home)
    after = {s.task: s for s in task_status(home)}
    assert after["total"].ready_modes == ["fast", "fastest"]
    assert after["liver_vessels"].modes[0].missing == ("Dataset008_HepaticVessel",)


def test_cli_import_and_status(tmp_path: Path) -> None:
    home = tmp_path / "home"
    archive = weights_zip(tmp_path / "w.zip")

    first = segnode("weights", "import", str(archive), "--weights-dir", str(home))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith(f"installed: {D297}  (used by: total --fast")
    second = segnode("weights", "import", str(archive), "--weights-dir", str(home))
    assert second.stdout.splitlines()[0].startswith(f"unchanged: {D297}")

    status = segnode("weights", "status", "--json", "--weights-dir", str(home))
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["totalsegmentator_version"] == "2.18.0"
    assert data["installed"] == [D297]
    total = next(t for t in data["tasks"] if t["task"] == "total")
    assert total["ready_modes"] == ["fast"]

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hello")
    refused = segnode("weights", "import", str(other), "--weights-dir", str(home))
    assert refused.returncode == 2
    assert "no DatasetNNN_* folder inside" in refused.stderr
    assert "[no_datasets]" in refused.stderr


# --------------------------------------------------------------------------- classes


def test_classes_come_from_totalsegmentators_snomed_mapping() -> None:
    classes = snomed.task_classes("total")
    assert len(classes) == 117
    liver = classes[5]
    assert (liver.name, liver.color, liver.category) == ("liver", (40, 140, 40), "Abdominal")
    assert liver.property_category == Code("123037004", "SCT", "Anatomical Structure")
    assert liver.property_type == Code("10200004", "SCT", "Liver")
    kidney_left = snomed.mapping()["kidney_left"]
    assert kidney_left.type_modifier == Code("7771000", "SCT", "Left")
    categories = {classes[i].name: classes[i].category for i in (1, 10, 31, 52, 64, 86, 90)}
    assert categories == {
        "spleen": "Abdominal", "lung_upper_lobe_left": "Thoracic", "vertebrae_L1": "Bone", "aorta": "Vessel",
        "portal_vein_and_splenic_vein": "Vessel", "autochthon_left": "Muscle", "brain": "Other",
    }
    subset = snomed.task_classes("total", ("liver", "aorta"))
    assert {i: c.name for i, c in subset.items()} == {5: "liver", 52: "aorta"}
    vessels = snomed.task_classes("liver_vessels")
    assert vessels[2].property_category == Code("49755003", "SCT", "Morphologically Altered Structure")


def test_a_structure_missing_from_the_mapping_still_gets_a_class() -> None:
    mr = snomed.task_classes("total_mr")
    vertebrae = next(c for c in mr.values() if c.name == "vertebrae")
    assert vertebrae.property_type is None and vertebrae.property_category is None
    assert vertebrae.category == "Bone"
    assert vertebrae.color == snomed.fallback_color(vertebrae.id)


def test_cielab_conversion_follows_dicom_scaling() -> None:
    assert snomed.cielab_to_rgb((65535, 32896, 32896)) == (255, 255, 255)
    assert snomed.cielab_to_rgb((0, 32896, 32896)) == (0, 0, 0)
    # dcmqi's liver colour (CIELab 34.6, 35.8, 29.6 scaled) is a dark red-brown
    r, g, b = snomed.cielab_to_rgb((22683, 42140, 40506))
    assert r > g and r > b
