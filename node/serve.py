"""``segnode serve``: DICOM listener + HTTP app + job workers in one process; ``segnode worker``: extra
workers on other machines (Redis queue).

Worker model. ``serve`` runs everything in one process: uvicorn in the main thread (it owns
SIGINT/SIGTERM), the DICOM listener in its threads, and huey's consumer with ``[queue] workers``
worker threads plus its scheduler thread (for delayed retries). Threads, not processes, because the
heavy stages run in numpy/scipy/torch, which release the GIL (and nnU-Net starts its own worker
processes); one process means one job store connection pool, one metrics registry for ``/metrics``,
and no fork of a process that holds sockets, SQLite handles and torch state. Isolation comes from
durability instead: a crash or ``kill -9`` loses nothing — at the next start every job left running
is queued again (:func:`node.jobs.reconcile`) and completes exactly once (the job store's
compare-and-set). A lock file keeps a second ``serve`` off the same data folder, which is what makes
"every running job is an orphan at start" true with SQLite. For more machines, or to keep the engine
out of the listener's process: ``[queue] backend = "redis"`` and ``segnode worker`` where the GPUs are.
A worker with ``[worker] node_url`` (``segnode worker --node URL --token T``) needs no shared folder:
it claims jobs, fetches their series and uploads their results through the node's ``/api/worker``
routes (:mod:`node.jobs.remote`, :mod:`node.web.workers`), and the node keeps every record, spool
file and delivery; without ``node_url`` it reads the spool itself (a shared mount) as before.
``[queue] workers = 0`` keeps a Redis node from running jobs itself.

Stopping (SIGTERM or SIGINT, :func:`drain`). HTTP stops taking requests and finishes those in flight
(10 s), the DICOM listener stops (stores in progress finish, open associations are cut: the sender
has no acknowledgement for the rest and sends it again), the workers take no new job and running
jobs get ``[queue] stop_grace_s`` to finish; those still running then are requeued at once (the
cut-off attempt not counted: :meth:`~node.jobs.worker.JobRunner.release_running`), so the next start,
or another worker, runs them again, and the run left behind owns nothing. Then the outbox stops (a
delivery in flight is asked about before it is sent again), the ingest journal is checkpointed and
closed (every acknowledged instance durable in the spool, nothing to replay at the next start), and
the job store is closed. A process with runs left behind ends with ``os._exit`` once all that is
done (the CLI does it), instead of waiting for them. ``segnode install-service`` sets the unit's
TimeoutStopSec to ``stop_grace_s`` plus :data:`STOP_MARGIN_S`.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from node.config import Settings
from node.ingest import Sender, SeriesReady
from node.ingest.receiver import Receiver
from node.jobs import Router, open_store, reconcile
from node.jobs.queue import JobQueue, make_hueys
from node.jobs.store import JobStore, worker_id
from node.jobs.worker import Hook, JobRunner
from node.jobs.workers import ANY, WorkerRegistry, job_device, queue_kind, queue_kinds_for
from node import metrics

log = logging.getLogger(__name__)


#: Seconds a stop needs beyond ``[queue] stop_grace_s``: HTTP's graceful end (10 s), the listener's
#: (up to 10 s), the outbox, the journal checkpoint.
STOP_MARGIN_S = 40


class ServeError(Exception):
    """The node cannot start, as one line for people."""


class MeteredReceiver(Receiver):
    """The ingest receiver, counting instances, refusals and associations for ``/metrics``."""

    def store(self, dataset, sender: Sender, **kwargs):  # type: ignore[override]
        result = super().store(dataset, sender, **kwargs)
        (metrics.INSTANCES_RECEIVED if result.ok else metrics.INSTANCES_REFUSED).labels(via=sender.via).inc()
        return result

    def new_session(self, kind: str = "session") -> str:
        if kind == "dimse":
            metrics.ASSOCIATIONS.inc()
        return super().new_session(kind)


def _lock(data_dir: Path) -> IO[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "serve.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ServeError(f"another segnode serve is using {data_dir}") from None
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _check_http(settings: Settings) -> None:
    host = settings.http.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if (settings.http.tls_cert is None) != (settings.http.tls_key is None):
        raise ServeError("[http] tls_cert and tls_key go together")
    if not settings.http.tokens and not loopback:
        raise ServeError(f"[http] tokens are empty: the API would be open on {host}; "
                         "set tokens or listen on 127.0.0.1")


def _watch_orphans(store: JobStore, enqueue: Callable[[str, float], None], stale_after: float,
                   stop: threading.Event, tick: Callable[[], None] = lambda: None) -> None:
    """Now and then: jobs whose worker went silent (another machine died: its lease expired) are
    queued again, for another worker."""
    while not stop.wait(min(60.0, stale_after / 2)):
        try:
            tick()
            reconcile(store, enqueue, stale_after=stale_after, resend_queued=False)
        except Exception:
            log.exception("orphan check failed")


def kind_of_job(store: JobStore) -> Callable[[str], str]:
    """The queue a job id goes to (by the device its rule asks for)."""
    def kind(job_id: str) -> str:
        job = store.get(job_id)
        return queue_kind(job_device(job.pipeline)) if job is not None else ANY

    return kind


def _warm_up(settings: Settings) -> None:
    """In the background: what the first job would otherwise pay (highdicom's import and tables; the
    ``[segmentation] preload`` models, per device, into this process's model cache)."""
    from node.segment import warmup

    warmup.start(settings, devices=list(settings.segmentation.devices) or None)

    def run() -> None:
        try:
            from node.dicom.seg_write import warm_up

            warm_up()
        except Exception:  # only a lost head start
            log.warning("warm-up failed", exc_info=True)

    threading.Thread(target=run, name="segnode-warm-up", daemon=True).start()


def _reload_on_sighup() -> None:
    """SIGHUP reads the config again for the log level and ``log_phi`` (:func:`node.logs.reload`)."""
    from node import logs

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda sig, frame: logs.reload())


def _drain(queue: JobQueue, runner: JobRunner, grace: float) -> int:
    """Stop taking jobs, give running ones ``grace`` seconds, requeue the rest; how many were left."""
    queue.stop(timeout=grace)
    left = runner.release_running(f"node stopping: still running {grace:g} s after the stop signal "
                                  "([queue] stop_grace_s)")
    if left:
        log.warning("stop: %d job(s) requeued, their runs cut off: %s", len(left), ", ".join(left))
    else:
        log.info("stop: no job running")
    return len(left)


def _workers(settings: Settings) -> int:
    """Local worker threads: ``[queue] workers`` (0: none), at least one per ``[segmentation] devices``."""
    workers = settings.queue.workers
    return max(workers, len(settings.segmentation.devices)) if workers else 0


def _local_device(settings: Settings) -> str:
    """The device that decides which queues the local workers take: the first of ``devices``, or ``device``."""
    return (list(settings.segmentation.devices) or [settings.segmentation.device])[0]


def serve(settings: Settings, *, on_started: Callable[[], None] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM, then drain; returns how many runs were cut off (their
    threads still run: the caller should end the process without waiting for them)."""
    import uvicorn

    from node.export.outbox import Outbox
    from node.fetch import OrthancIntake
    from node.ingest.scp import Listener
    from node.web.app import AppContext, create_app

    _check_http(settings)
    data_dir = Path(settings.node.data_dir)
    lock = _lock(data_dir)
    log.info("config: %s; data in %s", settings.source.describe(), data_dir)
    store = open_store(settings)
    runner: list[JobRunner] = []
    queue = JobQueue(make_hueys(settings), lambda job_id: runner[0].run(job_id), kind_of=kind_of_job(store))
    workers = WorkerRegistry()
    receiver = MeteredReceiver.from_settings(settings)
    # The outbox: a job's SEG is queued for its destinations as soon as it is written (the meshes and
    # NIfTI files follow while it is sent), a done job's DICOM results again (a no-op for those already
    # queued); durably, before the hook returns; delivered by one thread per destination; states go to
    # the job's record.
    outbox = Outbox.from_settings(settings, on_change=store.set_destinations)
    hooks: tuple[Hook, ...] = (outbox.enqueue_results,)  # spool retention is the receiver's hourly timer
    runner.append(JobRunner(store, settings, enqueue=queue.enqueue, hooks=hooks,
                            on_output=(outbox.enqueue_output,)))
    router = Router(settings, store, queue.enqueue,
                    sop_uids=lambda uid: [r.info.sop_instance_uid for r in receiver.spool.instances(uid)])

    def on_series_ready(ready: SeriesReady) -> None:
        metrics.SERIES_COMPLETED.labels(reason=ready.reason).inc()
        router.on_series_ready(ready)

    receiver.on_series_ready = on_series_ready
    stop = threading.Event()
    listener = None
    try:
        counts = reconcile(store, queue.enqueue, stale_after=settings.queue.stale_after_s,
                           all_running_are_orphans=settings.queue.backend == "sqlite")
        log.info("jobs at start: %d requeued (worker gone), %d failed (no attempts left), %d queued",
                 counts["requeued"], counts["failed"], counts["queued"])
        receiver.start()
        local = worker_id()
        if _workers(settings):
            queue.start(_workers(settings), kinds=queue_kinds_for(_local_device(settings)))
            workers.seen(local, name="local", device=settings.segmentation.device, job=None)
        caught_up = outbox.catch_up(store.list("done", limit=1000))
        if caught_up:
            log.info("outbox: %d done job(s) had results not yet queued; queued now", caught_up)
        outbox.start()
        _warm_up(settings)
        tick = ((lambda: workers.seen(local, name="local", device=settings.segmentation.device))
                if settings.queue.workers else (lambda: None))
        threading.Thread(target=_watch_orphans, args=(store, queue.enqueue, settings.queue.stale_after_s, stop, tick),
                         name="segnode-orphans", daemon=True).start()
        listener = Listener(settings.dicom, receiver).start()
        app = create_app(AppContext(settings, store, queue.enqueue, receiver, outbox=outbox,
                                    ingest_problem=receiver.spool.problem, runner=runner[0],
                                    workers=workers))  # fmt: skip
        app.router.routes.extend(OrthancIntake(settings, receiver).routes())  # the Orthanc plugin's hand-off
        config = uvicorn.Config(app, host=settings.http.host, port=settings.http.port, log_config=None,
                                lifespan="off", timeout_graceful_shutdown=10)
        if settings.http.tls_cert is not None:
            config.ssl_certfile, config.ssl_keyfile = str(settings.http.tls_cert), str(settings.http.tls_key)
        server = uvicorn.Server(config)
        log.info("HTTP%s on %s:%d, %d worker thread(s), queue %s", "S" if settings.http.tls_cert else "",
                 settings.http.host, settings.http.port, settings.queue.workers, settings.queue.backend)
        if on_started is not None:
            on_started()
        # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises them to the handlers it found:
        # make those a note, so that the shutdown below runs and the exit status is 0.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda sig, frame: log.info("stopping (%s)", signal.Signals(sig).name))
        _reload_on_sighup()
        server.run()
    finally:
        stop.set()
        if listener is not None:
            listener.stop()
        left = _drain(queue, runner[0], settings.queue.stop_grace_s)
        outbox.close()
        receiver.close()
        log.info("journal closed: every acknowledged instance is in the spool by itself")
        store.close()
        lock.close()
        log.info("stopped")
    return left


def work(settings: Settings) -> int:
    """``segnode worker``: run jobs from the Redis queue until SIGINT/SIGTERM (no listener, no HTTP),
    then drain as ``serve`` does; returns how many runs were cut off. With ``[worker] node_url``: a
    remote worker (:func:`work_remote`)."""
    if settings.worker.node_url:
        return work_remote(settings)
    if settings.queue.backend != "redis":
        raise ServeError('segnode worker needs [queue] backend = "redis"; with SQLite, raise [queue] workers')
    store = open_store(settings)
    runner: list[JobRunner] = []
    queue = JobQueue(make_hueys(settings), lambda job_id: runner[0].run(job_id), kind_of=kind_of_job(store))
    from node.export.outbox import Outbox

    # Results are written here, so they are delivered from here (this machine's <data_dir>/outbox).
    outbox = Outbox.from_settings(settings, on_change=store.set_destinations)
    runner.append(JobRunner(store, settings, enqueue=queue.enqueue, hooks=(outbox.enqueue_results,),
                            on_output=(outbox.enqueue_output,)))
    _warm_up(settings)
    _reload_on_sighup()
    settings.segmentation.device = settings.worker.device = settings.worker.device or settings.segmentation.device
    kinds = queue_kinds_for(settings.worker.device)
    stop = _stop_on_signals()
    outbox.start()
    try:
        queue.start(max(1, settings.queue.workers), kinds=kinds)
        log.info("worker: %d thread(s) on the Redis queue(s) %s", max(1, settings.queue.workers), ", ".join(kinds))
        while not stop.wait(1.0):
            pass
    finally:
        left = _drain(queue, runner[0], settings.queue.stop_grace_s)
        outbox.close()
        store.close()
        log.info("stopped")
    return left


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM (``segnode worker``: then it drains)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("stopping (%s)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    return stop


def work_remote(settings: Settings) -> int:
    """A worker with no shared folder: job ids from the Redis queue, everything else from and to the
    node's HTTP API (:class:`node.jobs.remote.NodeClient`); nothing it holds is lost with it. Stops as
    ``work`` does: a run still going after ``[queue] stop_grace_s`` is handed back to the node."""
    from node.jobs.remote import NodeClient, NodeUnreachable

    if not settings.worker.token.get_secret_value():
        raise ServeError("a remote worker needs its token: --token, [worker] token or SEGNODE_WORKER__TOKEN")
    settings.queue.backend = "redis"  # the queue every worker shares; records stay with the node
    # What run_pipeline runs on here, and what the node is told (which queues this worker takes).
    settings.segmentation.device = settings.worker.device = settings.worker.device or settings.segmentation.device
    client = NodeClient(settings, worker_id())
    try:
        client.hello()
    except NodeUnreachable as exc:
        log.warning("%s; starting anyway, retrying in the background", exc)
    client.clean()
    runner = JobRunner(client, settings, hooks=(client.cleanup,), on_output=(client.deliver,),  # type: ignore[arg-type]
                       inputs=client.inputs)
    queue = JobQueue(make_hueys(settings), runner.run)
    _warm_up(settings)
    _reload_on_sighup()
    kinds = queue_kinds_for(settings.worker.device)
    stop = _stop_on_signals()
    client.say_hello_every()
    try:
        queue.start(max(1, settings.queue.workers), kinds=kinds)
        log.info("worker: %d thread(s) on the Redis queue(s) %s, node %s, device %s", max(1, settings.queue.workers),
                 ", ".join(kinds), client.base, settings.worker.device)
        while not stop.wait(1.0):
            pass
        client.stop.set()  # calls waiting for an unreachable node give up now (a claim would wait forever)
    finally:
        left = _drain(queue, runner, settings.queue.stop_grace_s)
        client.stop.set()
        log.info("stopped")
    return left
