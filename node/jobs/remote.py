"""A worker on another machine: job records, inputs and results through the node's HTTP API.

``segnode worker --node URL --token T`` takes job ids from the Redis queue as every worker does and
runs them with the same :class:`~node.jobs.worker.JobRunner` and ``run_pipeline``. What differs is
behind :class:`NodeClient`, which stands in for the job store (claim, heartbeat, finish, fail as calls
to ``/api/worker/...``, :mod:`node.web.workers`) and supplies the runner's inputs and output hooks:

* claim: the node gives a run id, the lease length and the job's spec, never a path of its own;
* lease: a thread renews it every quarter lease while the run lasts (fetch, pipeline, upload, done);
  a 409 means the run lost the job (it expired and went to another worker, or was superseded): the
  run is dropped, its uploads and "done" would be refused anyway;
* inputs: the series arrives as a tar stream written file by file under
  ``<data_dir>/inputs/<job>/<run>.part/``, renamed to ``<run>/`` only once the end marker, file count
  and byte count are all there; a cut connection throws the partial folder away and fetches again
  with backoff, so a half-received series is never an input;
* outputs: the SEG is uploaded (with its SHA-256) as soon as the pipeline announces it, the other
  files when the run ends, then "done" with the list of files; the local copies are then removed.
  A worker holds nothing that is lost with it.

Every call is retried with exponential backoff (0.2 s doubling up to ``[worker] max_backoff_s``)
while the node is unreachable: a transfer for as long as the run holds its lease, a claim or a run's
last word ("done", "fail") until the node answers.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import Settings
from node.errors import NodeError
from node.jobs.store import Job

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Test hook: when set to a path, a run writes ``<path>.<pid>`` as its segment stage starts and waits
#: until ``<path>`` exists (a test kills it there, after the fetch, during inference).
HOLD_ENV = "SEGNODE_TEST_HOLD_SEGMENT"


class RunLost(Exception):
    """The node says this run no longer holds its job (409): drop it."""


class NodeUnreachable(OSError):
    """The node did not answer while the run could still wait for it."""


class SeriesGone(NodeError):
    """The node no longer has the job's series (410: spool retention removed it): bad input, not retried."""

    def __init__(self, message: str) -> None:
        super().__init__("series_gone", message)


class IncompleteSeries(OSError):
    """The series stream ended early or did not match what the node announced."""


@dataclass
class _Run:
    job: Job
    run_id: str
    lease_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    uploaded: dict[str, int] = field(default_factory=dict)  # relative path -> size
    held: bool = False


class _Reader:
    """Exact reads from a response's raw byte stream."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.bytes = 0

    def read(self, size: int) -> bytes:
        parts, left = [], size
        while left:
            chunk = self.raw.read(min(left, CHUNK))
            if not chunk:
                raise IncompleteSeries(f"the series stream ended {left} byte(s) early")
            parts.append(chunk)
            left -= len(chunk)
        self.bytes += size
        return parts[0] if len(parts) == 1 else b"".join(parts)


def read_tar(raw: Any, folder: Path) -> tuple[int, int]:
    """Write the members of a ustar stream into ``folder`` as they arrive; returns (files, bytes).
    Raises :class:`IncompleteSeries` unless the stream ends with its end marker."""
    reader = _Reader(raw)
    files = data = 0
    while True:
        header = reader.read(tarfile.BLOCKSIZE)
        if header == tarfile.NUL * tarfile.BLOCKSIZE:
            if reader.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise IncompleteSeries("a lone zero block in the series stream")
            return files, data
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError as exc:
            raise IncompleteSeries(f"bad tar header in the series stream: {exc}") from None
        name = info.name
        if not info.isfile() or "/" in name or name.startswith(".") or not name:
            raise IncompleteSeries(f"unexpected member {name!r} in the series stream")
        left = info.size
        with open(folder / name, "wb") as out:
            while left:
                chunk = reader.read(min(CHUNK, left))
                out.write(chunk)
                left -= len(chunk)
        if info.size % tarfile.BLOCKSIZE:
            reader.read(tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
        files, data = files + 1, data + info.size


def content_digest(path: Path) -> tuple[str, int]:
    """``sha-256=:<base64>:`` (RFC 9530) of a file, and its size."""
    with open(path, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256")
        size = handle.tell()
    return f"sha-256=:{base64.b64encode(sha.digest()).decode()}:", size


class NodeClient:
    """The job store, inputs and output hooks of a :class:`~node.jobs.worker.JobRunner` on a remote
    worker (see the module's docstring). Thread-safe: one run per job id at a time."""

    def __init__(self, settings: Settings, worker: str, *, stop: threading.Event | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        from node.http import http_session

        section = settings.worker
        if not section.node_url:
            raise ValueError("[worker] node_url is empty")
        self.base = section.node_url.rstrip("/")
        self.worker, self.device = worker, section.device or settings.segmentation.device
        self.timeout, self.max_backoff = section.timeout_s, section.max_backoff_s
        self._session_args = ("", "", section.token.get_secret_value(), section.verify_tls, section.ca_bundle)
        self._http_session = http_session
        self._local = threading.local()
        data_dir = Path(settings.node.data_dir)
        self.inputs_root, self.results_root = data_dir / "inputs", data_dir / "results"
        self.stop = stop or threading.Event()
        self._runs: dict[str, _Run] = {}
        self._last: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.hold = os.environ.get(HOLD_ENV) or None
        self.lease_s = settings.queue.stale_after_s

    # --- HTTP ---------------------------------------------------------------------------------
    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._http_session(*self._session_args)
        return session

    def _url(self, path: str) -> str:
        return f"{self.base}/api/worker{path}"

    def _call(self, method: str, path: str, *, go_on: Callable[[], bool] = lambda: True,
              what: str = "", **kwargs: Any) -> Any:
        """One request, retried with backoff on network errors and 502/503/504 while ``go_on()``;
        returns the response (any other status), or raises :class:`NodeUnreachable`."""
        import requests

        delay = 0.2
        while True:
            try:
                body = kwargs.get("data")
                if hasattr(body, "seek"):
                    body.seek(0)
                response = self._session().request(method, self._url(path), timeout=self.timeout, **kwargs)
                if response.status_code not in (502, 503, 504):
                    return response
                problem = f"HTTP {response.status_code}"
                response.close()
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if self.stop.is_set() or not go_on():
                raise NodeUnreachable(f"{what or path}: the node is unreachable ({problem})")
            log.warning("%s: node unreachable (%s); again in %.1f s", what or path, problem, delay)
            self.stop.wait(delay)
            delay = min(self.max_backoff, delay * 2)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _who(self) -> dict[str, str]:
        return {"worker": self.worker, "device": self.device}

    # --- what the worker says while idle --------------------------------------------------------
    def hello(self) -> float:
        """Tell the node this worker is here (and what it holds); returns the lease length."""
        with self._lock:
            held = next(iter(self._runs), None)
        response = self._call("POST", "/hello", json={**self._who(), "job": held}, go_on=lambda: False,
                              what="hello")
        if response.status_code != 200:
            raise NodeUnreachable(f"hello: HTTP {response.status_code}: {response.text[:200]}")
        self.lease_s = float(self._json(response).get("lease_s") or self.lease_s)
        return self.lease_s

    def say_hello_every(self, seconds: float | None = None) -> threading.Thread:
        def loop() -> None:
            while True:
                try:
                    self.hello()
                except Exception as exc:
                    log.warning("hello to the node failed: %s", exc)
                if self.stop.wait(seconds or max(0.5, self.lease_s / 3)):
                    return

        thread = threading.Thread(target=loop, name="segnode-hello", daemon=True)
        thread.start()
        return thread

    # --- the job store a JobRunner sees ---------------------------------------------------------
    def claim(self, job_id: str, worker: str) -> Job | None:
        response = self._call("POST", f"/jobs/{job_id}/claim", json=self._who(), what=f"job {job_id}: claim")
        if response.status_code != 200:
            data = self._json(response)
            log.info("job %s: not claimed (%s)", job_id, data.get("error") or response.status_code)
            with self._lock:
                if data.get("state"):
                    self._last[job_id] = Job.from_json(_stub(job_id, data["state"]))
                else:
                    self._last.pop(job_id, None)
            return None
        data = self._json(response)
        job = Job(**{**data["job"], "folder": "", "state": "running", "worker": worker})
        run = _Run(job, str(data["run_id"]), float(data.get("lease_s") or self.lease_s))
        with self._lock:
            self._runs[job_id] = run
            self._last[job_id] = job
        threading.Thread(target=self._keep_lease, args=(run,), name=f"lease-{job_id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._last.get(job_id)

    def heartbeat(self, job_id: str, run_id: str) -> bool:
        """Whether the run still holds the job (the lease thread renews it)."""
        run = self._runs.get(job_id)
        return run is not None and run.run_id == run_id and not run.lost.is_set()

    def progress(self, job_id: str, run_id: str, stage: str, fraction: float,
                 timings: dict[str, float] | None = None) -> bool:
        run = self._runs.get(job_id)
        if run is None or run.run_id != run_id or run.lost.is_set():
            return False
        try:
            response = self._session().post(self._url(f"/jobs/{job_id}/heartbeat"), timeout=self.timeout, json={
                **self._who(), "run_id": run_id, "stage": stage, "progress": fraction, "timings": timings})
        except Exception as exc:  # the lease thread keeps trying; a blip must not drop the run
            log.debug("job %s: progress not sent: %s", job_id, exc)
            return True
        if response.status_code == 409:
            run.lost.set()
            return False
        if stage == "segment" and self.hold and not run.held:
            run.held = True
            self._hold(run)
        return True

    def finish(self, job_id: str, run_id: str, results: str, timings: dict[str, float],
               failed_outputs: dict[str, dict[str, str]] | None = None) -> bool:
        """Upload what is not yet on the node, then "done" (with the outputs that failed, as
        :meth:`node.jobs.store.JobStore.finish` takes them); False if the run lost the job."""
        run = self._runs.get(job_id)
        if run is None or run.run_id != run_id:
            return False
        try:
            if run.lost.is_set():
                raise RunLost(f"job {job_id}: the run lost its lease")
            started = time.monotonic()
            outdir = Path(results)
            files = sorted(p for p in outdir.rglob("*") if p.is_file())
            for path in files:
                relative = path.relative_to(outdir).as_posix()
                if relative not in run.uploaded:
                    self._upload(run, relative, path)
            sizes = {p.relative_to(outdir).as_posix(): p.stat().st_size for p in files}
            body = {**self._who(), "run_id": run_id, "files": sizes, "failed_outputs": failed_outputs or {},
                    "timings": {**timings, "upload": round(time.monotonic() - started, 3)}}
            for _ in range(3):
                response = self._call("POST", f"/jobs/{job_id}/done", json=body, what=f"job {job_id}: done")
                if response.status_code == 200:
                    return True
                if response.status_code == 422:  # a file the node does not have: send those again
                    for relative in self._json(response).get("missing") or []:
                        if relative in sizes:
                            self._upload(run, relative, outdir / relative)
                    continue
                log.info("job %s: done refused (%s): the run lost the job", job_id, response.status_code)
                return False
            return False
        except RunLost:
            return False
        finally:
            self._end(job_id, run)

    def fail(self, job_id: str, run_id: str, code: str, message: str, retry_in: float | None,
             timings: dict[str, float] | None = None) -> Job | None:
        """Report the failure; the node decides on a retry (and re-enqueues). None: the run lost the job."""
        run = self._runs.get(job_id)
        if run is None or run.run_id != run_id:
            return None
        try:
            response = self._call("POST", f"/jobs/{job_id}/fail", what=f"job {job_id}: fail", json={
                **self._who(), "run_id": run_id, "code": code, "message": message, "timings": timings or {}})
            if response.status_code != 200:
                return None
            job = run.job
            job.state = self._json(response).get("state") or "failed"
            return job
        finally:
            self._end(job_id, run)

    def release(self, job_id: str, run_id: str, reason: str) -> Job | None:
        """This worker stops with the run unfinished: the node queues the job again now (instead of
        when the lease expires). None if the run no longer held it, or the node did not answer."""
        run = self._runs.get(job_id)
        if run is None or run.run_id != run_id:
            return None
        try:
            response = self._call("POST", f"/jobs/{job_id}/release", go_on=lambda: False,
                                  what=f"job {job_id}: release", json={**self._who(), "run_id": run_id, "reason": reason})
        except NodeUnreachable as exc:
            log.warning("%s: its lease will expire instead", exc)
            return None
        finally:
            self._end(job_id, run)
        if response.status_code != 200:
            return None
        run.job.state = "queued"
        return run.job

    def mutate(self, job_id: str, change: Callable[[Job], bool]) -> Job | None:
        """Notes on the record stay with the node; a remote run only logs them."""
        return None

    # --- inputs and outputs -------------------------------------------------------------------
    @contextmanager
    def inputs(self, job: Job) -> Iterator[Path]:
        """The job's series in a local folder for the run's length (removed afterwards)."""
        run = self._run(job.id, job.run_id or "")
        folder = self.inputs_root / job.id / run.run_id
        try:
            self._fetch(run, folder)
            yield folder
        finally:
            shutil.rmtree(self.inputs_root / job.id, ignore_errors=True)

    def _fetch(self, run: _Run, folder: Path) -> None:
        import requests
        import urllib3

        part = folder.with_name(folder.name + ".part")
        delay = 0.2
        while True:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            try:
                response = self._call("GET", f"/jobs/{run.job.id}/series", params={"run_id": run.run_id},
                                      stream=True, go_on=self._going_on(run), what=f"job {run.job.id}: fetch")
                with response:
                    if response.status_code in (404, 409):
                        run.lost.set()
                        raise RunLost(f"job {run.job.id}: fetch refused: {response.text[:200]}")
                    if response.status_code == 410:
                        raise SeriesGone(f"the node no longer has the series of job {run.job.id}")
                    if response.status_code != 200:
                        raise IncompleteSeries(f"fetch: HTTP {response.status_code}: {response.text[:200]}")
                    expected = (int(response.headers["x-segnode-files"]), int(response.headers["x-segnode-bytes"]))
                    got = read_tar(response.raw, part)
                if got != expected:
                    raise IncompleteSeries(f"got {got[0]} file(s), {got[1]} bytes; the node sent {expected}")
                os.replace(part, folder)
                log.info("job %s: fetched %d instance(s), %d bytes", run.job.id, *got)
                return
            except (IncompleteSeries, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                if isinstance(exc, NodeUnreachable):
                    raise
                shutil.rmtree(part, ignore_errors=True)
                if self.stop.is_set() or not self._going_on(run)():
                    raise NodeUnreachable(f"job {run.job.id}: fetch failed: {exc}") from None
                log.warning("job %s: fetch cut off (%s); again in %.1f s", run.job.id, exc, delay)
                self.stop.wait(delay)
                delay = min(self.max_backoff, delay * 2)

    def deliver(self, job: Job, name: str, path: Path) -> None:
        """The ``on_output`` hook: an output to deliver (the SEG) goes to the node now."""
        run = self._run(job.id, job.run_id or "")
        outdir = self.results_root / job.id / run.run_id
        self._upload(run, path.relative_to(outdir).as_posix(), path, output=name)

    def cleanup(self, job: Job, outdir: Path) -> None:
        """The hook after "done": the node has the results; nothing stays here."""
        shutil.rmtree(self.results_root / job.id, ignore_errors=True)

    def _upload(self, run: _Run, relative: str, path: Path, output: str | None = None) -> None:
        digest, size = content_digest(path)
        headers = {"content-digest": digest, "content-type": "application/octet-stream"}
        if output:
            headers["x-segnode-output"] = output
        for _ in range(5):
            with open(path, "rb") as body:
                response = self._call("PUT", f"/jobs/{run.job.id}/results/{relative}", params={"run_id": run.run_id},
                                      data=body, headers=headers, go_on=self._going_on(run),
                                      what=f"job {run.job.id}: upload {relative}")
            if response.status_code in (200, 201):
                run.uploaded[relative] = size
                return
            if response.status_code in (404, 409):
                run.lost.set()
                raise RunLost(f"job {run.job.id}: upload refused: {response.text[:200]}")
            log.warning("job %s: upload of %s: HTTP %d %s; again", run.job.id, relative, response.status_code,
                        response.text[:200])
        raise OSError(f"job {run.job.id}: upload of {relative} refused 5 times")

    # --- the run's lease ------------------------------------------------------------------------
    def _run(self, job_id: str, run_id: str) -> _Run:
        run = self._runs.get(job_id)
        if run is None or run.run_id != run_id:
            raise RunLost(f"job {job_id}: run {run_id} is not held here")
        if run.lost.is_set():
            raise RunLost(f"job {job_id}: the run lost its lease")
        return run

    def _going_on(self, run: _Run) -> Callable[[], bool]:
        return lambda: not run.lost.is_set() and not run.ended.is_set()

    def _keep_lease(self, run: _Run) -> None:
        """Renew the lease every quarter of it until the run ends; a 409 means it is lost."""
        while not run.ended.wait(run.lease_s / 4):
            try:
                response = self._session().post(self._url(f"/jobs/{run.job.id}/heartbeat"), timeout=self.timeout,
                                                json={**self._who(), "run_id": run.run_id})
            except Exception as exc:
                log.warning("job %s: heartbeat not sent: %s", run.job.id, exc)
                continue
            if response.status_code in (404, 409):
                log.warning("job %s: the node says this run lost the job; dropping it", run.job.id)
                run.lost.set()
                self._end(run.job.id, run)
                return

    def _end(self, job_id: str, only: _Run | None = None) -> None:
        with self._lock:
            run = self._runs.get(job_id)
            if run is None or (only is not None and run is not only):
                return
            del self._runs[job_id]
        run.ended.set()

    def _hold(self, run: _Run) -> None:
        assert self.hold is not None
        marker = Path(f"{self.hold}.{os.getpid()}")
        marker.with_name(f".{marker.name}").write_text(run.job.id)
        os.replace(marker.with_name(f".{marker.name}"), marker)
        while not Path(self.hold).exists() and not run.lost.is_set() and not self.stop.wait(0.02):
            pass

    def clean(self) -> None:
        """At start: what a killed worker left (inputs, unfinished results) is not state; remove it."""
        for root in (self.inputs_root, self.results_root):
            shutil.rmtree(root, ignore_errors=True)


def _stub(job_id: str, state: str) -> str:
    import json

    return json.dumps({"id": job_id, "key": "", "series_uid": "", "study_uid": "", "generation": 0, "folder": "",
                       "instance_count": 0, "rule": "", "pipeline": {}, "pipeline_version": "", "engine": "",
                       "state": state})
