"""The totalsegmentator engine through TotalSegmentator's real code path, with tiny synthetic weights.

tests/totalseg_weights.py writes nnU-Net v2 checkpoints where TotalSegmentator looks for them; each
is a real PlainConvUNet whose weights make it an exact HU lookup (liver 30..149 HU, portal vein
>= 150 HU in the ``total`` models; liver_vessels >= 150 HU and liver_tumor 10..29 HU in
liver_vessels' model; the same values, unnormalised, in ``total_mr``'s model). TotalSegmentator then
runs everything it normally does (its rough 6 mm crop model, resampling, canonical reorientation,
cropping, nnU-Net's preprocessing, sliding window and export in worker processes, roi_subset
filtering), and every voxel of the result is asserted.

The phantom is built here, on a 3 mm grid: the 3 mm ``total --fast`` model and liver_vessels' model
(whose plans say 3 mm) then see the input's own voxels, so the expected labels are exact. (node's
phantom TINY is 3.2 x 3.2 x 6 mm, which TotalSegmentator would resample.)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("totalsegmentator")
pytest.importorskip("torch")

from node.classes import Code  # noqa: E402
from node.segment import SegmentationError, SegmentRequest  # noqa: E402
from node.segment.totalseg import TotalSegmentatorEngine, load_totalsegmentator  # noqa: E402
from node.volume import Geometry, SeriesIdentity, Volume  # noqa: E402
from tests.totalseg_weights import install_for_task, write_dataset  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BACKGROUND_HU, LIVER_HU, VESSEL_HU, TUMOUR_HU = -50, 100, 200, 20
LIVER, PORTAL_VEIN = 5, 64  # TotalSegmentator's `total` ids
LIVER_VESSELS, LIVER_TUMOR = 1, 2  # its `liver_vessels` ids

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
#: Columns along +x (left), rows along -z (feet), slices along +y (posterior): a coronal stack.
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))


def block_phantom(direction=AXIAL) -> Volume:
    """64 x 40 x 40 voxels of 3 mm: a liver block holding a vessel and a tumour, and a vessel far away.

    In [k, j, i]: liver k,j 8..31, i 4..27; intrahepatic vessel k,j 18..21, i 10..21 (192 voxels);
    tumour k,j 10..13, i 6..9 (64 voxels); a distant vessel k 8..31, j 18..21, i 56..59 (384 voxels),
    28 voxels beyond the liver, outside liver_vessels' crop (liver bounding box + 20 voxels).
    """
    a = np.full((40, 40, 64), BACKGROUND_HU, dtype=np.int16)
    a[8:32, 8:32, 4:28] = LIVER_HU
    a[18:22, 18:22, 10:22] = VESSEL_HU
    a[10:14, 10:14, 6:10] = TUMOUR_HU
    a[8:32, 18:22, 56:60] = VESSEL_HU
    source = SeriesIdentity(
        study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3", modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    return Volume(a, Geometry(origin=(-96.0, -60.0, 40.0), spacing=(3.0, 3.0, 3.0), direction=direction), source)


@pytest.fixture(scope="module")
def weights_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TotalSegmentator home holding every dataset the runs below load: 297, 298, 8 and 852."""
    home = tmp_path_factory.mktemp("totalseg-home")
    ids = set(install_for_task(home, "total", fast=True))
    ids |= set(install_for_task(home, "total", fast=True, roi_subset=("liver",)))
    ids |= set(install_for_task(home, "liver_vessels"))
    ids |= set(install_for_task(home, "total_mr", fast=True))
    assert ids == {297, 298, 8, 852}
    return home


def run(home: Path, volume: Volume, **kwargs) -> object:
    kwargs = {"engine": "totalsegmentator", "weights_dir": home, "threads": 2, "device": "cpu", **kwargs}
    request = SegmentRequest(**kwargs)
    return TotalSegmentatorEngine().segment(volume, request)


def test_total_fast_labels_every_voxel_on_the_input_grid(weights_home: Path) -> None:
    volume = block_phantom(CORONAL)
    result = run(weights_home, volume, task="total", fast=True)

    expected = np.zeros(volume.array.shape, dtype=np.uint8)
    expected[volume.array == LIVER_HU] = LIVER
    expected[volume.array == VESSEL_HU] = PORTAL_VEIN
    assert result.array.dtype == np.uint8
    assert np.array_equal(result.array, expected)
    assert result.geometry == volume.geometry
    assert result.source == volume.source
    assert result.present_ids() == [LIVER, PORTAL_VEIN]
    assert result.notes[0] == (
        "TotalSegmentator 2.18.0 task total --fast; datasets 297; device cpu; threads 2"
    )
    # Every `total` class is in the table, named and coded from TotalSegmentator's own mapping.
    assert len(result.classes) == 117
    liver = result.classes[LIVER]
    assert (liver.name, liver.color, liver.category) == ("liver", (40, 140, 40), "Abdominal")
    assert liver.property_category == Code("123037004", "SCT", "Anatomical Structure")
    assert liver.property_type == Code("10200004", "SCT", "Liver")
    portal = result.classes[PORTAL_VEIN]
    assert (portal.name, portal.color, portal.category) == ("portal_vein_and_splenic_vein", (0, 90, 220), "Vessel")
    # Usage statistics stay off.
    config = json.loads((weights_home / "config.json").read_text())
    assert config["send_usage_stats"] is False


def test_roi_subset_crops_with_the_6mm_model_and_keeps_only_the_subset(weights_home: Path) -> None:
    volume = block_phantom()
    result = run(weights_home, volume, task="total", fast=True, roi_subset=("liver",))

    expected = np.where(volume.array == LIVER_HU, LIVER, 0).astype(np.uint8)
    assert np.array_equal(result.array, expected)  # the vessels (64 in the 3 mm model) are filtered out
    assert list(result.classes) == [LIVER]
    assert "datasets 298, 297" in result.notes[0]


def test_liver_vessels_runs_inside_the_liver_crop_only(weights_home: Path) -> None:
    volume = block_phantom()
    result = run(weights_home, volume, task="liver_vessels")

    expected = np.zeros(volume.array.shape, dtype=np.uint8)
    expected[18:22, 18:22, 10:22] = LIVER_VESSELS  # the vessel inside the liver
    expected[10:14, 10:14, 6:10] = LIVER_TUMOR
    # The distant vessel (same HU) lies outside the crop TotalSegmentator takes around the liver
    # found by the 6 mm `total` model, so liver_vessels' model never sees it.
    assert np.array_equal(result.array, expected)
    assert int((result.array == LIVER_VESSELS).sum()) == 192
    assert {i: c.name for i, c in result.classes.items()} == {1: "liver_vessels", 2: "liver_tumor"}
    assert result.classes[LIVER_VESSELS].category == "Vessel"
    assert "datasets 298, 8" in result.notes[0]


def test_total_mr_fast_uses_the_mr_model_and_its_class_map(weights_home: Path) -> None:
    ct = block_phantom()
    volume = Volume(ct.array.copy(), ct.geometry, replace(ct.source, modality="MR"))
    result = run(weights_home, volume, task="total_mr", fast=True)

    # The fixture's MR model has no intensity normalisation, so the same lookup applies; `total_mr`
    # numbers its classes its own way (liver 5, portal_vein_and_splenic_vein 25).
    expected = np.zeros(volume.array.shape, dtype=np.uint8)
    expected[volume.array == LIVER_HU] = 5
    expected[volume.array == VESSEL_HU] = 25
    assert np.array_equal(result.array, expected)
    assert result.classes[25].name == "portal_vein_and_splenic_vein"
    assert len(result.classes) == 50
    assert "datasets 852" in result.notes[0]


def test_missing_weights_name_the_task_the_folders_and_the_import_command(tmp_path: Path) -> None:
    volume = block_phantom()
    with pytest.raises(SegmentationError) as caught:
        run(tmp_path, volume, task="total", fast=True)
    assert caught.value.code == "weights_missing"
    message = str(caught.value)
    assert message.startswith("TotalSegmentator task 'total' --fast needs weights that are not installed in ")
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in message
    assert "segnode weights import ZIP|DIR" in message

    # liver_vessels with only its own model: the missing crop model is named, and only it.
    write_dataset(tmp_path, 8)
    with pytest.raises(SegmentationError) as caught:
        run(tmp_path, volume, task="liver_vessels")
    assert caught.value.code == "weights_missing"
    assert "Dataset298_TotalSegmentator_total_6mm_1559subj" in str(caught.value)
    assert "Dataset008_HepaticVessel" not in str(caught.value)


def test_totalsegmentator_itself_cannot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = load_totalsegmentator()
    from totalsegmentator import libs

    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    for download in (api.download_pretrained_weights, libs.download_pretrained_weights):
        with pytest.raises(SegmentationError) as caught:
            download(298)
        assert caught.value.code == "weights_missing"
        assert "Dataset298_TotalSegmentator_total_6mm_1559subj" in str(caught.value)
    with pytest.raises(SegmentationError):
        libs.download_url_and_unpack("https://example.invalid/x.zip", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written, not even an empty results folder


def test_bad_requests_are_refused_before_any_run(weights_home: Path) -> None:
    volume = block_phantom()
    cases = [
        (dict(task="no_such_task"), "unknown_task"),
        (dict(task="liver_vessels", fast=True), "bad_request"),
        (dict(task="total", fast=True, fastest=True), "bad_request"),
        (dict(task="total", fast=True, roi_subset=("nonexistent_organ",)), "bad_request"),
        (dict(task="liver_vessels", roi_subset=("liver",)), "bad_request"),
        (dict(task="total", fast=True, device="cuda"), "bad_request"),
    ]
    for kwargs, code in cases:
        with pytest.raises(SegmentationError) as caught:
            run(weights_home, volume, **kwargs)
        assert caught.value.code == code, kwargs
