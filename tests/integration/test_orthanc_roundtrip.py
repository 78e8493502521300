"""A synthetic CT series through a real Orthanc: C-STORE in (dcmtk storescu), DICOMweb WADO-RS
out, and C-STORE onwards to a real dcmtk storescp. Nothing may change on the way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo, write_series
from node.volume import Geometry, Volume
from tests.servers import HOST, OrthancServer, storescu

pytestmark = pytest.mark.integration

SLICES, ROWS, COLUMNS = 5, 32, 32


def synthetic_ct() -> Volume:
    """5 axial slices of 32 x 32: a ramp, a bright sphere and seeded noise, in HU."""
    k, j, i = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    array = -1000 + 31 * i + 17 * j + 97 * k
    array[(i - 12) ** 2 + (j - 18) ** 2 + 16 * (k - 2) ** 2 < 40] = 1500
    array += np.random.default_rng(20260101).integers(-20, 21, size=array.shape)
    geometry = Geometry(origin=(-120.5, 80.25, -310.0), spacing=(0.7, 0.8, 2.5))
    return Volume(array=array.astype(np.int16), geometry=geometry)


def by_sop_uid(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in paths]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def store_ct_series(orthanc: OrthancServer, tmp_path: Path) -> tuple[Path, dict[str, pydicom.Dataset], str]:
    """Write the synthetic CT, C-STORE it to Orthanc; returns (folder, datasets by UID, Orthanc series id)."""
    folder = tmp_path / "original"
    paths = write_series(synthetic_ct(), folder, SeriesInfo(uid_seed="segnode-orthanc-roundtrip"))
    originals = by_sop_uid(paths)
    assert len(originals) == SLICES
    first = next(iter(originals.values()))

    storescu(paths, HOST, orthanc.dicom_port, orthanc.aet)

    assert orthanc.instance_count() == SLICES
    statistics = orthanc.rest_get("/statistics")
    assert (statistics["CountStudies"], statistics["CountSeries"]) == (1, 1)
    [series_id] = orthanc.rest_get("/series")
    series = orthanc.rest_get(f"/series/{series_id}")
    assert series["MainDicomTags"]["SeriesInstanceUID"] == first.SeriesInstanceUID
    assert len(series["Instances"]) == SLICES
    study = orthanc.rest_get(f"/studies/{series['ParentStudy']}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == first.StudyInstanceUID
    stored = [orthanc.rest_get(f"/instances/{i}") for i in series["Instances"]]
    stored_uids = {instance["MainDicomTags"]["SOPInstanceUID"] for instance in stored}
    assert stored_uids == set(originals)
    return folder, originals, series_id


def test_storescu_to_orthanc_and_back_over_wado_rs(orthanc: OrthancServer, tmp_path: Path) -> None:
    folder, originals, _ = store_ct_series(orthanc, tmp_path)
    first = next(iter(originals.values()))

    study_uid, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID
    retrieved_paths = orthanc.wado_rs_series(study_uid, series_uid, tmp_path / "retrieved")

    assert len(retrieved_paths) == SLICES
    retrieved = by_sop_uid(retrieved_paths)
    assert set(retrieved) == set(originals)
    for uid, original in originals.items():
        back = retrieved[uid]
        assert back.SeriesInstanceUID == original.SeriesInstanceUID
        assert back.ImagePositionPatient == original.ImagePositionPatient
        assert back.PixelData == original.PixelData

    # The same Volume, read from what went in and from what came back.
    volume_in, volume_back = read_series(folder), read_series(tmp_path / "retrieved")
    np.testing.assert_array_equal(volume_back.array, volume_in.array)
    assert volume_back.geometry == volume_in.geometry
    assert volume_back.source == volume_in.source
    np.testing.assert_array_equal(volume_in.array, synthetic_ct().array)
    assert volume_in.geometry.same_grid(synthetic_ct().geometry, atol_mm=1e-6)


def test_orthanc_stores_onwards_to_storescp(orthanc_factory, storescp, tmp_path: Path) -> None:
    orthanc = orthanc_factory(modalities={"scp": [storescp.aet, HOST, storescp.port]})
    _, originals, series_id = store_ct_series(orthanc, tmp_path)

    answer = orthanc.rest_post("/modalities/scp/store", {"Resources": [series_id], "Synchronous": True})

    assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (SLICES, 0)
    assert (answer["LocalAet"], answer["RemoteAet"]) == (orthanc.aet, storescp.aet)
    received_paths = storescp.received_files()
    assert len(received_paths) == SLICES
    received = by_sop_uid(received_paths)
    assert set(received) == set(originals)
    for uid, original in originals.items():
        assert received[uid].PixelData == original.PixelData
