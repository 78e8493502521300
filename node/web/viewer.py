"""``segnode viewer``: review results in OHIF against an archive's DICOMweb (an Orthanc), on one origin.

Serves OHIF's prebuilt viewer (npm ``@ohif/app``'s static ``dist/``; ``scripts/setup.sh`` puts version
:data:`OHIF_VERSION` in ``.cache/ohif/``) at the site root, with single-page-app fallback (a path with no
file and no extension is ``index.html``), and our own ``/app-config.js``: one DICOMweb data source at
``/dicom-web/`` of the same origin (so no CORS), WADO-RS rendering for images and thumbnails, no
"investigational use" dialog. ``/dicom-web/*`` is proxied to the archive's DICOMweb root, its Basic
credentials added here (never sent to the browser); answers stream through as they come, status,
content type (multipart boundaries included) and length unchanged. A ``Forwarded`` header tells Orthanc
our origin, so the BulkDataURIs in its metadata point back through this proxy.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import requests
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

OHIF_VERSION = "3.13.2"
#: Where ``scripts/setup.sh`` extracts OHIF's ``dist/`` in a checkout.
DEFAULT_DIST = Path(__file__).resolve().parents[2] / ".cache" / "ohif" / OHIF_VERSION / "dist"
#: Request headers passed on to the archive, and answer headers passed back.
_UP = ("accept", "content-type", "range", "if-none-match", "if-modified-since")
_DOWN = ("content-type", "content-length", "content-encoding", "content-range", "etag", "last-modified",
         "cache-control", "accept-ranges")
_CHUNK = 64 * 1024


class ViewerError(ValueError):
    """The viewer cannot start (no OHIF dist at the path given)."""


def app_config(name: str = "segnode") -> str:
    """OHIF's ``window.config``: one DICOMweb source, ``/dicom-web`` on the page's own origin."""
    source = {
        "friendlyName": name, "name": "dicomweb", "qidoRoot": "@ROOT@", "wadoRoot": "@ROOT@",
        "wadoUriRoot": "@ROOT@", "qidoSupportsIncludeField": False, "imageRendering": "wadors",
        "thumbnailRendering": "wadors", "enableStudyLazyLoad": True, "supportsFuzzyMatching": False,
        "supportsWildcard": True, "omitQuotationForMultipartRequest": True,
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "showStudyList": True,
        "customizationService": {"ohif.tours": {"$set": []}},
        "investigationalUseDialog": {"option": "never"}, "showWarningMessageForCrossOrigin": False,
        "defaultDataSourceName": "dicomweb",
        "dataSources": [{"namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                         "sourceName": "dicomweb", "configuration": source}],
    }
    text = json.dumps(config, indent=2).replace('"@ROOT@"', "root")
    return f"const root = window.location.origin + '/dicom-web';\nwindow.config = {text};\n"


class _SinglePageApp(StaticFiles):
    """The dist's files as they are; any other path without an extension is the app's ``index.html``."""

    async def get_response(self, path: str, scope: Any) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code != 404 or "." in PurePosixPath(path).name:
                raise
            return await super().get_response("index.html", scope)


class _Proxy:
    """``/dicom-web/{path}`` -> ``<dicomweb>/{path}``, credentials added, the answer streamed back."""

    def __init__(self, dicomweb: str, username: str = "", password: str = "", timeout: float = 300.0):
        self.root = dicomweb.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # *_proxy variables are for the browser's traffic, not ours
        if username:
            self.session.auth = (username, password)
        self.timeout = timeout

    async def handle(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k in _UP}
        headers["accept-encoding"] = request.headers.get("accept-encoding", "identity")
        headers["forwarded"] = f"proto={request.url.scheme};host={request.url.netloc}"
        body = await request.body() if request.method == "POST" else None
        url = f"{self.root}/{request.path_params['path']}"
        if request.url.query:  # as the browser wrote it (commas, wildcards, escapes)
            url += f"?{request.url.query}"
        try:
            upstream = await run_in_threadpool(
                self.session.request, request.method, url, data=body, headers=headers, stream=True,
                timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return JSONResponse({"error": f"DICOMweb server unreachable: {type(exc).__name__}"}, 502)
        answer = {k: v for k, v in upstream.headers.items() if k.lower() in _DOWN}
        if request.method == "HEAD":
            upstream.close()
            return Response(status_code=upstream.status_code, headers=answer)
        return _Streamed(upstream, answer)


class _Streamed(StreamingResponse):
    """The archive's answer streamed back as it comes, and closed however the streaming ends: all sent,
    the browser gone (a disconnect message, or a send that fails), the archive failing mid-answer, or the
    task cancelled; never left to garbage collection with its connection."""

    def __init__(self, upstream: requests.Response, headers: dict[str, str]):
        super().__init__(upstream.raw.stream(_CHUNK, decode_content=False), upstream.status_code, headers)
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # synchronous: no await may run here once the task is cancelled; no read is under way
            self.upstream.close()


def create_viewer_app(dist: Path | str, dicomweb: str, *, username: str = "", password: str = "",
                      name: str = "segnode") -> Starlette:
    """OHIF from ``dist`` with ``dicomweb`` (e.g. ``http://127.0.0.1:8042/dicom-web``) as its data source."""
    dist = Path(dist)
    if not (dist / "index.html").is_file():
        raise ViewerError(f"{dist} is not OHIF's dist/ folder (no index.html); scripts/setup.sh fetches "
                          f"@ohif/app {OHIF_VERSION} into {DEFAULT_DIST}")
    config = app_config(name)

    def config_js(request: Request) -> Response:
        return Response(config, media_type="text/javascript", headers={"cache-control": "no-store"})

    return Starlette(routes=[
        Route("/app-config.js", config_js),
        Route("/dicom-web/{path:path}", _Proxy(dicomweb, username, password).handle,
              methods=["GET", "HEAD", "POST"]),
        Mount("/", _SinglePageApp(directory=dist, html=True)),
    ])


def serve_viewer(dist: Path | str, dicomweb: str, *, host: str = "127.0.0.1", port: int = 3000,
                 username: str = "", password: str = "") -> None:
    """Serve the viewer until Ctrl-C/SIGTERM (uvicorn says where)."""
    import uvicorn

    app = create_viewer_app(dist, dicomweb, username=username, password=password)
    uvicorn.run(app, host=host, port=port, log_level="info")
