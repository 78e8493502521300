"""The dashboard's and the editor's HTTP API over real HTTP (uvicorn on a free loopback port): pages,
auth, slices, saves into DICOM-SEG + outbox + annotation log, and every refusal with its message.

The node is the one the browser tests use (:mod:`tests.browser.fixtures`): a TINY phantom stored
through the ingest receiver, segmented by the threshold engine (with ``seg.dcm``), delivered by the
outbox to a folder destination.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from node.dicom.seg import read_seg
from node.dicom.series import read_series
from node.nifti import read_nifti
from node.phantom import PhantomSpec
from node.web.app import AppContext, create_app
from node.web.editor import windowed
from tests.browser.fixtures import DESTINATION, PATIENT, TOKENS, Node, running_node, serve_in_thread

pytestmark = pytest.mark.integration

OTHER = PhantomSpec(size=(64, 64, 40), spacing=(3.2, 3.2, 6.0), seed=3)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("node"), extra={"other": OTHER, "plain": OTHER, "newer": OTHER,
                                                                          "versions": OTHER}) as n:
        yield n


def client(node: Node, user: str | None = "alice", **kwargs) -> httpx.Client:
    headers = {"Authorization": f"Bearer {TOKENS[user]}"} if user else {}
    return httpx.Client(base_url=node.url, headers=headers, trust_env=False, timeout=30, **kwargs)


def plane_payload(plane: np.ndarray, *, encoding: str = "zlib") -> str:
    data = np.ascontiguousarray(plane, dtype="<u2").tobytes()
    return base64.b64encode(zlib.compress(data) if encoding == "zlib" else data).decode()


def png_pixels(data: bytes) -> np.ndarray:
    """Decodes the editor's 8-bit greyscale or RGB PNG (filter type 0 rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat = 8, b""
    while position < len(data):
        length, tag = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        assert struct.unpack(">I", data[position + 8 + length:position + 12 + length])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            columns, rows, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) in ((8, 0), (8, 2))
            samples = 3 if colour == 2 else 1
        elif tag == b"IDAT":
            idat += body
        position += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(rows, columns * samples + 1)
    assert not raw[:, 0].any()
    return raw[:, 1:] if samples == 1 else raw[:, 1:].reshape(rows, columns, 3)


def base_labels(node: Node):
    job = node.store.get(node.job_id)
    ct = read_series(Path(job.folder))
    return ct, read_seg(Path(job.results) / "seg.dcm", ct)


def test_pages_are_open_and_the_api_is_not(node: Node) -> None:
    with client(node, None) as http:
        for path in ("/", f"/edit/{node.series_uid}", "/edit/anything"):
            page = http.get(path)
            assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
            assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert http.get("/static/editor.js").headers["content-type"].split(";")[0] in (
            "text/javascript", "application/javascript")
        assert http.get("/static/nothing.js").status_code == 404
        for path in ("/api/dashboard", "/api/whoami", f"/api/edit/{node.series_uid}",
                     f"/api/edit/{node.series_uid}/image/0", "/api/annotations.csv",
                     f"/api/jobs/{node.job_id}/artifacts"):
            assert (http.get(path).status_code, http.get(path).json()) == (401, {"error": "authentication required"})
        assert http.post(f"/api/edit/{node.series_uid}/save", json={}).status_code == 401
        assert http.post("/", content=b"x").status_code == 401  # only GET/HEAD of pages are open
        expired = {"Authorization": "Bearer expired"}
        for path in (f"/api/edit/{node.series_uid}", f"/api/edit/{node.series_uid}/image/0",
                     f"/api/edit/{node.series_uid}/labels/0"):
            bad = http.get(path, headers=expired)
            assert (bad.status_code, bad.json()) == (401, {"error": "authentication required"}), path
        bad = http.post(f"/api/edit/{node.series_uid}/save", json={"base_version": 1}, headers=expired)
        assert (bad.status_code, bad.json()) == (401, {"error": "authentication required"})
    with client(node, "bob") as http:
        assert http.get("/api/whoami").json() == {"user": "bob", "auth": True}


def test_dashboard_api(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    with client(node) as http:
        data = http.get("/api/dashboard").json()
        job = next(j for j in data["jobs"] if j["id"] == node.job_id)
        listed = http.get(f"/api/jobs/{node.job_id}/artifacts").json()
        report = http.get(f"/api/jobs/{node.job_id}/artifacts/report.json")
        seg = http.get(f"/api/jobs/{node.job_id}/artifacts/seg.dcm")
        traversal = http.get(f"/api/jobs/{node.job_id}/artifacts/..%2F..%2Fjobs.db")
        missing = http.get("/api/jobs/nope/artifacts")
    assert data["queue"] == {"backend": "sqlite", "workers": 1, "depth": 0, "running": 0}
    assert data["destinations"] == [{"name": DESTINATION, "kind": "folder"}]
    assert data["user"] == "alice" and data["node"] == "segnode"
    assert [(o["destination"], o["kind"], o["failed"]) for o in data["outbox"]] == [(DESTINATION, "folder", 0)]
    assert (job["state"], job["rule"], job["engine"], job["artifacts"], job["last_event"]["event"]) == (
        "done", "ct-threshold", "threshold", 5, "done")
    assert job["destinations"][DESTINATION]["state"] == "delivered"
    assert "history" not in job
    # The reader's context: the patient and study from the series' own header, the study in the viewer.
    folder = Path(node.store.get(node.job_id).folder)
    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    assert job["patient"] == {"name": "Doe^Jane", "id": "PID-0042", "accession": "ACC-7781",
                              "study_date": str(ds.StudyDate), "series_description": "Phantom for the editor"}
    assert (PATIENT["patient_name"], len(str(ds.StudyDate))) == ("Doe^Jane", 8)
    assert job["viewer"] == f"http://127.0.0.1:3000/viewer?StudyInstanceUIDs={node.study_uid}"
    assert job["review"] is None  # no review sheet among its results
    assert "Doe" not in caplog.text and "PID-0042" not in caplog.text and "ACC-7781" not in caplog.text
    assert [s["series_uid"] for s in data["series"]] == [node.series_uid]
    results = Path(node.store.get(node.job_id).results)
    assert listed == [{"path": name, "kind": kind, "size": (results / name).stat().st_size} for name, kind in (
        ("report.json", "report"), ("labels.nii.gz", "labels"), ("classes.json", "classes"), ("stats.csv", "stats"),
        ("seg.dcm", "DICOM-SEG"))]
    assert report.json()["state"] == "done"
    assert (seg.headers["content-type"], seg.content) == ("application/dicom", (results / "seg.dcm").read_bytes())
    assert seg.headers["content-disposition"] == 'attachment; filename="seg.dcm"'
    assert traversal.status_code == 404
    assert (missing.status_code, missing.json()) == (404, {"error": "no such job"})


def test_info_slices_and_labels(node: Node) -> None:
    ct, base = base_labels(node)
    n, rows, columns = ct.array.shape
    with client(node) as http:
        info = http.get(f"/api/edit/{node.series_uid}").json()
        raw = http.get(f"/api/edit/{node.series_uid}/image/17?t={info['token']}")
        plain = http.get(f"/api/edit/{node.series_uid}/image/17", headers={"Accept-Encoding": "identity"})
        png = http.get(f"/api/edit/{node.series_uid}/image/17?format=png&center=40&width=400")
        labels = http.get(f"/api/edit/{node.series_uid}/labels/17?v=1")
        outside = http.get(f"/api/edit/{node.series_uid}/image/{n}")
        stale = http.get(f"/api/edit/{node.series_uid}/image/0?t=0123456789ab")
        bad_format = http.get(f"/api/edit/{node.series_uid}/image/0?format=jpeg")
        unknown = http.get("/api/edit/1.2.3.4")
        not_uid = http.get("/api/edit/..%2Fspool")
    assert {k: info[k] for k in ("series_uid", "study_uid", "modality", "description", "slices", "rows", "columns",
                                 "spacing", "dtype", "version", "base", "user", "can_save", "destinations",
                                 "history")} == {
        "series_uid": node.series_uid, "study_uid": node.study_uid, "modality": "CT",
        "description": "Phantom for the editor", "slices": n, "rows": rows, "columns": columns,
        "spacing": [3.2, 3.2, 6.0], "dtype": "int16", "version": 1, "base": f"job {node.job_id} (seg.dcm)",
        "user": "alice", "can_save": True, "destinations": [DESTINATION], "history": []}
    assert info["classes"] == [{"id": c.id, "name": c.name, "color": list(c.color), "category": c.category}
                               for c in base.classes.values()]
    assert info["labelled_slices"] == [k for k in range(n) if base.array[k].any()]
    assert [p["name"] for p in info["presets"]] == ["Soft tissue", "Liver", "Lung", "Bone", "Brain", "Auto"]
    assert raw.headers["content-encoding"] == "gzip" and raw.headers["x-dtype"] == "int16"
    assert raw.headers["x-shape"] == f"{rows},{columns}"
    assert np.array_equal(np.frombuffer(raw.content, "<i2").reshape(rows, columns), ct.array[17])
    assert "content-encoding" not in plain.headers and plain.content == raw.content
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(png_pixels(png.content), windowed(ct.array[17], 40, 400))
    assert np.array_equal(np.frombuffer(labels.content, "<u2").reshape(rows, columns), base.array[17])
    assert labels.headers["x-version"] == "1"
    assert (outside.status_code, outside.json()) == (404, {"error": f"slice {n} is outside 0..{n - 1}"})
    assert stale.status_code == 409 and stale.json()["error"].startswith("the series changed since it was opened")
    assert (bad_format.status_code, bad_format.json()) == (400, {"error": "format must be raw or png"})
    assert (unknown.status_code, unknown.json()) == (
        404, {"error": "series 1.2.3.4 is not on this node (not in the spool)"})
    assert not_uid.status_code == 404


def test_windowed() -> None:
    plane = np.array([[-1000, -160, 40], [240, 3000, 41]], np.int16)
    assert windowed(plane, 40, 400).tolist() == [[0, 0, 128], [255, 255, 128]]


def test_save_writes_a_seg_version_delivers_it_and_logs_it(node: Node) -> None:
    ct, base = base_labels(node)
    _, rows, columns = ct.array.shape
    edited = {5: base.array[5].copy(), 6: base.array[6].copy()}
    edited[5][10:20, 12:30] = 200
    edited[6][:, :] = 0
    edited[6][30:33, 30:33] = 1
    with client(node) as http:
        info = http.get(f"/api/edit/{node.series_uid}").json()
        payload = {"base_version": 1, "token": info["token"], "encoding": "zlib",
                   "slices": {str(k): plane_payload(p) for k, p in edited.items()},
                   "labels": [{"id": 200, "name": "lesion", "color": [255, 0, 0]}]}
        saved = http.post(f"/api/edit/{node.series_uid}/save", json=payload)
        again = http.post(f"/api/edit/{node.series_uid}/save", json=payload)
        after = http.get(f"/api/edit/{node.series_uid}").json()
        plane = http.get(f"/api/edit/{node.series_uid}/labels/5?v=2")
        old_version = http.get(f"/api/edit/{node.series_uid}/labels/5?v=1")
        rows_json = http.get("/api/annotations", params={"series": node.series_uid}).json()
        text = http.get("/api/annotations.csv").text
    assert saved.status_code == 201, saved.text
    result = saved.json()
    path = node.data_dir / "corrections" / node.series_uid / "v2.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    changed, voxels = set(), 0
    for k, p in edited.items():
        diff = p != base.array[k]
        changed |= {int(i) for i in np.unique(p[diff])} | {int(i) for i in np.unique(base.array[k][diff])}
        voxels += int(diff.sum())
    changed = sorted(changed - {0})
    names = [("lesion" if i == 200 else base.classes[i].name) for i in changed]
    assert {k: v for k, v in result.items() if k not in ("time", "classes")} == {
        "version": 2, "seg_uid": ds.SOPInstanceUID, "seg_series_uid": ds.SeriesInstanceUID,
        "path": f"corrections/{node.series_uid}/v2.dcm", "delivery": f"outbox: {DESTINATION}",
        "slices": [5, 6], "labels": names, "voxels_changed": voxels, "user": "alice",
        "labels_token": after["labels_token"]}
    assert after["labels_token"] != info["labels_token"]
    assert (again.status_code, again.json()) == (409, {"error": "version 2 was saved by alice after version 1 was "
                                                                "opened: reload the editor (your edits are not saved)"})
    # The SEG: same source, next version, the user as content creator, every edit and nothing else.
    assert (str(ds.ContentCreatorName), ds.SeriesNumber, ds.FrameOfReferenceUID, ds.StudyInstanceUID) == (
        "alice", 2001, ct.source.frame_of_reference_uid, node.study_uid)
    assert {str(s.SegmentAlgorithmType) for s in ds.SegmentSequence} == {"SEMIAUTOMATIC"}
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(ct.source.instance_uids)
    labels = read_seg(path, ct)
    expected = base.array.copy()
    for k, p in edited.items():
        expected[k] = p
    assert np.array_equal(labels.array, expected)
    assert labels.classes[200].name == "lesion"
    # The editor now shows version 2; the old version's planes are refused (409).
    assert (after["version"], after["base"], after["classes"][-1]["name"]) == (2, "version 2 by alice", "lesion")
    assert list(after["history"][0].pop("destinations")) == [DESTINATION]  # pending, delivering or delivered
    assert after["history"] == [{"version": 2, "time": result["time"], "user": "alice", "seg_uid": ds.SOPInstanceUID,
                                 "slices": "5;6", "labels": ";".join(names),
                                 "delivery": f"outbox: {DESTINATION}"}]
    assert np.array_equal(np.frombuffer(plane.content, "<u2").reshape(rows, columns), edited[5])
    assert old_version.status_code == 409
    # The outbox delivers it to the folder destination.
    delivered = node.archive / node.study_uid / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    deadline = time.monotonic() + 10
    while not delivered.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert delivered.read_bytes() == path.read_bytes()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with client(node) as http:
            states = http.get(f"/api/edit/{node.series_uid}").json()["history"][0]["destinations"]
        if states == {DESTINATION: "delivered"}:
            break
        time.sleep(0.05)
    assert states == {DESTINATION: "delivered"}
    # The annotation log.
    assert rows_json == [{
        "time": result["time"], "user": "alice", "study_uid": node.study_uid, "series_uid": node.series_uid,
        "seg_uid": ds.SOPInstanceUID, "seg_series_uid": ds.SeriesInstanceUID, "version": 2,
        "base": f"job {node.job_id} (seg.dcm)", "slices": "5;6",
        "source_instances": f"{ct.source.instance_uids[5]};{ct.source.instance_uids[6]}",
        "labels": ";".join(names), "voxels_changed": voxels, "path": str(path),
        "delivery": f"outbox: {DESTINATION}"}]
    assert text.splitlines()[1].split(",") == [str(rows_json[0][c]) for c in rows_json[0]]


@pytest.mark.parametrize(("change", "status", "message"), [
    (lambda p: p.update(base_version="1"), 400, "base_version (the version the edit started from) must be an integer"),
    (lambda p: p.update(base_version=0), 409, "{stale}"),
    (lambda p: p.update(token="0123456789ab"), 409, ("the series changed since it was opened (new instances): "
                                                     "reload the editor")),
    (lambda p: p.update(labels_token="0123456789ab"), 409, ("the labels shown now ({base}) are not the ones the "
                                                            "edit started from: reload the editor (your edits are "
                                                            "not saved)")),
    (lambda p: p.update(slices={}), 400, "slices must be an object {{slice index: base64 label plane}} with at least one"),
    (lambda p: p.update(slices={"x": ""}), 400, "slice index 'x' is not an integer"),
    (lambda p: p.update(slices={"40": ""}), 400, "slice 40 is outside 0..39"),
    (lambda p: p.update(slices={"3": "!!"}), 400, "slice 3: not zlib base64 data (Only base64 data is allowed)"),
    (lambda p: p.update(slices={"3": base64.b64encode(zlib.compress(b"12")).decode()}), 400,
     "slice 3: 2 bytes, expected 64x64 uint16 (8192 bytes)"),
    (lambda p: p.update(encoding="rle"), 400, "encoding must be raw or zlib, not 'rle'"),
    (lambda p: p.update(labels=[{"id": 0, "name": "x"}]), 400, "label id 0 must be an integer 1..65535"),
    (lambda p: p.update(labels=[{"id": 9, "name": " "}]), 400, "label 9 needs a name of 1..64 characters"),
    (lambda p: p.update(labels=[{"id": 1, "name": "tumour"}]), 400, "label id 1 is 'body' already, not 'tumour'"),
    (lambda p: p.update(labels=[]), 400, ("slice 3 uses label id(s) 999, which are not in the label list: add "
                                          "them as labels first")),
    (lambda p: p.update(slices={"3": "same"}), 400, "the slices sent are the same as version {v}: nothing to save"),
])
def test_save_refusals(node: Node, change, status: int, message: str) -> None:
    with client(node) as http:
        info = http.get(f"/api/edit/{node.series_uid}").json()
        plane = np.frombuffer(http.get(f"/api/edit/{node.series_uid}/labels/3").content, "<u2").reshape(64, 64).copy()
        unchanged = plane_payload(plane, encoding="raw")
        plane[0, 0] = 999
        payload = {"base_version": info["version"], "token": info["token"], "labels_token": info["labels_token"],
                   "encoding": "zlib", "slices": {"3": plane_payload(plane)},
                   "labels": [{"id": 999, "name": "new thing"}]}
        change(payload)
        if payload["slices"] == {"3": "same"}:
            payload.update(encoding="raw", slices={"3": unchanged})
        answer = http.post(f"/api/edit/{node.series_uid}/save", json=payload)
        version = http.get(f"/api/edit/{node.series_uid}").json()["version"]
    stale = (f"a newer result ({info['base']}) arrived after version 0 was opened" if info["base"].startswith("job ")
             else f"version {version} was saved by alice after version 0 was opened")
    stale += ": reload the editor (your edits are not saved)"
    assert (answer.status_code, answer.json()) == (status, {"error": message.format(v=version, stale=stale,
                                                                                     base=info["base"])})
    assert version == info["version"]


def test_save_refusals_before_the_edit(node: Node) -> None:
    with client(node) as http:
        not_json = http.post(f"/api/edit/{node.series_uid}/save", content=b"{nope")
        not_object = http.post(f"/api/edit/{node.series_uid}/save", json=[1])
        unknown = http.post("/api/edit/1.2.3.4/save", json={"base_version": 1})
    assert (not_json.status_code, not_json.json()) == (400, {"error": "the body is not JSON"})
    assert (not_object.status_code, not_object.json()) == (400, {"error": "the body must be a JSON object"})
    assert (unknown.status_code, unknown.json()) == (
        404, {"error": "series 1.2.3.4 is not on this node (not in the spool)"})


def test_saving_needs_tokens(node: Node) -> None:
    """A node without [http] tokens shows series, but refuses saves: every save is attributed."""
    settings = node.settings.model_copy(update={"http": node.settings.http.model_copy(update={"tokens": {}})})
    app = create_app(AppContext(settings, node.store, lambda *a: None, node.receiver, outbox=node.outbox))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as http:
        info = http.get(f"/api/edit/{node.series_uid}").json()
        answer = http.post(f"/api/edit/{node.series_uid}/save", json={"base_version": info["version"]})
        whoami = http.get("/api/whoami").json()
    assert (info["user"], info["can_save"], whoami) == (None, False, {"user": None, "auth": False})
    assert (answer.status_code, answer.json()) == (403, {"error": "saving needs a signed-in user (every save is "
                                                                  "attributed): this node has no [http] tokens"})


def test_series_without_a_seg_and_without_a_job(node: Node) -> None:
    """labels.nii.gz when the job wrote no seg.dcm; an empty label volume (version 0) without a job."""
    other = node.store_series(node.extra["other"])
    assert node.wait_job(other) == "done"
    job = node.store.for_series(other)[-1]
    (Path(job.results) / "seg.dcm").unlink()
    node.run_jobs[0] = False
    try:
        plain = node.store_series(node.extra["plain"])
    finally:
        node.run_jobs[0] = True
    with client(node, "bob") as http:
        info = http.get(f"/api/edit/{other}").json()
        plane = http.get(f"/api/edit/{other}/labels/20")
        empty = http.get(f"/api/edit/{plain}").json()
        zeros = http.get(f"/api/edit/{plain}/labels/20")
        first = np.zeros((64, 64), np.uint16)
        first[1:4, 1:4] = 1
        saved = http.post(f"/api/edit/{plain}/save", json={
            "base_version": 0, "token": empty["token"], "encoding": "raw",
            "slices": {"20": plane_payload(first, encoding="raw")}, "labels": [{"id": 1, "name": "liver"}]})
    nifti = read_nifti(Path(job.results) / "labels.nii.gz").array
    assert (info["version"], info["base"]) == (1, f"job {job.id} (labels.nii.gz)")
    assert np.array_equal(np.frombuffer(plane.content, "<u2").reshape(64, 64), nifti[20])
    assert (empty["version"], empty["base"], empty["classes"], empty["labelled_slices"]) == (
        0, "no segmentation yet", [], [])
    assert not np.frombuffer(zeros.content, "<u2").any()
    assert saved.status_code == 201, saved.text
    assert (saved.json()["version"], saved.json()["labels"], saved.json()["user"]) == (1, ["liver"], "bob")
    ds = pydicom.dcmread(node.data_dir / "corrections" / plain / "v1.dcm", stop_before_pixels=True)
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) for s in ds.SegmentSequence] == [
        ("liver", "Liver")]


def test_a_newer_job_wins_over_older_corrections(node: Node) -> None:
    """A correction, then a newer done job for the series (e.g. a re-run): the editor shows the job's
    result (version 1) and the next save is numbered after every version saved before."""
    import shutil

    from node.jobs.store import Job

    series_uid = node.store_series(node.extra["newer"])
    assert node.wait_job(series_uid) == "done"
    first = node.store.for_series(series_uid)[-1]
    with client(node) as http:
        info = http.get(f"/api/edit/{series_uid}").json()
        plane = np.frombuffer(http.get(f"/api/edit/{series_uid}/labels/10").content, "<u2").reshape(64, 64).copy()
        plane[:4, :4] = 1
        body = {"base_version": 1, "token": info["token"], "labels_token": info["labels_token"], "encoding": "raw",
                "slices": {"10": plane_payload(plane, encoding="raw")}}
        assert http.post(f"/api/edit/{series_uid}/save", json=body).json()["version"] == 2
        newer = Job(id="newerjob00000001", key="newer-key", series_uid=series_uid, study_uid=first.study_uid,
                    generation=1, folder=first.folder, instance_count=first.instance_count, rule=first.rule,
                    pipeline=first.pipeline, pipeline_version="other", engine="threshold", created=time.time())
        node.store.submit(newer)
        run = node.store.claim(newer.id, "test").run_id
        results = node.data_dir / "results" / newer.id / run
        shutil.copytree(first.results, results)
        assert node.store.finish(newer.id, run, str(results), {})
        stale = http.post(f"/api/edit/{series_uid}/save", json={**body, "base_version": 2})
        shown = http.get(f"/api/edit/{series_uid}").json()
        plane[:4, :4] = 2
        again = http.post(f"/api/edit/{series_uid}/save", json={
            **body, "labels_token": shown["labels_token"], "slices": {"10": plane_payload(plane, encoding="raw")}})
    assert (stale.status_code, stale.json()) == (409, {"error": f"a newer result (job {newer.id} (seg.dcm)) arrived "
                                                                "after version 2 was opened: reload the editor (your "
                                                                "edits are not saved)"})
    assert (shown["version"], shown["base"]) == (1, f"job {newer.id} (seg.dcm)")
    assert again.status_code == 201, again.text
    assert again.json()["version"] == 3


SHEET = b"\x89PNG\r\n\x1a\n(a review sheet)"


def test_dashboard_links_the_review_sheet_and_keeps_the_patient_from_open_nodes(node: Node) -> None:
    """A review sheet in a job's results is linked (and served); a node without tokens, where nobody is
    signed in, shows no patient data."""
    results = Path(node.store.get(node.job_id).results)
    sheet = results / "review.png"
    sheet.write_bytes(SHEET)
    try:
        with client(node) as http:
            job = next(j for j in http.get("/api/dashboard").json()["jobs"] if j["id"] == node.job_id)
            served = http.get(f"/api/jobs/{node.job_id}/artifacts/{job['review']}")
        settings = node.settings.model_copy(update={"http": node.settings.http.model_copy(
            update={"tokens": {}, "viewer_url": ""})})
        app = create_app(AppContext(settings, node.store, lambda *a: None, node.receiver, outbox=node.outbox))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as http:
            open_job = next(j for j in http.get("/api/dashboard").json()["jobs"] if j["id"] == node.job_id)
    finally:
        sheet.unlink()
    assert job["review"] == "review.png"
    assert (served.status_code, served.headers["content-type"], served.content) == (200, "image/png", SHEET)
    assert "patient" not in open_job and open_job["viewer"] is None and open_job["review"] == "review.png"


def test_versions_compare_and_make_current(node: Node) -> None:
    """Version 1 (the engine's) and a correction listed; any version's planes and reformatted views for
    comparing; version 1 made current again as version 3, version 2 kept."""
    series_uid = node.store_series(node.extra["versions"])
    assert node.wait_job(series_uid) == "done"
    job = node.store.for_series(series_uid)[-1]
    ct = read_series(Path(job.folder))
    engine = read_seg(Path(job.results) / "seg.dcm", ct).array
    edited = engine[12].copy()
    edited[5:15, 5:15] = 1
    with client(node) as http:
        info = http.get(f"/api/edit/{series_uid}").json()
        saved = http.post(f"/api/edit/{series_uid}/save", json={
            "base_version": 1, "token": info["token"], "labels_token": info["labels_token"],
            "encoding": "raw", "slices": {"12": plane_payload(edited, encoding="raw")}})
        assert saved.status_code == 201, saved.text
        listed = http.get(f"/api/edit/{series_uid}").json()["versions"]
        v1 = http.get(f"/api/edit/{series_uid}/versions/1/labels/12")
        v2 = http.get(f"/api/edit/{series_uid}/versions/2/labels/12")
        v9 = http.get(f"/api/edit/{series_uid}/versions/9/labels/12")
        coronal = http.get(f"/api/edit/{series_uid}/view/coronal/10?center=40&width=400&opacity=0.5&v=1")
        sagittal = http.get(f"/api/edit/{series_uid}/view/sagittal/63?center=40&width=400&opacity=0")
        bad_axis = http.get(f"/api/edit/{series_uid}/view/oblique/3")
        outside = http.get(f"/api/edit/{series_uid}/view/coronal/64")
        refusals = [http.post(f"/api/edit/{series_uid}/restore", json=body) for body in (
            {"version": 1, "base_version": 1}, {"version": 2, "base_version": 2},
            {"version": 9, "base_version": 2}, {"version": "1", "base_version": 2})]
    with client(node, None) as http:
        signed_out = http.post(f"/api/edit/{series_uid}/restore", json={"version": 1, "base_version": 2})
    with client(node, "bob") as http:
        restored = http.post(f"/api/edit/{series_uid}/restore", json={"version": 1, "base_version": 2})
        after = http.get(f"/api/edit/{series_uid}").json()
        current = http.get(f"/api/edit/{series_uid}/labels/12?v=3")
        still_v2 = http.get(f"/api/edit/{series_uid}/versions/2/labels/12")
    when = datetime.fromtimestamp(job.finished, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    assert [{k: v[k] for k in ("version", "source", "user", "current")} for v in listed] == [
        {"version": 1, "source": "engine", "user": None, "current": False},
        {"version": 2, "source": "correction", "user": "alice", "current": True}]
    assert (listed[0]["time"], listed[0]["job_id"], listed[1]["time"]) == (when, job.id, saved.json()["time"])
    assert np.array_equal(np.frombuffer(v1.content, "<u2").reshape(64, 64), engine[12])
    assert np.array_equal(np.frombuffer(v2.content, "<u2").reshape(64, 64), edited)
    assert (v9.status_code, v9.json()) == (404, {"error": f"series {series_uid} has no version 9"})
    # Coronal plane j = 10 of version 1: rows are the slices, the head up; labels blended at 0.5.
    grey = windowed(ct.array[:, 10, :], 40, 400).astype(float)
    classes = {c.id: c.color for c in read_seg(Path(job.results) / "seg.dcm", ct).classes.values()}
    colours = np.zeros((max(classes) + 1, 3))
    for i, rgb in classes.items():
        colours[i] = rgb
    plane = engine[:, 10, :]
    blend = np.where(plane[..., None] > 0, 0.5 * grey[..., None] + 0.5 * colours[plane], grey[..., None])
    head_up = ct.geometry.direction_matrix[2, 2] > 0
    expected = np.rint(blend[::-1] if head_up else blend).astype(np.uint8)
    assert coronal.headers["x-first-slice"] == ("bottom" if head_up else "top")
    assert np.array_equal(png_pixels(coronal.content), expected)
    assert (plane > 0).sum() > 50
    sagittal_grey = windowed(ct.array[:, :, 63], 40, 400)
    assert np.array_equal(png_pixels(sagittal.content)[..., 0],
                          sagittal_grey[::-1] if head_up else sagittal_grey)
    assert (bad_axis.status_code, bad_axis.json()) == (
        404, {"error": "axis must be coronal or sagittal, not 'oblique'"})
    assert (outside.status_code, outside.json()) == (404, {"error": "coronal plane 64 is outside 0..63"})
    assert [(r.status_code, r.json()["error"]) for r in refusals] == [
        (409, "version 2 is current now, not version 1: reload the editor"),
        (400, "version 2 is the current version already"),
        (404, f"series {series_uid} has no version 9"),
        (400, "version must be an integer")]
    assert signed_out.status_code == 401
    # Made current again: version 3 by bob holds version 1's labels; version 2 is still there.
    assert restored.status_code == 201, restored.text
    made = restored.json()
    assert (made["version"], made["user"], made["slices"]) == (3, "bob", [12])
    assert np.array_equal(np.frombuffer(current.content, "<u2").reshape(64, 64), engine[12])
    assert np.array_equal(np.frombuffer(still_v2.content, "<u2").reshape(64, 64), edited)
    assert [(v["version"], v["current"]) for v in after["versions"]] == [(1, False), (2, False), (3, True)]
    assert after["versions"][2]["base"] == "version 1 made current again (was version 2)"
    assert np.array_equal(read_seg(node.data_dir / "corrections" / series_uid / "v3.dcm", ct).array, engine)
    assert (node.data_dir / "corrections" / series_uid / "v2.dcm").is_file()
