"""A node with a finished job, served by uvicorn on a free loopback port, for the editor's API and
browser tests.

:func:`running_node` builds a temporary data dir the way the node fills it: a phantom CT series is
stored through the ingest receiver (as STOW-RS does), completed, routed by a threshold rule that also
writes ``seg.dcm``, run by the real :class:`~node.jobs.worker.JobRunner` (``run_pipeline``), and its
results queued on a real :class:`~node.export.Outbox` with a folder destination. Then the app of
``segnode serve`` (:func:`node.web.app.create_app`) serves it, with the outbox passed in, and new
series (a browser's drop) are segmented in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.classes import LabelVolume
from node.config import Settings
from node.dicom.writer import SeriesInfo, write_series
from node.export import Outbox
from node.ingest import Sender
from node.ingest.receiver import Receiver
from node.jobs import Router, open_store
from node.jobs.store import JobStore
from node.jobs.worker import JobRunner
from node.phantom import TINY, PhantomSpec, make_phantom
from node.rules import PipelineSpec, Rule
from node.volume import Volume
from node.web.app import AppContext, create_app
from tests.servers import serve_in_thread

TOKENS = {"alice": "alice-token-1234", "bob": "bob-token-5678"}
DESTINATION = "archive"


@dataclass
class Node:
    url: str
    settings: Settings
    data_dir: Path
    archive: Path  # the folder destination
    store: JobStore
    outbox: Outbox
    receiver: Receiver
    #: The phantom series stored and segmented at start.
    series_uid: str
    study_uid: str
    job_id: str
    ct: Volume
    truth: LabelVolume
    #: Series folders by name, for tests that send more (not stored at start).
    extra: dict[str, Path]
    #: False: new jobs stay queued (the worker thread does not run them).
    run_jobs: list[bool]

    def store_series(self, folder: Path) -> str:
        """Store a folder's files through the ingest receiver (one session, as one STOW-RS request);
        returns the series UID."""
        uids = set()
        with self.receiver.session("stow") as session:
            for file in sorted(folder.glob("*.dcm")):
                result = self.receiver.store(file.read_bytes(), Sender("stow", "", "127.0.0.1"), session=session)
                assert result.ok, result.reason
                uids.add(result.info.series_uid)
        (uid,) = uids
        return uid

    def wait_job(self, series_uid: str, timeout: float = 30.0) -> str:
        """State of the newest job of a series once it is done or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.store.for_series(series_uid)
            if jobs and jobs[-1].state in ("done", "failed"):
                return jobs[-1].state
            time.sleep(0.05)
        raise TimeoutError(f"no finished job for series {series_uid}")


#: The patient of the node's phantom series (what the dashboard shows a signed-in reader).
PATIENT = {"patient_name": "Doe^Jane", "patient_id": "PID-0042", "accession_number": "ACC-7781"}


def write_phantom_series(spec: PhantomSpec, folder: Path, seed_text: str, description: str):
    phantom = make_phantom(spec)
    info = SeriesInfo(uid_seed=seed_text, series_description=description, **PATIENT)
    return phantom, write_series(phantom.ct, folder, info)


@contextmanager
def running_node(tmp_path: Path, *, spec: PhantomSpec = TINY, extra: dict[str, PhantomSpec] | None = None,
                 tokens: dict[str, str] | None = None) -> Iterator[Node]:
    tokens = TOKENS if tokens is None else tokens
    data_dir, archive = tmp_path / "data", tmp_path / "archive"
    settings = Settings(
        node={"data_dir": data_dir, "rules": tmp_path / "no-rules.toml"},
        http={"tokens": tokens},
        ingest={"fsync": False, "quiet_seconds": 60, "retention_days": 0},
        queue={"max_attempts": 1, "retry_delay_s": 0},
        outbox={"initial_delay_s": 0.1, "poll_s": 0.1},
        destinations=[{"name": DESTINATION, "kind": "folder", "path": str(archive)}],
    )
    store = open_store(settings)
    outbox = Outbox.from_settings(settings, on_change=store.set_destinations)
    runner = JobRunner(store, settings, hooks=(outbox.enqueue_results,))
    run_jobs = [True]
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-worker")

    def enqueue(job_id: str, delay: float) -> None:
        if run_jobs[0]:
            pool.submit(runner.run, job_id)

    rule = Rule(name="ct-threshold", pipeline=PipelineSpec(engine="threshold", outputs=["seg"]),
                destinations=[DESTINATION])
    router = Router(settings, store, enqueue, rules=(rule,))
    receiver = Receiver.from_settings(settings, on_series_ready=router.on_series_ready)
    receiver.start(timer=False)

    phantom, files = write_phantom_series(spec, tmp_path / "source", "editor-test-phantom", "Phantom for the editor")
    with receiver.session("stow") as session:
        for file in files:
            result = receiver.store(file.read_bytes(), Sender("stow", "", "127.0.0.1"), session=session)
            assert result.ok, result.reason
    series_uid = None
    for record in store.series():
        series_uid = record["series_uid"]
    assert series_uid is not None, "the phantom series was not routed"
    extra_files = {}
    for name, extra_spec in (extra or {}).items():
        _, written = write_phantom_series(extra_spec, tmp_path / name, f"editor-test-{name}", f"Phantom {name}")
        extra_files[name] = written[0].parent
    try:
        node = Node(url="", settings=settings, data_dir=data_dir, archive=archive, store=store, outbox=outbox,
                    receiver=receiver, series_uid=series_uid, study_uid="", job_id="", ct=phantom.ct,
                    truth=phantom.labels, extra=extra_files, run_jobs=run_jobs)
        assert node.wait_job(series_uid) == "done", store.for_series(series_uid)[-1].error
        job = store.for_series(series_uid)[-1]
        node.job_id, node.study_uid = job.id, job.study_uid
        assert (Path(job.results) / "seg.dcm").is_file()
        outbox.start()
        app = create_app(AppContext(settings, store, enqueue, receiver, outbox=outbox))
        with serve_in_thread(app) as url:
            node.url = url
            yield node
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        outbox.close()
        receiver.close()
        store.close()


def disc(shape: tuple[int, int], cx: int, cy: int, size: int) -> np.ndarray:
    """The editor's brush dab: voxels within (size-1)/2 of voxel (cx, cy) (editor.js ``dab``)."""
    r = (size - 1) / 2
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r + 1e-9


def stroke(shape: tuple[int, int], x0: int, x1: int, y: int, size: int) -> np.ndarray:
    """A horizontal brush stroke from voxel (x0, y) to (x1, y): one dab per voxel on the way."""
    mask = np.zeros(shape, bool)
    for x in range(min(x0, x1), max(x0, x1) + 1):
        mask |= disc(shape, x, y, size)
    return mask
