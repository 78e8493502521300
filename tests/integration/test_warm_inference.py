"""Warm inference (node.segment.resident) against TotalSegmentator's real command line.

Every case runs ``TotalSegmentator -i in.nii.gz -o out.nii.gz --ml ...`` (TotalSegmentator 2.18's own
CLI, as a subprocess, through tests/totalseg_cli.py, which installs the node's torchvision stub for CPU
torch and calls the CLI's ``main`` unchanged) on the same NIfTI file and the same tiny exact
checkpoints (tests/totalseg_weights.py), and the node's resident engine on the same volume in this
process; every voxel's label must be equal, with the body envelope on and off. The CLI runs once per
case for the whole module.

The input is the node's phantom (64 x 64 x 40 voxels of 1 x 1 x 1.5 mm, the anatomy scaled down, noise;
padded to 112 x 112 x 40 with air), so TotalSegmentator resamples it (to 3 mm, 1.5 mm, 6 mm for the crop
model) and back, crops it (roi_subset, liver_vessels) and the envelope has air to skip. The CLI runs,
two at a time, start when the module's first test asks for one, while the node's runs go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("totalsegmentator")
pytest.importorskip("torch")

from node.nifti import write_nifti  # noqa: E402
from node.phantom import PhantomSpec, make_phantom  # noqa: E402
from node.segment import SegmentRequest  # noqa: E402
from node.segment.predictors import default_cache  # noqa: E402
from node.segment.totalseg import TotalSegmentatorEngine, write_totalseg_config  # noqa: E402
from node.volume import Geometry, SeriesIdentity, Volume  # noqa: E402
from tests.totalseg_weights import install_for_task  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
#: The phantom's anatomy on a 64 x 64 x 60 mm field of view: `total` at 1.5 mm is 8 tiles per part.
SMALL = PhantomSpec(size=(64, 64, 40), spacing=(1.0, 1.0, 1.5))
ENVELOPE_MM = 6.0

#: name -> (SegmentRequest fields, CLI arguments)
CASES: dict[str, tuple[dict, list[str]]] = {
    "total_fast": (dict(task="total", fast=True), ["-ta", "total", "--fast"]),
    "total": (dict(task="total"), ["-ta", "total"]),
    "roi_subset": (dict(task="total", roi_subset=("liver", "portal_vein_and_splenic_vein")),
                   ["-ta", "total", "-rs", "liver", "portal_vein_and_splenic_vein"]),
    "liver_vessels": (dict(task="liver_vessels"), ["-ta", "liver_vessels"]),
    "total_mr": (dict(task="total_mr", fast=True), ["-ta", "total_mr", "--fast"]),
}


@pytest.fixture(scope="module")
def phantom_ct() -> Volume:
    ct = make_phantom(SMALL).ct
    # 24 more columns and rows of air on every side: room for the envelope to skip tiles.
    pad = 24
    array = np.pad(ct.array, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1000)
    sx, sy, _ = ct.geometry.spacing
    ox, oy, oz = ct.geometry.origin
    geometry = Geometry(origin=(ox - pad * sx, oy - pad * sy, oz), spacing=ct.geometry.spacing)
    source = SeriesIdentity(study_uid="1.2.826.0.1.3680043.8.498.11", series_uid="1.2.826.0.1.3680043.8.498.12",
                            frame_of_reference_uid="1.2.826.0.1.3680043.8.498.13", modality="CT",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    return replace(ct, array=array, geometry=geometry, source=source)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("warm-home")
    for kwargs in (dict(task="total", fast=True), dict(task="total"),
                   dict(task="total", roi_subset=("liver",)), dict(task="liver_vessels"),
                   dict(task="total_mr", fast=True)):
        install_for_task(home, **kwargs)
    write_totalseg_config(home)
    return home


class CLI:
    """TotalSegmentator's CLI labels per case: every case started at once (two at a time), each read once."""

    PARALLEL = 2

    def __init__(self, home: Path, ct: Volume, workdir: Path) -> None:
        self.home, self.workdir = home, workdir
        self.input = write_nifti(ct, workdir / "ct.nii.gz")
        self.labels: dict[str, np.ndarray] = {}
        self.pending = list(CASES)
        self.running: dict[str, subprocess.Popen] = {}
        self._fill()

    def _fill(self) -> None:
        env = {**os.environ, "TOTALSEG_HOME_DIR": str(self.home), "PYTHONPATH": str(ROOT)}
        env.pop("TOTALSEG_WEIGHTS_PATH", None)
        while self.pending and len(self.running) < self.PARALLEL:
            case = self.pending.pop(0)
            out = self.workdir / f"{case}.nii.gz"
            args = [sys.executable, "-m", "tests.totalseg_cli", "-i", str(self.input), "-o", str(out), "--ml",
                    "-d", "cpu", "-nr", "1", "-ns", "1", "-q", *CASES[case][1]]
            log = open(self.workdir / f"{case}.log", "w")
            self.running[case] = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def __call__(self, case: str) -> np.ndarray:
        import nibabel as nib

        while case not in self.labels:
            if case in self.pending:  # asked before its turn: it goes next
                self.pending.remove(case)
                self.pending.insert(0, case)
            done = next((c for c in self.running if self.running[c].poll() is not None), None)
            if done is None:
                next(iter(self.running.values())).wait(timeout=900)
                continue
            code = self.running.pop(done).wait()
            assert code == 0, (self.workdir / f"{done}.log").read_text()[-4000:]
            data = np.asanyarray(nib.load(self.workdir / f"{done}.nii.gz").dataobj).astype(np.uint8)
            self.labels[done] = np.ascontiguousarray(data.transpose(2, 1, 0))  # [x, y, z] -> [k, j, i]
            self._fill()
        return self.labels[case]

    def close(self) -> None:
        for process in self.running.values():
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def cli(home: Path, phantom_ct: Volume, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    runs = CLI(home, phantom_ct, tmp_path_factory.mktemp("cli"))
    yield runs
    runs.close()


def node_run(home: Path, ct: Volume, envelope_mm: float = 0.0, **kwargs):
    request = SegmentRequest(engine="totalsegmentator", weights_dir=home, threads=2, device="cpu",
                             envelope_mm=envelope_mm, **kwargs)
    return TotalSegmentatorEngine().segment(ct, request)


@pytest.mark.parametrize("envelope_mm", [0.0, ENVELOPE_MM], ids=["envelope-off", "envelope-on"])
@pytest.mark.parametrize("case", list(CASES))
def test_labels_equal_the_cli_voxel_for_voxel(case: str, envelope_mm: float, home: Path, phantom_ct: Volume,
                                              cli: CLI) -> None:
    result = node_run(home, phantom_ct, envelope_mm, **CASES[case][0])
    expected = cli(case)
    assert result.array.shape == expected.shape
    assert int((result.array != expected).sum()) == 0
    present = set(np.unique(expected).tolist()) - {0}
    assert present, "the case must label something, or the comparison proves nothing"
    info = result.inference
    assert info is not None and info["engine"] == "resident"
    if envelope_mm and case in ("total_fast", "total"):
        assert info["tiles_skipped"] > 0  # the phantom's air is skipped
    if not envelope_mm:
        assert info["tiles_skipped"] == 0
    if case == "total_mr":  # MR models normalise per image: never an envelope
        assert info["tiles_skipped"] == 0 and all(m["envelope"] is None for m in info["models"])


@pytest.fixture
def cache():
    """The process's model cache, emptied before and after, its bound restored."""
    cache = default_cache()
    cache.clear()
    yield cache
    cache.configure(max_models=7, max_bytes=None)
    cache.clear()


def test_two_jobs_in_one_worker_load_each_model_once(cache, home: Path, phantom_ct: Volume, tmp_path: Path) -> None:
    from node.pipeline import PipelineRequest, run_pipeline

    request = PipelineRequest(segment=SegmentRequest(engine="totalsegmentator", task="total", fast=True,
                                                     weights_dir=home, threads=2, envelope_mm=ENVELOPE_MM))
    before = (cache.stats.loads, cache.stats.hits, cache.stats.misses)
    first = run_pipeline(phantom_ct, tmp_path / "one", request)
    second = run_pipeline(phantom_ct, tmp_path / "two", request)
    assert (first.state, second.state) == ("done", "done")
    after = (cache.stats.loads, cache.stats.hits, cache.stats.misses)
    assert tuple(a - b for a, b in zip(after, before)) == (1, 1, 1)  # dataset 297: loaded once, then hit
    one, two = first.report["inference"], second.report["inference"]
    assert (one["cache_misses"], one["cache_hits"], two["cache_misses"], two["cache_hits"]) == (1, 0, 0, 1)
    assert one["load_s"] > 0 and two["load_s"] == 0
    assert two["tiles_run"] == one["tiles_run"] > 0 and two["tiles_skipped"] == one["tiles_skipped"] > 0
    assert two["peak_rss_mb"] > 0 and set(two) >= {"preprocess_s", "network_s", "export_s", "peak_gpu_mb"}
    assert np.array_equal(first.labels.array, second.labels.array)
    # the report on disk says the same
    import json

    on_disk = json.loads((tmp_path / "two" / "report.json").read_text())
    assert on_disk["inference"]["cache_hits"] == 1 and on_disk["engine"]["envelope_mm"] == ENVELOPE_MM


def test_eviction_with_one_model_cached_gives_the_same_labels(cache, home: Path, phantom_ct: Volume) -> None:
    cache.configure(max_models=1)
    before = (cache.stats.loads, cache.stats.evictions)
    runs = [node_run(home, phantom_ct, task=task, fast=True).array
            for task in ("total", "total_mr", "total", "total_mr")]
    assert (cache.stats.loads - before[0], cache.stats.evictions - before[1]) == (4, 3)
    assert len(cache.loaded()) == 1
    assert np.array_equal(runs[0], runs[2]) and np.array_equal(runs[1], runs[3])
    assert not np.array_equal(runs[0], runs[1])  # two different models (liver 5 vs total_mr's ids)


def test_cuda_out_of_memory_is_retried_and_reported(cache, home: Path, phantom_ct: Volume,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected: the first sliding window raises torch's CUDA OOM error; the job is retried on the CPU."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    reference = node_run(home, phantom_ct, task="total", fast=True).array
    real = nnUNetPredictor.predict_logits_from_preprocessed_data
    calls: list[int] = []

    def oom_once(self, data):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, data)

    monkeypatch.setattr(nnUNetPredictor, "predict_logits_from_preprocessed_data", oom_once)
    result = node_run(home, phantom_ct, task="total", fast=True)
    assert np.array_equal(result.array, reference)
    assert len(calls) == 2
    assert result.inference["retries"] == ["OutOfMemoryError on cpu: retried on the CPU"]
    assert "OutOfMemoryError on cpu: retried on the CPU" in result.notes[-1]

    def always_oom(self, data):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(nnUNetPredictor, "predict_logits_from_preprocessed_data", always_oom)
    from node.segment import SegmentationError

    with pytest.raises(SegmentationError) as caught:  # the retry failed too: the job fails, coded
        node_run(home, phantom_ct, task="total", fast=True)
    assert caught.value.code == "totalsegmentator_failed" and "OutOfMemoryError" in str(caught.value)


def test_preload_warming_then_ready_and_a_job_meanwhile_waits(cache, home: Path, phantom_ct: Volume,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import httpx

    from node.config import Settings
    from node.jobs import open_store
    from node.segment import warmup
    from node.segment.predictors import load_predictor
    from node.web.app import AppContext, create_app
    from tests.servers import serve_in_thread

    gate = threading.Event()

    def gated(key):  # the preload's load is held until the test has seen "warming"
        gate.wait(60)
        return load_predictor(key)

    monkeypatch.setattr(cache, "loader", gated)
    settings = Settings(node={"data_dir": tmp_path / "data"},
                        segmentation={"engine": "totalsegmentator", "task": "total", "fast": True,
                                      "weights_dir": str(home), "preload": ["total"], "cache_models": 3})
    store = open_store(settings)
    loads = cache.stats.loads
    try:
        with serve_in_thread(create_app(AppContext(settings, store, lambda *a: None))) as url, \
                httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
            thread = warmup.start(settings)
            assert thread is not None and cache.max_models == 3
            response = http.get("/healthz")
            assert response.status_code == 503
            assert response.json()["status"] == "warming"
            assert response.json()["detail"] == "loading the models of total"

            job: dict = {}
            worker = threading.Thread(target=lambda: job.update(labels=node_run(home, phantom_ct, task="total",
                                                                                fast=True)))
            worker.start()
            worker.join(1.0)
            assert worker.is_alive()  # waiting for the preload's load, not loading a second copy
            gate.set()
            thread.join(60)
            worker.join(60)
            assert not worker.is_alive() and job["labels"].present_ids()
            assert cache.stats.loads - loads == 1
            assert job["labels"].inference["cache_hits"] == 1
            body = http.get("/healthz").json()
            assert body["status"] == "ok"
            assert body["models"] == ["Dataset297_TotalSegmentator_total_3mm_1559subj on cpu"]
    finally:
        gate.set()
        warmup.reset()
        store.close()
