"""The dashboard: one page at ``/`` and the few API routes it needs beyond the job API.

=========================================  ===========================================================
``GET /``                                  the dashboard page (static; data comes from the API)
``GET /edit/{series}``                     the editor page (:mod:`node.web.editor` serves its data)
``GET /static/...``                        the pages' scripts and styles
``GET /api/whoami``                        the signed-in user (``{"user": ..., "auth": true}``)
``GET /api/dashboard``                     jobs, series, queue depth, workers (seen: id, host, device, last
                                           heartbeat, current job, runs, fetch/upload seconds), destinations,
                                           outbox
``GET /api/jobs/{id}/artifacts``           the files of a done job's results folder
``GET /api/jobs/{id}/artifacts/{path}``    one of them (report.json, labels, seg.dcm, meshes, .blend, ...)
=========================================  ===========================================================

The pages and static files carry no data, so :class:`PublicPages` serves them before the token check
(a browser cannot send a bearer token with a page load); everything under ``/api`` still needs one.

For the people who read the results, each job row of ``/api/dashboard`` carries ``viewer`` (its study in
``segnode viewer``, ``[http] viewer_url``), ``review`` (the review sheet in its results, if written) and,
for a signed-in user only, ``patient``: name, ID, accession number, study date and the series
description, read from the series' own header (:class:`PatientContext`). Patient data goes into no log
line and to no one who is not signed in: with no ``[http] tokens`` nobody is, and it is left out.
The pages sign in with a token typed into a login field, kept in ``sessionStorage`` and sent as
``Authorization: Bearer``. They poll ``/api/dashboard`` (every 2 s while visible): no server-sent
events, because ``EventSource`` cannot send that header.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from node import __version__
from node.config import Settings
from node.jobs.store import Job, JobStore
from node.jobs.workers import WorkerRegistry, job_device, queue_kind

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: Known result files, by how the dashboard names them; anything else is listed by its file name.
ARTIFACT_KINDS = {
    "report.json": "report", "labels.nii.gz": "labels", "classes.json": "classes", "stats.csv": "stats",
    "seg.dcm": "DICOM-SEG",
}
ARTIFACT_SUFFIXES = {
    ".stl": "mesh", ".obj": "mesh", ".ply": "mesh", ".blend": "Blender scene", ".png": "image",
    ".nii.gz": "NIfTI", ".dcm": "DICOM", ".json": "JSON", ".csv": "CSV", ".zip": "archive",
}
#: Review sheets a job's results may hold (the ``review`` output), the first one present is linked.
REVIEW_FILES = ("review.png", "review/review.png")
#: Content-Security-Policy of the pages: their own scripts only, no inline code, no other origins.
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _page(name: str) -> Callable[[Request], Response]:
    def page(request: Request) -> Response:
        return FileResponse(STATIC / name, media_type="text/html; charset=utf-8",
                            headers={"content-security-policy": CSP, "x-content-type-options": "nosniff",
                                     "cache-control": "no-cache"})
    return page


def pages_app() -> Starlette:
    return Starlette(routes=[
        Route("/", _page("dashboard.html")),
        Route("/edit/{series}", _page("editor.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])


def is_page(path: str) -> bool:
    if path == "/" or path.startswith("/static/"):
        return True
    return path.startswith("/edit/") and "/" not in path[len("/edit/"):]


class PublicPages:
    """ASGI middleware put outside the token check: GET/HEAD of the pages and static files go to
    ``pages``, everything else on to ``app``."""

    def __init__(self, app: ASGIApp, pages: ASGIApp | None = None) -> None:
        self.app = app
        self.pages = pages or pages_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and is_page(scope["path"]):
            await self.pages(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def artifact_kind(name: str) -> str:
    if name in ARTIFACT_KINDS:
        return ARTIFACT_KINDS[name]
    if "contact" in name.lower() and name.lower().endswith((".png", ".jpg")):
        return "contact sheet"
    for suffix, kind in ARTIFACT_SUFFIXES.items():
        if name.lower().endswith(suffix):
            return kind
    return "file"


def list_artifacts(results: Path) -> list[dict[str, Any]]:
    """Files under a results folder (hidden and partial files left out), report first."""
    if not results.is_dir():
        return []
    files = [p for p in results.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(results).parts)]
    order = list(ARTIFACT_KINDS)
    files.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), str(p.relative_to(results))))
    return [{"path": str(p.relative_to(results)), "kind": artifact_kind(p.name), "size": p.stat().st_size}
            for p in files]


class PatientContext:
    """Who and what a job's series is, for the signed-in reader: the patient and study attributes of one
    of its instances (the spool's copy, else the job's ``seg.dcm``, which copies them), read once per
    job (pixels and everything else left unread). Nothing here is logged."""

    #: Attributes read (keyword -> key in the answer).
    FIELDS = {"PatientName": "name", "PatientID": "id", "AccessionNumber": "accession",
              "StudyDate": "study_date", "SeriesDescription": "series_description"}
    CACHE = 2000

    def __init__(self) -> None:
        self._cache: OrderedDict[str, dict[str, str] | None] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, job: Job) -> dict[str, str] | None:
        with self._lock:
            if job.id in self._cache:
                self._cache.move_to_end(job.id)
                return self._cache[job.id]
        context = self._read(job)
        with self._lock:
            if context is not None or job.state in ("done", "failed"):  # else: files may still arrive
                self._cache[job.id] = context
                while len(self._cache) > self.CACHE:
                    self._cache.popitem(last=False)
        return context

    def _read(self, job: Job) -> dict[str, str] | None:
        import pydicom

        candidates = []
        folder = Path(job.folder) if job.folder else None
        if folder is not None and folder.is_dir():
            candidates = [next((p for p in sorted(folder.glob("*.dcm")) if not p.name.startswith(".")), None)]
        if job.results:
            candidates.append(Path(job.results) / "seg.dcm")
        for path in candidates:
            if path is None or not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(self.FIELDS))
            except Exception:  # a file being replaced, or not DICOM: try the next (its name is no PHI)
                log.debug("dashboard: no patient context in %s", path.name, exc_info=True)
                continue
            context = {key: str(ds.get(keyword) or "") for keyword, key in self.FIELDS.items()}
            if path.name == "seg.dcm":  # the SEG's description is its own, not the series'
                context["series_description"] = ""
            return context
        return None


class Dashboard:
    """The dashboard's API routes; ``outbox()`` gives the node's outbox or None."""

    def __init__(self, settings: Settings, store: JobStore, outbox: Callable[[], Any] | None = None, *,
                 workers: WorkerRegistry | None = None) -> None:
        self.settings, self.store = settings, store
        self.outbox = outbox or (lambda: None)
        self.workers = workers
        self.patients = PatientContext()

    def routes(self) -> list[Route]:
        return [
            Route("/api/whoami", self.whoami),
            Route("/api/dashboard", self.overview),
            Route("/api/jobs/{job_id}/artifacts", self.artifacts),
            Route("/api/jobs/{job_id}/artifacts/{path:path}", self.artifact),
        ]

    def whoami(self, request: Request) -> Response:
        return JSONResponse({"user": request.scope.get("state", {}).get("user"),
                             "auth": bool(self.settings.http.tokens)})

    def _job_row(self, job: Job, user: str | None) -> dict[str, Any]:
        row = job.public()
        history = row.pop("history", [])
        row["last_event"] = history[-1] if history else None
        row["artifacts"] = len(list_artifacts(Path(job.results))) if job.state == "done" and job.results else 0
        if job.state == "queued" and self.workers is not None:
            row["waiting"] = self.workers.waiting_for(queue_kind(job_device(job.pipeline)),
                                                      self.settings.queue.stale_after_s)
        viewer = self.settings.http.viewer_url.rstrip("/")
        row["viewer"] = (f"{viewer}/viewer?StudyInstanceUIDs={job.study_uid}"
                         if viewer and job.study_uid else None)
        results = Path(job.results) if job.results else None
        row["review"] = next((name for name in REVIEW_FILES if results and (results / name).is_file()), None)
        if user is not None:  # a signed-in reader only (see the module docstring)
            row["patient"] = self.patients.of(job)
        return row

    def overview(self, request: Request) -> Response:
        try:
            limit = min(500, max(1, int(request.query_params.get("limit", 50))))
        except ValueError:
            return _error(400, "limit must be an integer")
        counts = self.store.counts()
        user = request.scope.get("state", {}).get("user")
        jobs = [self._job_row(j, user) for j in self.store.list(None, limit, 0)]
        outbox_status = None
        outbox = self.outbox()
        if outbox is not None:
            try:
                outbox_status = outbox.status()
            except Exception as exc:
                log.warning("dashboard: outbox status unavailable: %s", exc, exc_info=True)
                outbox_status = [{"destination": "?", "last_error": f"outbox status unavailable: {exc}"}]
        q = self.settings.queue
        return JSONResponse({
            "node": self.settings.node.name, "version": __version__, "time": time.time(),
            "user": request.scope.get("state", {}).get("user"),
            "queue": {"backend": q.backend, "workers": q.workers, "depth": counts.get("queued", 0),
                      "running": counts.get("running", 0)},
            "counts": counts,
            "destinations": [{"name": d.name, "kind": d.kind} for d in self.settings.destinations],
            "outbox": outbox_status,
            "workers": self.workers.list() if self.workers is not None else [],
            "jobs": jobs,
            "series": self.store.series(limit, 0),
        })

    def _results(self, job_id: str) -> Path | JSONResponse:
        job = self.store.get(job_id)
        if job is None:
            return _error(404, "no such job")
        if not job.results or not Path(job.results).is_dir():
            return _error(404, f"job {job_id} has no results folder (it is {job.state})")
        return Path(job.results)

    def artifacts(self, request: Request) -> Response:
        results = self._results(request.path_params["job_id"])
        if isinstance(results, Response):
            return results
        return JSONResponse(list_artifacts(results))

    def artifact(self, request: Request) -> Response:
        results = self._results(request.path_params["job_id"])
        if isinstance(results, Response):
            return results
        relative = request.path_params["path"]
        target = (results / relative).resolve()
        if (not target.is_relative_to(results.resolve()) or not target.is_file()
                or any(part.startswith(".") for part in Path(relative).parts)):
            return _error(404, f"no file {relative!r} in the results of job {request.path_params['job_id']}")
        media = "application/dicom" if target.suffix == ".dcm" else (
            mimetypes.guess_type(target.name)[0] or "application/octet-stream")
        if target.name.endswith(".gz"):
            media = "application/gzip"
        return FileResponse(target, media_type=media, filename=target.name,
                            headers={"x-content-type-options": "nosniff"})
