"""The node's routes for remote workers (``segnode worker --node``): a job's inputs out, its results in.

Worker tokens only (``[http] worker_tokens``, :mod:`node.web.auth`); every job route also needs the
run id the worker got when it claimed the job, and answers 409 once that run no longer holds the job
(its lease expired and the job went back to the queue, or a newer series superseded it): a late
worker's heartbeats, fetches, uploads and its "done" are refused, and it drops the job.

=============================================  ================================================================
``POST /api/worker/hello``                     "I am here" (id, device): the node lists the worker; gives the lease
``POST /api/worker/jobs/{id}/claim``           queued -> running for this worker: a run id, the lease, the job's
                                               spec (no paths of the node); 409 if not claimable
``POST /api/worker/jobs/{id}/heartbeat``       renew the lease (and report stage/progress); 409: lost
``GET  /api/worker/jobs/{id}/series?run_id=``  the job's instances as one tar stream (below)
``PUT  /api/worker/jobs/{id}/results/{path}``  one result file, ``Content-Digest: sha-256=:<b64>:`` (RFC 9530);
                                               ``X-Segnode-Output: <name>`` marks an output to deliver now
``POST /api/worker/jobs/{id}/done``            the run is complete: the files it uploaded (path -> size)
``POST /api/worker/jobs/{id}/fail``            the run failed: code and message; the node decides on a retry
``POST /api/worker/jobs/{id}/release``         the worker stops: the job back to the queue now, attempt not counted
=============================================  ================================================================

Why a tar stream and not multipart/related (WADO-RS): each member's size is in its 512-byte header, so
the worker writes each file as it arrives without searching the bytes for a boundary; tar has an end
marker (two zero blocks) and the response says how many files and bytes to expect, so a cut
connection is always seen as a half-received series (the worker throws it away and fetches again);
the standard library reads and writes it; ``curl ... | tar t`` shows it. Only segnode workers read this
route, so DICOMweb's interoperability buys nothing here.

Uploads are idempotent per file: a PUT writes to a temporary name, checks the digest, renames; the same
file again (same digest) is acknowledged without a rewrite. A delivered output (the SEG) goes to the
outbox as soon as it is stored, as an in-process worker's does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from node import metrics
from node.config import Settings
from node.jobs.store import Job, JobStore
from node.jobs.workers import GPU, WorkerRegistry, device_kind, job_device, queue_kind

log = logging.getLogger(__name__)

#: Bytes per read of a spool file (and per chunk of the response).
CHUNK = 1 << 20
#: One path component of a result file: no separators, no leading dot (no ``..``, no hidden files).
_COMPONENT = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,199}$")
#: What the worker may see of its job: its spec, never a path of the node (spool folder, results).
JOB_FIELDS = ("id", "key", "series_uid", "study_uid", "generation", "instance_count", "rule", "pipeline",
              "pipeline_version", "engine", "attempts", "max_attempts", "run_id", "created", "started")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def worker_job(job: Job) -> dict[str, Any]:
    """The job as a worker receives it."""
    public = job.public()
    return {"key": job.key, **{k: public[k] for k in JOB_FIELDS if k in public}}


def safe_result_path(relative: str) -> str | None:
    """``relative`` if it is a plain relative path below the results folder, else None."""
    parts = relative.split("/")
    if not 1 <= len(parts) <= 8 or not all(_COMPONENT.match(p) for p in parts):
        return None
    return "/".join(parts)


def parse_digest(header: str) -> bytes | None:
    """The SHA-256 of a ``Content-Digest: sha-256=:<base64>:`` header (RFC 9530), or None."""
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name.strip().lower() == "sha-256" and value.startswith(":") and value.endswith(":"):
            try:
                digest = base64.b64decode(value[1:-1], validate=True)
            except (binascii.Error, ValueError):
                return None
            return digest if len(digest) == 32 else None
    return None


def series_files(folder: Path) -> list[Path]:
    """The instances of a spool series folder, as the in-process worker reads them."""
    return sorted(p for p in folder.glob("*.dcm") if p.is_file()) if folder.is_dir() else []


def tar_size(sizes: Iterable[int]) -> int:
    """The length of :func:`tar_stream`'s output: a header and whole blocks per file, two end blocks."""
    block = tarfile.BLOCKSIZE
    return sum(block + -(-size // block) * block for size in sizes) + 2 * block


def tar_stream(files: list[tuple[str, Path, int]], batch: int = 4 * CHUNK) -> Iterator[bytes]:
    """A POSIX ustar stream of ``(name, path, size)``, written as it is read, in pieces of about
    ``batch`` bytes (a few MiB in memory: each piece costs the server a hop to a thread, so not one
    per 512-byte header)."""
    pending = bytearray()
    for name, path, size in files:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        pending += info.tobuf(format=tarfile.USTAR_FORMAT)
        left = size
        with open(path, "rb") as handle:
            while left:
                chunk = handle.read(min(batch, left))
                if not chunk:
                    raise OSError(f"{name}: shorter than {size} bytes")
                left -= len(chunk)
                pending += chunk
                if len(pending) >= batch:
                    yield bytes(pending)
                    pending.clear()
        if size % tarfile.BLOCKSIZE:
            pending += tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
    pending += tarfile.NUL * (2 * tarfile.BLOCKSIZE)
    yield bytes(pending)


class WorkerRoutes:
    """The routes above, over the node's job store and its in-process :class:`~node.jobs.worker.JobRunner`
    (whose ``complete``/``failed_elsewhere``/``deliver`` run the same hooks as a local run: outbox)."""

    def __init__(self, settings: Settings, store: JobStore, runner: Any, registry: WorkerRegistry,
                 enqueue: Callable[[str, float], None]) -> None:
        self.settings, self.store, self.runner, self.registry = settings, store, runner, registry
        self.enqueue = enqueue
        self.lease_s = settings.queue.stale_after_s
        self.results_root = Path(settings.node.data_dir) / "results"

    def routes(self) -> list[Route]:
        return [
            Route("/api/worker/hello", self.hello, methods=["POST"]),
            Route("/api/worker/jobs/{job_id}/claim", self.claim, methods=["POST"]),
            Route("/api/worker/jobs/{job_id}/heartbeat", self.heartbeat, methods=["POST"]),
            Route("/api/worker/jobs/{job_id}/series", self.series, methods=["GET"]),
            Route("/api/worker/jobs/{job_id}/results/{path:path}", self.upload, methods=["PUT"]),
            Route("/api/worker/jobs/{job_id}/done", self.done, methods=["POST"]),
            Route("/api/worker/jobs/{job_id}/fail", self.fail, methods=["POST"]),
            Route("/api/worker/jobs/{job_id}/release", self.release, methods=["POST"]),
        ]

    # --- who is asking ------------------------------------------------------------------------
    @staticmethod
    def _name(request: Request) -> str:
        return str(request.scope.get("state", {}).get("user") or "")

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, ClientDisconnect):
            return {}
        return body if isinstance(body, dict) else {}

    def _seen(self, request: Request, body: dict[str, Any], job: str | None | bool = False) -> str:
        worker = str(body.get("worker") or "")[:200]
        self.registry.seen(worker, name=self._name(request), device=str(body.get("device") or "cpu")[:20], job=job)
        return worker

    def _held(self, request: Request, job_id: str, run_id: str) -> Job | JSONResponse:
        """The job if the asking worker's run holds it; else 404/409 (the worker drops the job)."""
        job = self.store.get(job_id)
        if job is None:
            return _error(404, "no such job")
        holder = (job.worker or "").split(":", 3)
        if not run_id or job.state != "running" or job.run_id != run_id or holder[-1] != self._name(request):
            return _error(409, f"this run does not hold the job (it is {job.state})", state=job.state)
        return job

    async def _run_call(self, request: Request) -> tuple[str, dict[str, Any], Job | JSONResponse]:
        """What a call about a run (heartbeat, done, fail, release) starts from: the job id, the JSON body,
        and the job if the asking worker's run (``run_id`` in the body) holds it, else the 404/409 answer."""
        job_id = request.path_params["job_id"]
        body = await self._body(request)
        return job_id, body, self._held(request, job_id, str(body.get("run_id") or ""))

    @staticmethod
    def _timings(body: dict[str, Any]) -> dict[str, float]:
        timings = body.get("timings") if isinstance(body.get("timings"), dict) else {}
        return {str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}

    # --- routes -------------------------------------------------------------------------------
    async def hello(self, request: Request) -> Response:
        body = await self._body(request)
        if not body.get("worker"):
            return _error(400, "worker (its id) is required")
        job_id = body.get("job")
        if job_id:  # a hello sent during a run may arrive after its end: only a job it still runs counts
            job = self.store.get(str(job_id))
            holder = f"{body['worker']}:{self._name(request)}"
            job_id = job.id if job is not None and job.state == "running" and job.worker == holder else None
        self._seen(request, body, job=job_id or None)
        return JSONResponse({"lease_s": self.lease_s})

    async def claim(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        body = await self._body(request)
        if not body.get("worker"):
            return _error(400, "worker (its id) is required")
        worker = self._seen(request, body)
        current = self.store.get(job_id)
        if current is None:
            return _error(404, "no such job")
        if queue_kind(job_device(current.pipeline)) == GPU and device_kind(str(body.get("device") or "cpu")) != GPU:
            return _error(409, "this job needs a GPU worker", state=current.state)
        job = self.store.claim(job_id, f"{worker}:{self._name(request)}")
        if job is None:
            return _error(409, f"job is {current.state}, not claimable now", state=current.state)
        self.registry.seen(worker, name=self._name(request), device=str(body.get("device") or "cpu"), job=job_id)
        log.info("job %s series %s: claimed by worker %s (%s)", job.id, job.series_uid, worker, self._name(request))
        return JSONResponse({"run_id": job.run_id, "lease_s": self.lease_s, "job": worker_job(job)})

    async def heartbeat(self, request: Request) -> Response:
        job_id, body, held = await self._run_call(request)
        if isinstance(held, JSONResponse):
            return held
        run_id = str(held.run_id)
        self._seen(request, body, job=job_id)
        if body.get("stage"):
            owned = self.store.progress(job_id, run_id, str(body["stage"]), float(body.get("progress") or 0.0),
                                        body.get("timings") if isinstance(body.get("timings"), dict) else None)
        else:
            owned = self.store.heartbeat(job_id, run_id)
        if not owned:
            return _error(409, "this run no longer holds the job")
        return JSONResponse({"lease_s": self.lease_s})

    def series(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        held = self._held(request, job_id, request.query_params.get("run_id", ""))
        if isinstance(held, JSONResponse):
            return held
        files = [(p.name, p, p.stat().st_size) for p in series_files(Path(held.folder))]
        if not files:
            return _error(410, "the series is no longer in the spool")
        total = sum(size for _, _, size in files)
        log.info("job %s: sending %d instance(s), %d bytes, to its worker", job_id, len(files), total)
        return StreamingResponse(tar_stream(files), media_type="application/x-tar", headers={
            "content-length": str(tar_size(size for _, _, size in files)), "x-segnode-files": str(len(files)),
            "x-segnode-bytes": str(total), "cache-control": "no-store"})

    async def upload(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        relative = safe_result_path(request.path_params["path"])
        if relative is None:
            return _error(400, "the result path must be relative, without '..' or hidden names")
        digest = parse_digest(request.headers.get("content-digest", ""))
        if digest is None:
            return _error(400, "Content-Digest: sha-256=:<base64>: is required")
        run_id = request.query_params.get("run_id", "")
        held = self._held(request, job_id, run_id)
        if isinstance(held, JSONResponse):
            return held
        run_dir = self.results_root / job_id / run_id
        target = run_dir / relative
        stored = target.is_file() and _sha256(target) == digest
        if not stored:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.part")
            sha, limit, size = hashlib.sha256(), self.settings.http.max_upload_mb << 20, 0
            try:
                with open(temp, "wb") as out:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:
                            break
                        sha.update(chunk)
                        out.write(chunk)
                if size > limit:
                    temp.unlink(missing_ok=True)
                    return _error(413, f"a result file may have at most [http] max_upload_mb = "
                                       f"{self.settings.http.max_upload_mb} MB")
                if sha.digest() != digest:
                    temp.unlink(missing_ok=True)
                    return _error(422, "the body does not match its Content-Digest")
                os.replace(temp, target)
            except ClientDisconnect:
                temp.unlink(missing_ok=True)
                return _error(400, "the upload was cut off")
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        # The run may have lost the job while its body arrived: refuse rather than deliver.
        held = self._held(request, job_id, run_id)
        if isinstance(held, JSONResponse):
            return held
        output = request.headers.get("x-segnode-output")
        if output:
            self.runner.deliver(held, output[:100], target)
        return JSONResponse({"path": relative, "stored": not stored}, status_code=201 if not stored else 200)

    async def done(self, request: Request) -> Response:
        job_id, body, held = await self._run_call(request)
        if isinstance(held, JSONResponse):
            return held
        worker = self._seen(request, body, job=None)
        run_dir = self.results_root / job_id / str(held.run_id)
        files = body.get("files") if isinstance(body.get("files"), dict) else {}
        missing = sorted(path for path, size in files.items()
                         if safe_result_path(path) is None or not (run_dir / path).is_file()
                         or (run_dir / path).stat().st_size != size)
        if missing:
            return _error(422, "results missing or incomplete; upload them again", missing=missing)
        timings = self._timings(body)
        # Outputs that failed while the segmentation succeeded: "done, N output(s) failed", as a local run.
        reported = body.get("failed_outputs") if isinstance(body.get("failed_outputs"), dict) else {}
        failed = {str(name)[:100]: {"code": str(e.get("code", ""))[:64],
                                    "message": str(e.get("message", ""))[:2000]}
                  for name, e in reported.items() if isinstance(e, dict)}
        run_dir.mkdir(parents=True, exist_ok=True)
        state = self.runner.complete(held, run_dir, timings, failed)
        fetch_s, upload_s = timings.get("fetch", 0.0), timings.get("upload", 0.0)
        metrics.WORKER_TRANSFER_SECONDS.labels(direction="fetch").observe(fetch_s)
        metrics.WORKER_TRANSFER_SECONDS.labels(direction="upload").observe(upload_s)
        if state != "done":
            return _error(409, "this run no longer holds the job", state=state)
        self.registry.ended(worker, job_id, "done", fetch_s=fetch_s, upload_s=upload_s)
        metrics.WORKER_JOBS.labels(worker=self._name(request), state="done").inc()
        return JSONResponse({"state": state})

    async def fail(self, request: Request) -> Response:
        job_id, body, held = await self._run_call(request)
        if isinstance(held, JSONResponse):
            return held
        worker = self._seen(request, body, job=None)
        timings = self._timings(body)
        code = str(body.get("code") or "internal_error")[:64]
        message = str(body.get("message") or "")[:2000]
        state = self.runner.failed_elsewhere(held, code, message, timings)
        if state is None:
            return _error(409, "this run no longer holds the job")
        self.registry.ended(worker, job_id, state, fetch_s=timings.get("fetch", 0.0))
        metrics.WORKER_JOBS.labels(worker=self._name(request), state=state).inc()
        return JSONResponse({"state": state})

    async def release(self, request: Request) -> Response:
        """The worker stops with the run unfinished (``segnode worker`` on SIGTERM): queued again at
        once for another worker, as a stopping node does with its own runs."""
        job_id, body, held = await self._run_call(request)
        if isinstance(held, JSONResponse):
            return held
        worker = self._seen(request, body, job=None)
        run_id = str(held.run_id)
        reason = str(body.get("reason") or "the worker stopped")[:500]
        after = self.store.release(job_id, run_id, f"worker {self._name(request)}: {reason}")
        if after is None:
            return _error(409, "this run no longer holds the job")
        self.enqueue(job_id, 0.0)
        self.registry.ended(worker, job_id, "released")
        log.info("job %s: released by its worker (%s)", job_id, reason)
        return JSONResponse({"state": after.state})


def _sha256(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()
