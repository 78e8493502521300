"""orthanc/segnode_plugin.py in Debian's Orthanc: stable series are handed to the node (retried while
the node refuses), never a SEG or the node's own output; its status route; a broken venv or a failing
import never stops Orthanc.

The node's side here is a small recording HTTP endpoint (what the plugin sent, in order); the real node
takes the hand-off in tests/integration/test_e2e.py. Last, the node's end of it (node/fetch.py): a WADO-RS
retrieval from Orthanc byte for byte, and its streaming multipart parser."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.dicom.writer import SeriesInfo, write_series
from node.volume import Geometry, Volume

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "orthanc" / "segnode_plugin.py"
TOKEN = "plugin-test-token"


class Recorder:
    """The node's hand-off route: records each request; answers from ``statuses``, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recorder.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                status = recorder.statuses.pop(0) if recorder.statuses else 200
                answer = json.dumps(
                    {"series_uid": body["series_uid"], "instances": body["instances"]}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def series_files(folder: Path, seed: str, *, derived: bool = False, n: int = 3) -> list[Path]:
    array = (np.arange(n * 16 * 16).reshape(n, 16, 16) % 200).astype(np.int16)
    volume = Volume(array, Geometry(origin=(0, 0, 0), spacing=(1.0, 1.0, 2.0), direction=np.eye(3)))
    paths = write_series(volume, folder, SeriesInfo(uid_seed=seed))
    if derived:  # what the node itself writes: Manufacturer segnode, ImageType DERIVED
        series_uid = generate_uid()
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.ImageType = ["DERIVED", "PRIMARY"]
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(path)
    return paths


def seg_file(source: list[Path], out: Path) -> Path:
    """A SEG object (as a PACS holds one): Modality SEG, Segmentation Storage."""
    ds = pydicom.dcmread(source[0])
    ds.Modality = "SEG"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Manufacturer = "another vendor"
    ds.save_as(out)
    return out


def wait_status(orthanc, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = orthanc.rest_get("/segnode/status")
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"plugin status not as expected within {timeout} s: {status}\n{orthanc.log_tail()}")


def upload(orthanc, paths: list[Path]) -> None:
    for path in paths:
        orthanc.rest_post("/instances", path.read_bytes())


def plugin_config(url: str, **more: Any) -> dict[str, Any]:
    return {"Segnode": {"NodeUrl": url, "NodeToken": TOKEN, "FirstRetrySeconds": 0.2, **more}}


def test_stable_series_are_handed_over_with_retries_and_never_a_seg_or_our_own_output(
    orthanc_factory, tmp_path: Path
) -> None:
    node = Recorder(statuses=[503])  # the node is not ready the first time
    try:
        orthanc = orthanc_factory(
            python_script=PLUGIN,
            stable_age=1,
            extra_config=plugin_config(node.url),
            env={"SEGNODE_VENV": str(REPO / ".venv")},
        )
        ct = series_files(tmp_path / "ct", "plugin-ct")
        own = series_files(tmp_path / "own", "plugin-own", derived=True)
        seg = seg_file(ct, tmp_path / "seg.dcm")
        upload(orthanc, [*ct, *own, seg])

        status = wait_status(orthanc, lambda s: s["handed_off"] + s["skipped"] + s["failed"] == 3)
    finally:
        node.close()
    first = pydicom.dcmread(ct[0], stop_before_pixels=True)
    ct_id = next(
        s["ID"]
        for s in orthanc.rest_get("/series?expand")
        if s["MainDicomTags"]["SeriesInstanceUID"] == first.SeriesInstanceUID
    )
    expected = {
        "orthanc_series_id": ct_id,
        "series_uid": first.SeriesInstanceUID,
        "study_uid": first.StudyInstanceUID,
        "modality": "CT",
        "instances": 3,
        "aet": "ORTHANC",
    }
    assert node.requests == [{"path": "/api/orthanc/series", "auth": f"Bearer {TOKEN}", "body": expected}] * 2
    assert {k: status[k] for k in ("handed_off", "skipped", "failed", "retries", "queued")} == {
        "handed_off": 1,
        "skipped": 2,
        "failed": 0,
        "retries": 1,
        "queued": 0,
    }
    assert (status["guard"], status["venv_error"], status["python"], status["worker_alive"]) == (
        "node.rules",
        None,
        "3.11.2",
        True,
    )
    assert status["numpy"].startswith(str(REPO / ".venv" / "lib" / "python3.11" / "site-packages"))
    outcomes = sorted((e["outcome"], e.get("reason") or e.get("error", "")) for e in status["recent"])
    assert outcomes == [
        ("handed_off", ""),
        ("retry", f'node answered HTTP 503: {{"series_uid": "{first.SeriesInstanceUID}", "instances": 3}}'),
        ("skipped", "Modality SEG is not an image to segment"),
        ("skipped", "a segnode output (Manufacturer segnode, ImageType DERIVED)"),
    ]
    handed = next(e for e in status["recent"] if e["outcome"] == "handed_off")
    assert handed["node"] == {"series_uid": first.SeriesInstanceUID, "instances": 3}
    assert handed["attempt"] == 2


@pytest.mark.parametrize("venv", ["missing", "broken"])
def test_a_venv_that_cannot_be_used_never_stops_orthanc(orthanc_factory, tmp_path: Path, venv: str) -> None:
    root = tmp_path / "venv"
    if venv == "broken":  # the node package raises at import (a numpy/ABI mismatch would look the same)
        package = root / "lib" / "python3.11" / "site-packages" / "node"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('segnode-test: broken node package')\n")
    orthanc = orthanc_factory(
        python_script=PLUGIN, extra_config=plugin_config("http://127.0.0.1:9", Venv=str(root))
    )

    status = wait_status(orthanc, lambda s: s["venv_error"] is not None)
    assert status["guard"] == "built-in" and status["worker_alive"]
    assert status["venv_error"] == (
        "RuntimeError: segnode-test: broken node package"
        if venv == "broken"
        else f"{root}/lib/python3.11/site-packages not found (a venv of another Python than python3.11?)"
    )
    assert orthanc.rest_get("/system")["Version"] == "1.10.1"


# --- the node's side of the hand-off: node/fetch.py --------------------------------------------------


def test_the_node_fetches_a_series_from_orthanc_byte_for_byte(orthanc, tmp_path: Path) -> None:
    from node.config import OrthancSection
    from node.fetch import OrthancSource

    sent = series_files(tmp_path / "sent", "fetch", n=4)
    upload(orthanc, sent)
    first = pydicom.dcmread(sent[0], stop_before_pixels=True)
    source = OrthancSource(OrthancSection(url=orthanc.http_url))
    try:
        got = source.fetch_series(first.StudyInstanceUID, first.SeriesInstanceUID, tmp_path / "got")
    finally:
        source.close()
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in sent}
    assert sorted(p.name for p in got) == sorted(f"{uid}.dcm" for uid in by_uid)
    for path in got:
        assert path.read_bytes() == by_uid[path.stem].read_bytes()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_multipart_parts_are_split_exactly_however_the_bytes_arrive(chunk: int) -> None:
    from node.fetch import FetchError, iter_parts

    parts = [b"\x00DICM\r\n--notyet\r\n" * 3, b"", b"x" * 1000, b"-b\r\n--"]  # none holds CRLF--b
    body = (
        b"preamble\r\n"
        + b"".join(
            b"--b \r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(p), p)
            for p in parts
        )
        + b"--b--\r\nepilogue"
    )
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    got = list(iter_parts(chunks, "b"))
    assert [content for _, content in got] == parts
    assert all(headers["content-type"] == "application/dicom" for headers, _ in got)
    with pytest.raises(FetchError, match="truncated"):
        list(iter_parts([body[: body.index(b"--b--")]], "b"))
    with pytest.raises(FetchError, match="Content-Length 5"):
        list(iter_parts([b"--b\r\nContent-Length: 5\r\n\r\nabc\r\n--b--"], "b"))


def test_the_venv_goes_to_the_front_of_sys_path(tmp_path: Path, monkeypatch) -> None:
    """Appended, an older numpy earlier on sys.path (Debian's python3-numpy) would win."""
    import importlib.machinery
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("segnode_plugin_under_test", PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)  # outside Orthanc: `import orthanc` fails, nothing registers
    debian = tmp_path / "dist-packages"
    venv_packages = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    for folder, version in ((debian, "1.24.2"), (venv_packages, "2.4.6")):
        (folder / "fakenumpy").mkdir(parents=True)
        (folder / "fakenumpy" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (venv_packages / "extra.pth").write_text(str(tmp_path / "from-pth") + "\n")
    (venv_packages / "dataclasses.py").write_text("raise ImportError('the PyPI backport')\n")  # rt-utils pulls it
    (tmp_path / "from-pth").mkdir()
    monkeypatch.setattr(sys, "path", [str(debian), *sys.path])
    monkeypatch.delitem(sys.modules, "fakenumpy", raising=False)

    assert plugin.orthanc is None
    assert plugin.add_venv(str(tmp_path / "venv")) is None
    at = sys.path.index(str(venv_packages))
    assert sys.path[at : at + 2] == [str(venv_packages), str(tmp_path / "from-pth")]
    assert at < sys.path.index(str(debian))
    import fakenumpy

    assert fakenumpy.__version__ == "2.4.6"
    # ...but the standard library stays ahead of the venv: a backport there never shadows it.
    stdlib_dataclasses = importlib.machinery.PathFinder.find_spec("dataclasses", sys.path)
    assert Path(stdlib_dataclasses.origin).parent != venv_packages
    assert plugin.add_venv(str(tmp_path / "nowhere")).endswith(
        "not found (a venv of another Python than python3.11?)"
    )
