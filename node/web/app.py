"""The node's HTTP app (Starlette): job and series API, STOW-RS, health and metrics.

=============================  ============================================================
``GET  /healthz``              liveness (no authentication); 503: job store or spool unusable, or
                               the worker still loading its ``preload`` models (``warming``)
``GET  /metrics``              Prometheus text format
``GET  /api/series``           series the router saw, newest first, with its decision and job
``GET  /api/jobs``             jobs, newest first (``?state=failed&limit=50&offset=0``)
``GET  /api/jobs/{id}``        one job: state, stage, progress, per-stage timings, error, history
``POST /api/jobs/{id}/retry``  run a failed job again (202), 409 if it is not failed
``GET|PUT /api/log-level``     the log level; PUT ``{"level": "DEBUG"}`` changes it now (admin users)
``/api/worker/...``            remote workers only (:mod:`node.web.workers`)
``POST /dicomweb/studies``     STOW-RS (:mod:`node.web.stow`)
``GET  /``, ``/edit/{series}``  dashboard and correction editor pages (:mod:`node.web.dashboard`,
                               :mod:`node.web.editor`), with their ``/api/dashboard``, ``/api/edit``
                               and ``/api/annotations`` routes
=============================  ============================================================

Everything but ``/healthz`` and the pages' static files needs a token when ``[http] tokens`` are set
(:mod:`node.web.auth`).
Errors are JSON ``{"error": "..."}``. Handlers are plain functions run in Starlette's thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node import __version__
from node.config import Settings
from node import metrics
from node.jobs.store import STATES, Job, JobStore
from node.jobs.workers import WorkerRegistry, job_device, queue_kind
from node.segment import warmup
from node.web.annotations import AnnotationLog
from node.web.auth import TokenAuth
from node.web.dashboard import Dashboard, PublicPages
from node.web.editor import Editor
from node.web.stow import StowRoute, Target

log = logging.getLogger(__name__)


@dataclass
class AppContext:
    settings: Settings
    store: JobStore
    #: ``enqueue(job_id, delay_seconds)``: sends a queue message.
    enqueue: Callable[[str, float], None]
    #: Where STOW-RS stores (the ingest receiver); None: no STOW-RS route.
    receiver: Target | None = None
    #: The node's outbox (:class:`node.export.Outbox`): the dashboard shows it, the editor queues
    #: corrections on it. None: corrections stay in ``<data_dir>/corrections``.
    outbox: Any = None
    #: What keeps ingest from storing right now (``Spool.problem``), reported by ``/healthz``.
    ingest_problem: Callable[[], str | None] = lambda: None
    #: The node's :class:`~node.jobs.worker.JobRunner` (its hooks end remote runs too); with it and
    #: ``[http] worker_tokens``, the remote workers' routes are served.
    runner: Any = None
    #: The workers seen (listed on the dashboard and in ``/metrics``; queued GPU jobs say when they
    #: wait for want of a GPU worker).
    workers: WorkerRegistry | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _page(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", 100))
        offset = int(request.query_params.get("offset", 0))
    except ValueError:
        raise _BadRequest("limit and offset must be integers") from None
    if not (1 <= limit <= 1000 and offset >= 0):
        raise _BadRequest("limit must be 1..1000 and offset >= 0")
    return limit, offset


class _BadRequest(Exception):
    pass


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    job.pop("history", None)
    return job


def with_waiting(job: Job, data: dict[str, Any], workers: WorkerRegistry | None, lease_s: float) -> dict[str, Any]:
    """``waiting``: why a queued job is not taken, when it is for want of a worker of its kind."""
    if job.state == "queued" and workers is not None:
        data["waiting"] = workers.waiting_for(queue_kind(job_device(job.pipeline)), lease_s)
    return data


def create_app(ctx: AppContext) -> Starlette:
    store = ctx.store
    metrics.count_jobs_with(store.counts)
    lease_s = ctx.settings.queue.stale_after_s
    if ctx.workers is not None:
        metrics.list_workers_with(ctx.workers.list)

    def healthz(request: Request) -> Response:
        try:
            store.counts()
        except Exception as exc:
            log.error("health check: job store unreachable: %s", exc)
            return JSONResponse({"status": "error", "detail": "job store unreachable"}, status_code=503)
        problem = ctx.ingest_problem()
        if problem is not None:
            return JSONResponse({"status": "error", "detail": problem}, status_code=503)
        warm = warmup.state()  # [segmentation] preload: not ready until the models are loaded
        if warm.state == "warming":
            return JSONResponse({"status": "warming", "detail": warm.detail, "models": warm.models},
                                status_code=503)
        body: dict[str, Any] = {"status": "ok", "version": __version__}
        if warm.state in ("ready", "failed") and (warm.models or warm.detail):
            body["models"] = warm.models
            if warm.detail:
                body["detail"] = warm.detail
        return JSONResponse(body)

    def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def series(request: Request) -> Response:
        try:
            limit, offset = _page(request)
        except _BadRequest as exc:
            return _error(400, str(exc))
        return JSONResponse(store.series(limit, offset))

    def jobs(request: Request) -> Response:
        state = request.query_params.get("state")
        if state is not None and state not in STATES:
            return _error(400, f"state must be one of {', '.join(STATES)}")
        try:
            limit, offset = _page(request)
        except _BadRequest as exc:
            return _error(400, str(exc))
        return JSONResponse([with_waiting(j, _summary(j.public()), ctx.workers, lease_s)
                             for j in store.list(state, limit, offset)])

    def job(request: Request) -> Response:
        found = store.get(request.path_params["job_id"])
        if found is None:
            return _error(404, "no such job")
        return JSONResponse(with_waiting(found, found.public(), ctx.workers, lease_s))

    def retry(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        found = store.get(job_id)
        if found is None:
            return _error(404, "no such job")
        user = request.scope.get("state", {}).get("user") or "anonymous"
        again = store.requeue(job_id, f"retried by {user}", states=("failed",))
        if again is None:
            return _error(409, f"job is {found.state}; only failed jobs can be retried")
        ctx.enqueue(job_id, 0.0)
        log.info("job %s series %s: retried by %s", job_id, again.series_uid, user)
        return JSONResponse(again.public(), status_code=202)

    async def log_level(request: Request) -> Response:
        """``GET``: the level now; ``PUT {"level": "DEBUG"}``: change it (admin users only; no restart)."""
        from node import logs

        if request.method == "GET":
            return JSONResponse({"level": logs.current_level()})
        user = request.scope.get("state", {}).get("user")
        if ctx.settings.http.tokens and user not in ctx.settings.http.admin_users:
            return _error(403, "changing the log level needs an admin user ([http] admin_users)")
        try:
            body = await request.json()
            level = logs.set_level(body["level"])
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f'the body must be {{"level": "DEBUG|INFO|WARNING|ERROR"}}: {exc}')
        log.warning("log level set to %s by %s", level, user or "anonymous")
        return JSONResponse({"level": level})

    routes = [
        Route("/healthz", healthz),
        Route("/api/log-level", log_level, methods=["GET", "PUT"]),
        Route("/metrics", metrics_text),
        Route("/api/series", series),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/jobs/{job_id}/retry", retry, methods=["POST"]),
    ]
    if ctx.receiver is not None:
        tmp = Path(ctx.settings.node.data_dir) / "tmp"
        routes += StowRoute(ctx.receiver, ctx.settings.http.max_upload_mb, tmp).routes()
    annotations = AnnotationLog(Path(ctx.settings.node.data_dir) / "annotations.sqlite")
    if ctx.runner is not None and ctx.workers is not None and ctx.settings.http.worker_tokens:
        from node.web.workers import WorkerRoutes

        routes += WorkerRoutes(ctx.settings, store, ctx.runner, ctx.workers, ctx.enqueue).routes()
    routes += Dashboard(ctx.settings, store, lambda: ctx.outbox, workers=ctx.workers).routes()
    routes += Editor(ctx.settings, store, annotations, lambda: ctx.outbox).routes()
    return Starlette(routes=routes, middleware=[Middleware(PublicPages),
                                                Middleware(TokenAuth, tokens=ctx.settings.http.tokens,
                                                           worker_tokens=ctx.settings.http.worker_tokens)])
