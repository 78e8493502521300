"""A worker's start: the model cache sized from ``[segmentation]``, ``preload`` tasks loaded in the background.

``/healthz`` reads :func:`state` (``warming`` until every preloaded model is in the cache); a job that
needs a model meanwhile waits for that model's load in the cache (never loads it twice).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from node.segment.predictors import ModelKey, PredictorCache, default_cache

log = logging.getLogger(__name__)


@dataclass
class WarmupState:
    state: str = "idle"  # idle | warming | ready | failed
    detail: str = ""
    models: list[str] = field(default_factory=list)


_STATE = WarmupState()
_LOCK = threading.Lock()


def state() -> WarmupState:
    with _LOCK:
        return WarmupState(_STATE.state, _STATE.detail, list(_STATE.models))


def reset() -> None:
    """Back to ``idle`` (tests; a process that stops preloading)."""
    _set("idle", "", [])


def _set(value: str, detail: str = "", models: list[str] | None = None) -> None:
    with _LOCK:
        _STATE.state, _STATE.detail = value, detail
        if models is not None:
            _STATE.models = models


def configure_cache(settings: Any, cache: PredictorCache | None = None) -> PredictorCache:
    """The process's cache bounded by ``cache_models`` and ``cache_memory_mb``."""
    seg = settings.segmentation
    cache = cache or default_cache()
    mb = int(getattr(seg, "cache_memory_mb", 0) or 0)
    cache.configure(max_models=int(getattr(seg, "cache_models", 7)), max_bytes=mb * 1_000_000 if mb else None)
    return cache


def preload_keys(settings: Any, task: str, device: str | None = None) -> list[ModelKey]:
    """The models a job of ``task`` (with ``[segmentation]``'s fast/fastest/roi_subset/robust_crop) loads."""
    from node.segment import weights as W
    from node.segment.resident import ResidentRunner

    seg = settings.segmentation
    runner = ResidentRunner(W.home_dir(settings), device=device or seg.device, threads=seg.threads,
                            compile=bool(getattr(seg, "compile", False)))
    return runner.model_keys(task, fast=seg.fast, fastest=bool(seg.fastest) and not seg.fast,
                             roi_subset=list(seg.roi_subset) or None,
                             robust_crop=True if seg.robust_crop else None)


def start(settings: Any, cache: PredictorCache | None = None, devices: list[str] | None = None) -> threading.Thread | None:
    """Size the cache; load ``[segmentation] preload``'s models in a background thread (None: nothing to load)."""
    cache = configure_cache(settings, cache)
    seg = settings.segmentation
    tasks = list(getattr(seg, "preload", []) or [])
    if not tasks or seg.engine != "totalsegmentator" or not getattr(seg, "resident", True):
        _set("ready" if not tasks else "idle")
        return None
    devices = devices or [seg.device]
    _set("warming", f"loading the models of {', '.join(tasks)}")

    def run() -> None:
        loaded: list[str] = []
        try:
            from node.segment.totalseg import load_totalsegmentator

            load_totalsegmentator()
            for device in devices:
                for task in tasks:
                    for key in preload_keys(settings, task, device):
                        cache.preload(key)
                        loaded.append(key.name)
                        _set("warming", f"loading the models of {', '.join(tasks)}", loaded)
        except Exception as exc:
            log.error("preload failed: %s: %s", type(exc).__name__, exc)
            _set("failed", f"preload failed: {type(exc).__name__}: {exc}", loaded)
            return
        log.info("preload done: %d model(s) warm (%s)", len(loaded), ", ".join(tasks))
        _set("ready", "", loaded)

    thread = threading.Thread(target=run, name="segnode-preload", daemon=True)
    thread.start()
    return thread
