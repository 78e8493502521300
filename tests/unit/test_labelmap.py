"""The labelmap engine: the user's labels, named and placed exactly on the series grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from node.classes import Code, LabelVolume
from node.nifti import read_nifti, write_nifti
from node.phantom import CLASSES, TINY, write_phantom
from node.segment import SegmentationError, SegmentRequest
from node.segment import labelmap
from node.segment.labelmap import LabelmapEngine, place_on_grid, read_class_table, write_class_table
from node.segment.snomed import SnomedEntry
from node.segment.threshold import CLASSES as THRESHOLD_CLASSES
from node.volume import Geometry, Volume

SHARED = Path("/work/shared/data/totalsegmentator")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_phantom(TINY, tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def ct(phantom: dict[str, Path]) -> Volume:
    return read_nifti(phantom["ct"])


@pytest.fixture(scope="module")
def truth(phantom: dict[str, Path]) -> np.ndarray:
    return read_nifti(phantom["labels"]).array


def mask_folder(truth: np.ndarray, geometry: Geometry, folder: Path, classes_json: bool) -> Path:
    """TotalSegmentator-style output: one binary mask per class, named after it."""
    folder.mkdir()
    for c in CLASSES.values():
        write_nifti(Volume((truth == c.id).astype(np.uint8), geometry), folder / f"{c.name}.nii.gz")
    if classes_json:
        write_class_table(CLASSES, folder / "classes.json")
    return folder


def segment(volume: Volume, path: Path, **kwargs) -> LabelVolume:
    return LabelmapEngine().segment(volume, SegmentRequest(engine="labelmap", labels_path=path, **kwargs))


def test_multilabel_with_sidecar_reproduces_the_truth(phantom, ct, truth) -> None:
    labels = segment(ct, phantom["labels"])
    np.testing.assert_array_equal(labels.array, truth)
    assert labels.geometry == ct.geometry
    assert {i: c.name for i, c in labels.classes.items()} == {i: c.name for i, c in CLASSES.items()}
    assert labels.classes[52].color == CLASSES[52].color and labels.classes[52].category == "Vessel"
    assert labels.notes == ["labels are on the series grid", "class names from classes.json"]


def test_mask_folder_with_classes_json_reproduces_the_truth(tmp_path, ct, truth) -> None:
    folder = mask_folder(truth, ct.geometry, tmp_path / "seg", classes_json=True)
    labels = segment(ct, folder)
    np.testing.assert_array_equal(labels.array, truth)
    assert {i: c.name for i, c in labels.classes.items()} == {i: c.name for i, c in CLASSES.items()}


def test_mask_folder_without_totalsegmentator_is_numbered_in_file_order(
    tmp_path, ct, truth, monkeypatch
) -> None:
    monkeypatch.setattr(labelmap, "totalsegmentator_class_map", lambda task: None)
    labels = segment(ct, mask_folder(truth, ct.geometry, tmp_path / "seg", classes_json=False))
    names = sorted(c.name for c in CLASSES.values())
    assert {c.name: i for i, c in labels.classes.items()} == {n: i for i, n in enumerate(names, 1)}
    by_name = {c.name: i for i, c in labels.classes.items()}
    for c in CLASSES.values():  # the same voxels under the new ids
        np.testing.assert_array_equal(labels.array == by_name[c.name], truth == c.id)
    assert any("numbered 1..21 in sorted file-name order" in n for n in labels.notes)


def test_mask_folder_takes_totalsegmentator_ids_when_it_is_there(tmp_path, ct, truth, monkeypatch) -> None:
    # Part of TotalSegmentator's `total` map; our two intrahepatic classes are not in it.
    total = {c.id: c.name for c in CLASSES.values() if c.id < 200}
    monkeypatch.setattr(labelmap, "totalsegmentator_class_map", lambda t: total if t == "total" else None)
    labels = segment(ct, mask_folder(truth, ct.geometry, tmp_path / "seg", classes_json=False))
    expected = {**total, 90: "hepatic_veins", 91: "portal_vein_branches"}  # numbered after the map's last id
    assert {i: c.name for i, c in labels.classes.items()} == expected
    np.testing.assert_array_equal(labels.array == 90, truth == 202)
    np.testing.assert_array_equal(
        np.where(truth < 200, truth, 0), np.where(labels.array < 90, labels.array, 0)
    )


def test_overlapping_masks_give_voxels_to_the_smaller_structure(tmp_path, ct, truth) -> None:
    folder = tmp_path / "seg"
    folder.mkdir()
    liver = np.isin(truth, (5, 201, 202))  # TotalSegmentator's liver includes its vessels
    write_nifti(Volume(liver.astype(np.uint8), ct.geometry), folder / "liver.nii.gz")
    write_nifti(Volume((truth == 202).astype(np.uint8), ct.geometry), folder / "hepatic_veins.nii.gz")
    (folder / "classes.json").write_text(json.dumps({"5": "liver", "202": "hepatic_veins"}))
    labels = segment(ct, folder)
    np.testing.assert_array_equal(labels.array == 202, truth == 202)
    np.testing.assert_array_equal(labels.array == 5, np.isin(truth, (5, 201)))
    claimed = int((truth == 202).sum())
    assert f"{claimed} voxel(s) claimed by more than one mask went to the smaller structure" in labels.notes


def test_coarser_grid_is_resampled_nearest_neighbour() -> None:
    series = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    coarse = Geometry(origin=(0.25, 0.25, 0.25), spacing=(2.0, 2.0, 2.0))
    array = np.zeros((10, 10, 10), np.uint8)
    array[3:6, 3:6, 3:6] = 7  # covers [0.25 + 2.5 * 2, 0.25 + 5.5 * 2) = [5.25, 11.25) mm on each axis
    placed, how = place_on_grid(Volume(array, coarse), series, (20, 20, 20))
    expected = np.zeros((20, 20, 20), np.uint8)
    expected[6:12, 6:12, 6:12] = 7  # voxel centres 6..11 mm
    np.testing.assert_array_equal(placed, expected)
    assert how.startswith("labels resampled nearest-neighbour from 10x10x10 voxels of 2x2x2 mm")


def test_flipped_and_shifted_nifti_lands_on_the_same_voxels(tmp_path) -> None:
    """The same cube stored as another tool might: x reversed, coarser in z, a larger field of view."""
    grid = Geometry(origin=(-8.0, -8.0, -12.0), spacing=(1.0, 1.0, 2.0))
    series = Volume(np.zeros((12, 16, 16), np.int16), grid)
    other = Geometry(origin=(9.0, -10.0, -13.0), spacing=(1.0, 1.0, 4.0),
                     direction=((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    array = np.zeros((8, 24, 24), np.uint8)
    # x (LPS) from -2 to 3 mm is i = 9 - x = 6..11; y from -4 to 1 mm is j = y + 10 = 6..11;
    # z slabs 1..2 cover [-13 + 0.5 * 4, -13 + 2.5 * 4) = [-11, -3) mm.
    array[1:3, 6:12, 6:12] = 3
    write_nifti(Volume(array, other), tmp_path / "labels.nii.gz")
    (tmp_path / "classes.json").write_text(json.dumps([{"id": 3, "name": "cube"}]))
    labels = segment(series, tmp_path / "labels.nii.gz")
    expected = np.zeros(series.array.shape, np.uint8)
    # series voxel centres: x = i - 8 in -2..3 -> i 6..11; y = j - 8 in -4..1 -> j 4..9;
    # z = 2k - 12 in [-11, -3) -> k 1..4 (z = -10, -8, -6, -4)
    expected[1:5, 4:10, 6:12] = 3
    np.testing.assert_array_equal(labels.array, expected)
    assert labels.classes[3].name == "cube"


def test_labels_elsewhere_are_refused(tmp_path, ct) -> None:
    far = Geometry(origin=(1000.0, 0.0, 0.0), spacing=ct.geometry.spacing)
    write_nifti(Volume(np.ones((4, 4, 4), np.uint8), far), tmp_path / "far.nii.gz")
    with pytest.raises(SegmentationError) as exc:
        segment(ct, tmp_path / "far.nii.gz")
    assert exc.value.code == "no_overlap"
    assert "do not overlap the series" in str(exc.value)


@pytest.mark.parametrize(
    ("name", "content", "code"),
    [
        ("missing.nii.gz", None, "labels_not_found"),
        ("fractional.nii.gz", np.full((4, 4, 4), 0.5, np.float32), "bad_labels"),
        ("negative.nii.gz", np.full((4, 4, 4), -1, np.int16), "bad_labels"),
        ("broken.nii.gz", b"not a nifti", "bad_labels"),
        ("labels.txt", b"1 2 3", "unsupported_labels"),
    ],
)
def test_bad_labels_are_refused(tmp_path, ct, name, content, code) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        write_nifti(Volume(content, ct.geometry), path)
    with pytest.raises(SegmentationError) as exc:
        segment(ct, path)
    assert exc.value.code == code
    with pytest.raises(SegmentationError) as exc:
        LabelmapEngine().segment(ct, SegmentRequest(engine="labelmap"))
    assert exc.value.code == "no_labels"


def test_class_tables_in_three_shapes(tmp_path, monkeypatch) -> None:
    write_class_table(THRESHOLD_CLASSES, tmp_path / "ours.json")
    assert read_class_table(tmp_path / "ours.json") == THRESHOLD_CLASSES  # codes and colours round-trip
    # A table without codes (the phantom's) gets them from TotalSegmentator's mapping, by name.
    liver_code = Code("10200004", "SCT", "Liver")
    anatomical = Code("123037004", "SCT", "Anatomical Structure")
    entry = SnomedEntry("liver", anatomical, liver_code, None, None, None, (1, 2, 3))
    monkeypatch.setattr(labelmap, "_snomed_entry", lambda name: entry if name == "liver" else None)
    write_class_table(CLASSES, tmp_path / "phantom.json")
    table = read_class_table(tmp_path / "phantom.json")
    assert table[5].property_type == liver_code and table[5].color == CLASSES[5].color
    assert {i: (c.name, c.color, c.category) for i, c in table.items()} == {
        i: (c.name, c.color, c.category) for i, c in CLASSES.items()}
    (tmp_path / "map.json").write_text(json.dumps({"1": "spleen", "52": "aorta"}))
    simple = read_class_table(tmp_path / "map.json")
    assert (simple[1].name, simple[52].name, simple[52].category) == ("spleen", "aorta", "Vessel")
    metainfo = {"segmentAttributes": [[{
        "labelID": 1, "SegmentLabel": "Liver", "recommendedDisplayRGBValue": [221, 130, 101],
        "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Anatomical Structure"},
        "SegmentedPropertyTypeCodeSequence": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT",
                                              "CodeMeaning": "Liver"},
    }]]}
    (tmp_path / "metainfo.json").write_text(json.dumps(metainfo))
    liver = read_class_table(tmp_path / "metainfo.json")[1]
    assert (liver.name, liver.color, liver.category, liver.property_type.value) == (
        "Liver", (221, 130, 101), "Abdominal", "10200004")
    (tmp_path / "bad.json").write_text("[{\"name\": \"no id\"}]")
    with pytest.raises(SegmentationError) as exc:
        read_class_table(tmp_path / "bad.json")
    assert exc.value.code == "bad_classes"


@pytest.mark.skipif(not SHARED.exists(), reason="shared TotalSegmentator sample data not present")
def test_real_totalsegmentator_output_on_its_ct(monkeypatch) -> None:
    """TotalSegmentator's own regression output (41 classes) on its example CT: same grid, as-is."""
    monkeypatch.setattr(labelmap, "totalsegmentator_class_map", lambda task: None)
    ct = read_nifti(SHARED / "example_ct_sm.nii.gz")
    labels = segment(ct, SHARED / "example_seg.nii.gz")
    raw = np.asarray(nib.load(SHARED / "example_seg.nii.gz").dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(labels.array, raw)
    assert len(labels.classes) == 41 and labels.classes[5].name == "label_5"


def test_labels_of_part_of_the_series_are_refused_naming_both_extents(tmp_path) -> None:
    """Issue 16 item 6: a crop of the label map that kept the series' header (fewer slices) was placed on
    the wrong slices; labels must cover the series' grid (each edge short by at most one coarse voxel)."""
    grid = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0))
    series = Volume(np.zeros((40, 16, 16), np.int16), grid)
    write_nifti(Volume(np.ones((20, 16, 16), np.uint8), grid), tmp_path / "crop.nii.gz")
    with pytest.raises(SegmentationError) as exc:
        segment(series, tmp_path / "crop.nii.gz")
    assert exc.value.code == "labels_extent"
    assert str(exc.value) == (
        "the labels (16x16x20 voxels of 1x1x2 mm at (0.0, 0.0, 0.0)) do not cover the series (16x16x40 voxels "
        "of 1x1x2 mm at (0.0, 0.0, 0.0)): in the series' voxels they span i 0.0..16.0, j 0.0..16.0, k 0.0..20.0 "
        "of i 0..16, j 0..16, k 0..40 (allowed short by 2 mm at an edge); labels of part of the series cannot "
        "be placed on it")
    one_short = Volume(np.ones((39, 16, 16), np.uint8), grid)  # one slice short: within the tolerance
    placed, _ = place_on_grid(one_short, grid, (40, 16, 16))
    assert placed[:39].all() and not placed[39].any()
