"""STOW-RS with dicomweb-client against the app on real HTTP, into a real receiver (spool + completion)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from node.config import Settings
from node.dicom.writer import SeriesInfo, series_datasets
from node.ingest import SeriesReady
from node.ingest.receiver import Receiver
from node.jobs import open_store
from node.web.app import AppContext, create_app
from node.web.stow import MultipartError, split_parts
from tests.integration.test_api import serve_in_thread
from tests.unit.test_series import ramp_volume

pytestmark = pytest.mark.integration

TOKEN = {"Authorization": "Bearer stow-token"}
REFERENCED, FAILED, REASON = "ReferencedSOPSequence", "FailedSOPSequence", "FailureReason"


@pytest.fixture
def stow(tmp_path: Path) -> Iterator[tuple[str, DICOMwebClient, list[SeriesReady], Path]]:
    settings = Settings(node={"data_dir": tmp_path / "data"}, http={"tokens": {"t": "stow-token"}, "max_upload_mb": 1},
                        ingest={"fsync": False, "quiet_seconds": 60})
    ready: list[SeriesReady] = []
    receiver = Receiver.from_settings(settings, ready.append)
    receiver.start(timer=False)
    store = open_store(settings)
    app = create_app(AppContext(settings, store, lambda *a: None, receiver))
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever *_proxy says
    with serve_in_thread(app) as url:
        yield url, DICOMwebClient(f"{url}/dicomweb", session=session, headers=TOKEN), ready, tmp_path / "data"
    receiver.close()
    store.close()


def ct(slices: int = 4, seed: str = "stow") -> list[pydicom.Dataset]:
    return series_datasets(ramp_volume(shape=(slices, 8, 8)), SeriesInfo(uid_seed=seed))


def spooled(data_dir: Path, ds: pydicom.Dataset) -> list[str]:
    folder = data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_all_stored_is_200_and_the_series_completes(stow) -> None:
    _, client, ready, data = stow
    datasets = ct()
    response = client.store_instances(datasets)
    assert [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in datasets]
    assert {item.ReferencedSOPClassUID for item in response.ReferencedSOPSequence} == {datasets[0].SOPClassUID}
    assert FAILED not in response
    assert spooled(data, datasets[0]) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)
    assert [(r.series_uid, r.instance_count, r.reason, r.sender.via, r.generation) for r in ready] == [
        (datasets[0].SeriesInstanceUID, 4, "complete", "stow", 1)]


def test_two_posts_of_one_series_join(stow) -> None:
    _, client, ready, data = stow
    datasets = ct()
    client.store_instances(datasets[:2])
    assert ready == []  # ImagesInAcquisition says 4: not complete yet
    client.store_instances(datasets[2:], study_instance_uid=datasets[0].StudyInstanceUID)
    assert len(spooled(data, datasets[0])) == 4
    assert [(r.series_uid, r.instance_count, r.folder.name) for r in ready] == [
        (datasets[0].SeriesInstanceUID, 4, datasets[0].SeriesInstanceUID)]


def test_partial_is_202_and_none_is_409(stow) -> None:
    _, client, _, data = stow
    ours, other = ct(2), ct(2, seed="other-study")
    response = client.store_instances([*ours, other[0]], study_instance_uid=ours[0].StudyInstanceUID)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [d.SOPInstanceUID for d in ours]
    (failed,) = response.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (other[0].SOPInstanceUID, 0xC409)
    assert response.RetrieveURL.endswith(f"/dicomweb/studies/{ours[0].StudyInstanceUID}")
    assert spooled(data, other[0]) == []
    with pytest.raises(requests.HTTPError) as raised:
        client.store_instances(other, study_instance_uid=ours[0].StudyInstanceUID)
    answer = raised.value.response
    assert answer.status_code == 409
    assert answer.headers["content-type"] == "application/dicom+json"
    body = pydicom.Dataset.from_json(answer.json())
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in body.FailedSOPSequence] == [
        (d.SOPInstanceUID, 0xC409) for d in other]
    assert REFERENCED not in body
    assert answer.headers["warning"].count(f"0xC409: the instance belongs to study {other[0].StudyInstanceUID}, "
                                           f"not to {ours[0].StudyInstanceUID} of the URL") == 2


def encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(parts: list[bytes], boundary: str = "b0und", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


RELATED = 'multipart/related; type="application/dicom"; boundary=b0und'


def test_bad_instances_are_failed_items_with_their_reason(stow) -> None:
    url, _, _, _ = stow
    good = ct(1)[0]
    truncated = encode(good)[:-100]
    with httpx.Client(base_url=url, trust_env=False, headers=TOKEN) as http:
        response = http.post("/dicomweb/studies", content=multipart([encode(good), truncated, b"not dicom"]),
                             headers={"Content-Type": RELATED})
    assert response.status_code == 202
    body = pydicom.Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in body.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert [i.FailureReason for i in body.FailedSOPSequence] == [0xC000, 0xC000]
    assert body.FailedSOPSequence[0].ReferencedSOPInstanceUID == good.SOPInstanceUID
    assert not body.FailedSOPSequence[1].get("ReferencedSOPInstanceUID")  # not DICOM: no UID to name
    # The reasons in words: one Warning header per failed instance (RFC 7234 5.5, PS3.18 13.4.3.2)
    agent = url.removeprefix("http://")
    assert response.headers.get_list("warning") == [
        f'299 {agent} "{good.SOPInstanceUID}: 0xC000: dataset is truncated or malformed: (7FE0,0010) needs 128 '
        'bytes, the data ends first"',
        f'299 {agent} "part 3: 0xC000: not a DICOM Part 10 file (no DICM prefix at byte 128)"']


def test_wrong_media_type_415_too_large_413_malformed_400(stow) -> None:
    url, _, _, _ = stow
    part = encode(ct(1)[0])
    with httpx.Client(base_url=url, trust_env=False, headers=TOKEN) as http:
        def post(body: bytes, content_type: str, path: str = "/dicomweb/studies") -> httpx.Response:
            return http.post(path, content=body, headers={"Content-Type": content_type})

        assert post(part, "application/dicom").status_code == 415
        wrong = post(multipart([part]), 'multipart/related; type="application/dicom+json"; boundary=b0und')
        assert (wrong.status_code, wrong.json()) == (
            415, {"error": "only application/dicom parts are accepted, got type='application/dicom+json'"})
        big = multipart([part] * 800)  # ~1.3 MB, over max_upload_mb = 1
        assert len(big) > 1024 * 1024
        assert post(big, RELATED).status_code == 413
        streamed = http.post("/dicomweb/studies", content=iter([big[:600_000], big[600_000:]]),
                             headers={"Content-Type": RELATED})  # chunked: no Content-Length
        assert streamed.status_code == 413
        assert post(multipart([part], close=False), RELATED).json() == {
            "error": "multipart body has no close delimiter"}
        assert post(multipart([part]), "multipart/related; type=\"application/dicom\"").status_code == 400
        assert post(b"", RELATED).status_code == 400
        assert post(b"--b0und--\r\n", RELATED).json() == {"error": "multipart body has no parts"}
        assert post(multipart([part]), RELATED).status_code == 200


def test_split_parts_offsets() -> None:
    body = b"preamble\r\n--xy\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--xy  \r\n\r\nBB\r\n--xy--"
    parts = [(h, body[s:e]) for h, s, e in split_parts(body, "xy")]
    assert parts == [({"content-type": "application/dicom"}, b"AAA"), ({}, b"BB")]
    with pytest.raises(MultipartError, match="no multipart boundary"):
        list(split_parts(b"nothing here", "xy"))
