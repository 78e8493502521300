"""Prometheus metrics: the one registry that ingest, jobs, workers and the HTTP app all count in
(served as text at ``GET /metrics`` by :mod:`node.web.app`). It sits below all of them and imports
none, so the layers' imports point down.

Counters and histograms live in this process: ingest and in-process workers update them. Jobs by
state are read from the job store at scrape time, so they include jobs run by other workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter("segnode_instances_received", "Instances stored in the spool.", ["via"],
                             registry=REGISTRY)
INSTANCES_REFUSED = Counter("segnode_instances_refused", "Instances refused (not stored).", ["via"],
                            registry=REGISTRY)
ASSOCIATIONS = Counter("segnode_associations", "DICOM associations accepted.", registry=REGISTRY)
SERIES_COMPLETED = Counter("segnode_series_completed", "Series handed on as complete.", ["reason"],
                           registry=REGISTRY)
SERIES_ROUTED = Counter("segnode_series_routed", "Routing decisions.", ["outcome"], registry=REGISTRY)
JOBS_STARTED = Counter("segnode_job_runs_started", "Job runs started by this process's workers.",
                       registry=REGISTRY)
JOBS_FINISHED = Counter("segnode_job_runs_finished", "Job runs ended by this process's workers.", ["state"],
                        registry=REGISTRY)
STAGE_SECONDS = Histogram(
    "segnode_stage_duration_seconds", "Time spent in each pipeline stage.", ["stage"], registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)

WORKER_TRANSFER_SECONDS = Histogram(
    "segnode_worker_transfer_seconds", "Remote workers: seconds per job to fetch its series and to upload its "
    "results.", ["direction"], registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WORKER_JOBS = Counter("segnode_worker_jobs", "Remote workers: runs ended, by worker (token name) and state.",
                      ["worker", "state"], registry=REGISTRY)


class _JobStates(Collector):
    """``segnode_jobs{state=...}`` from the job store, at scrape time."""

    def __init__(self) -> None:
        self.counts: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("segnode_jobs", "Jobs by state.", labels=["state"])
        if self.counts is not None:
            for state, n in self.counts().items():
                family.add_metric([state], n)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("segnode_jobs", "Jobs by state.", labels=["state"])


_JOB_STATES = _JobStates()
REGISTRY.register(_JOB_STATES)


class _ModelCache(Collector):
    """The warm-inference model cache of this process (node.segment.predictors), at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from node.segment.predictors import default_cache, inference_totals

        cache = default_cache()
        stats = cache.stats
        for name, doc, value in (("hits", "Model cache lookups that found the predictor loaded.", stats.hits),
                                 ("misses", "Model cache lookups that loaded the predictor.", stats.misses),
                                 ("evictions", "Predictors evicted (least recently used).", stats.evictions)):
            yield CounterMetricFamily(f"segnode_model_cache_{name}", doc, value=value)
        yield CounterMetricFamily("segnode_model_load_seconds", "Seconds spent loading predictors.",
                                  value=stats.load_seconds)
        yield GaugeMetricFamily("segnode_models_loaded", "Predictors loaded in this process.",
                                value=len(cache.loaded()))
        yield GaugeMetricFamily("segnode_model_cache_bytes", "Bytes of weights the model cache holds.",
                                value=cache.nbytes())
        runs = CounterMetricFamily("segnode_inference_runs", "Warm inference runs.", labels=["task", "device"])
        seconds = CounterMetricFamily("segnode_inference_seconds", "Warm inference seconds.",
                                      labels=["task", "device"])
        for (task, device), (n, s) in sorted(inference_totals().items()):
            runs.add_metric([task, device], n)
            seconds.add_metric([task, device], s)
        yield runs
        yield seconds

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


REGISTRY.register(_ModelCache())


def count_jobs_with(counts: Callable[[], dict[str, int]] | None) -> None:
    """Where ``segnode_jobs`` reads its numbers (the app's job store)."""
    _JOB_STATES.counts = counts


class _Workers(Collector):
    """``segnode_worker_last_seen_seconds{worker,name,device}`` and ``segnode_worker_busy`` from the
    node's table of workers seen, at scrape time."""

    def __init__(self) -> None:
        self.rows: Callable[[], list[dict[str, Any]]] | None = None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["worker", "name", "device"]
        return (GaugeMetricFamily("segnode_worker_last_seen_seconds", "Seconds since a worker last called.", labels=labels),
                GaugeMetricFamily("segnode_worker_busy", "1 while a worker holds a job.", labels=labels))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        seen, busy = self._families()
        now = time.time()
        for row in (self.rows() if self.rows is not None else []):
            labels = [row["id"], row["name"], row["device"]]
            seen.add_metric(labels, round(now - row["last_seen"], 3))
            busy.add_metric(labels, 1.0 if row.get("job") else 0.0)
        yield seen
        yield busy

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()


_WORKERS = _Workers()
REGISTRY.register(_WORKERS)


def list_workers_with(rows: Callable[[], list[dict[str, Any]]] | None) -> None:
    """Where the worker gauges read their rows (:meth:`node.jobs.workers.WorkerRegistry.list`)."""
    _WORKERS.rows = rows


def render() -> bytes:
    return generate_latest(REGISTRY)
