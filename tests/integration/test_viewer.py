"""``segnode viewer`` (node/web/viewer.py) over real HTTP: OHIF's files with single-page-app fallback, our
``app-config.js``, and the same-origin DICOMweb proxy (credentials added, query, headers and multipart
answers passed through as they are). A small Starlette app on loopback stands in for Orthanc here; the
browser test (tests/browser/test_ohif.py) runs the real OHIF against a real Orthanc. How a streamed answer
ends (the browser leaving, the archive failing) is played by calling the viewer's ASGI app directly.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import requests
import urllib3
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from node.web.viewer import app_config, create_viewer_app
from tests.servers import free_port, serve_in_thread

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BOUNDARY = "segnode-test-boundary"
MULTIPART = f"multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"
BODY = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + bytes(range(256)) * 1000 + (
    f"\r\n--{BOUNDARY}--\r\n".encode())
#: What ``/frames`` streams, one frame at a time (``/broken`` fails after the first frame).
FRAME, FRAMES = bytes(range(256)) * 256, 16


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[dict]]]:
    """A stand-in DICOMweb server that records each request and answers a multipart body."""
    seen: list[dict] = []

    async def anything(request: Request) -> Response:
        seen.append({"method": request.method, "path": request.url.path, "query": request.url.query,
                     "headers": dict(request.headers), "body": await request.body()})
        if request.url.path.endswith("/missing"):
            return Response(b'{"error": "no such study"}', 404, media_type="application/json")
        if request.url.path.endswith(("/frames", "/broken")):
            return StreamingResponse(frames(broken=request.url.path.endswith("/broken")), 200,
                                     media_type="application/octet-stream")
        return Response(BODY, 200, media_type=MULTIPART)

    async def frames(broken: bool) -> AsyncIterator[bytes]:
        for n in range(FRAMES):
            if broken and n == 1:  # the connection is dropped mid-answer (uvicorn closes it)
                raise ConnectionResetError("the archive fell over")
            yield FRAME

    app = Starlette(routes=[Route("/dicom-web/{path:path}", anything, methods=["GET", "POST"])])
    with serve_in_thread(app) as url:
        yield url + "/dicom-web", seen


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text("<html>OHIF</html>")
    (tmp_path / "app.bundle.js").write_text("console.log('app')")
    (tmp_path / "app-config.js").write_text("window.config = {dataSources: ['the demo server']};")
    return tmp_path


def test_files_single_page_fallback_and_our_config(dist: Path, upstream) -> None:
    app = create_viewer_app(dist, upstream[0])
    with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as client:
        for path in ("/", "/viewer", "/viewer/dicomweb"):
            answer = client.get(path, params={"StudyInstanceUIDs": "1.2.3"})
            assert (answer.status_code, answer.text) == (200, "<html>OHIF</html>"), path
        assert client.get("/app.bundle.js").text == "console.log('app')"
        assert client.get("/missing.bundle.js").status_code == 404  # a missing file is no page
        config = client.get("/app-config.js")
        assert config.headers["content-type"].startswith("text/javascript")
        assert config.text == app_config()


def test_the_config_is_javascript_with_one_same_origin_dicomweb_source() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = ("const window = {location: {origin: 'http://127.0.0.1:3000'}};\n" + app_config("Test PACS")
              + "\nconsole.log(JSON.stringify(window.config));")
    run = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True)
    config = json.loads(run.stdout)
    assert config["investigationalUseDialog"] == {"option": "never"}
    assert config["defaultDataSourceName"] == "dicomweb"
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["friendlyName"] == "Test PACS"
    roots = {settings[k] for k in ("qidoRoot", "wadoRoot", "wadoUriRoot")}
    assert roots == {"http://127.0.0.1:3000/dicom-web"}
    assert (settings["imageRendering"], settings["thumbnailRendering"]) == ("wadors", "wadors")


def test_the_proxy_adds_credentials_and_passes_everything_else_through(dist: Path, upstream) -> None:
    root, seen = upstream
    app = create_viewer_app(dist, root, username="segnode", password="s3cret")
    with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as client:
        query = "limit=101&offset=0&includefield=00081030%2C00080060&PatientName=Doe%5EJ*"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        answer = client.get(f"/dicom-web/studies/1.2.3/series?{query}", headers={"Accept": accept})
        assert (answer.status_code, answer.headers["content-type"], answer.content) == (200, MULTIPART, BODY)
        assert int(answer.headers["content-length"]) == len(BODY)
        assert "authorization" not in {k.lower() for k in answer.headers}

        stored = client.post("/dicom-web/studies", content=b"\x00DICM", headers={"Content-Type": MULTIPART})
        missing = client.get("/dicom-web/studies/missing")
        assert (stored.status_code, missing.status_code) == (200, 404)
        assert missing.json() == {"error": "no such study"}

    get, post, _ = seen
    assert (get["method"], get["path"], get["query"]) == ("GET", "/dicom-web/studies/1.2.3/series", query)
    token = base64.b64encode(b"segnode:s3cret").decode()
    assert get["headers"]["authorization"] == f"Basic {token}"
    assert get["headers"]["accept"] == accept
    assert get["headers"]["forwarded"] == f"proto=http;host={url.removeprefix('http://')}"
    assert (post["method"], post["path"], post["body"]) == ("POST", "/dicom-web/studies", b"\x00DICM")
    assert post["headers"]["content-type"] == MULTIPART


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URL of each archive answer that is closed (``requests.Response.close``, which garbage
    collection never calls), in order."""
    urls: list[str] = []
    close = requests.Response.close

    def recording(self: requests.Response) -> None:
        urls.append(self.url)
        close(self)

    monkeypatch.setattr(requests.Response, "close", recording)
    return urls


async def browse(app, path: str, spec: str, leaves: str | None) -> tuple[list[bytes], BaseException | None]:
    """One GET of ``path`` through ``app`` run as an ASGI server of ``spec_version`` ``spec`` runs it; the
    browser reads the body's first chunk and then, by ``leaves``: None, stays to the end; ``"disconnect"``,
    hangs up (the server's next ``receive`` says so); ``"send fails"``, hangs up (the server's next
    ``send`` raises OSError, as ASGI 2.4 servers do); ``"cancel"``, the server cancels the request's task.
    Returns the body chunks the browser got and what the app raised."""
    chunks: list[bytes] = []
    gone = anyio.Event()
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] != "http.response.body" or not message["body"]:
            return
        if chunks and leaves == "send fails":
            raise OSError("the browser hung up")
        chunks.append(message["body"])
        if leaves == "disconnect":
            gone.set()
        elif leaves == "cancel":
            task.cancel()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"viewer.test")], "server": ("viewer.test", 80),
             "client": ("127.0.0.1", 50000)}
    raised = None
    with anyio.CancelScope() as task:
        try:
            await app(scope, receive, send)
        except (ClientDisconnect, urllib3.exceptions.HTTPError) as exc:  # what a server gets from the app
            raised = exc
    return chunks, raised


@pytest.mark.parametrize(("name", "spec", "leaves"), [
    ("frames", "2.3", None), ("frames", "2.3", "disconnect"), ("frames", "2.4", "send fails"),
    ("frames", "2.3", "cancel"), ("broken", "2.3", None)])
def test_the_archive_answer_is_closed_however_the_stream_ends(dist: Path, upstream, closed: list[str],
                                                               name: str, spec: str, leaves: str | None) -> None:
    root, _ = upstream
    app = create_viewer_app(dist, root)
    chunks, raised = anyio.run(browse, app, f"/dicom-web/{name}", spec, leaves)
    assert closed == [f"{root}/{name}"]  # closed once, by the proxy, before the request ended
    body = b"".join(chunks)
    assert chunks and body == (FRAME * FRAMES)[:len(body)]  # streamed: the first chunk came through
    if name == "broken":  # the archive dropped the connection: the answer is cut short, the error raised
        assert len(body) < len(FRAME) * FRAMES
        assert isinstance(raised, urllib3.exceptions.ProtocolError)
    elif leaves is None:
        assert (body, raised) == (FRAME * FRAMES, None)
    else:  # the browser left after the first chunk (an ASGI 2.4 server's failed send raises ClientDisconnect)
        assert len(chunks) == 1 and len(body) < len(FRAME) * FRAMES
        assert isinstance(raised, ClientDisconnect) if leaves == "send fails" else raised is None


def test_an_unreachable_server_is_a_502(dist: Path) -> None:
    app = create_viewer_app(dist, f"http://127.0.0.1:{free_port()}/dicom-web")
    with serve_in_thread(app) as url:
        answer = httpx.get(f"{url}/dicom-web/studies", trust_env=False)
    assert answer.status_code == 502
    assert answer.json() == {"error": "DICOMweb server unreachable: ConnectionError"}


def test_the_command_refuses_a_folder_without_ohif(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("")
    run = [sys.executable, "-m", "node", "--config", str(config), "viewer"]
    no_server = subprocess.run(run, cwd=REPO, capture_output=True, text=True, check=False)
    assert (no_server.returncode, no_server.stderr.strip()) == (
        2, "error: no DICOMweb server: give --dicomweb, or set [orthanc] url")
    no_ohif = subprocess.run([*run, "--dicomweb", "http://127.0.0.1:8042/dicom-web", "--ohif-dist",
                              str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=False)
    assert no_ohif.returncode == 2
    assert no_ohif.stderr.startswith(f"error: {tmp_path} is not OHIF's dist/ folder (no index.html)")
