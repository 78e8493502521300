"""The model cache (node.segment.predictors) and the body envelope (node.segment.envelope), without torch."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from node.segment import predictors as P
from node.segment.envelope import body_envelope
from node.segment.predictors import ModelKey, PredictorCache


class Loads:
    """A loader that counts its calls, can be held at a gate, and fails for one folder."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[ModelKey] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def __call__(self, key: ModelKey) -> object:
        with self.lock:
            self.calls.append(key)
        self.gate.wait(10)
        time.sleep(self.delay)
        if key.folder == "broken":
            raise OSError("checkpoint unreadable")
        return {"model": key.folder}


@pytest.fixture(autouse=True)
def weights_of_ten_mb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "predictor_nbytes", lambda predictor: 10_000_000)


def key(name: str) -> ModelKey:
    return ModelKey(name, (0,), "checkpoint_final.pth", "cpu", "fp32")


def test_threads_asking_while_a_model_loads_wait_for_that_one_load() -> None:
    loads = Loads()
    loads.gate.clear()
    cache = PredictorCache(max_models=3, loader=loads)
    got: list[object] = []

    def job() -> None:
        with cache.lease(key("a")) as lease:
            got.append((lease.predictor, lease.hit))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert got == [] and len(loads.calls) == 1  # three wait for the one load in progress
    loads.gate.set()
    for t in threads:
        t.join(5)
    assert len(loads.calls) == 1
    assert sorted(hit for _, hit in got) == [False, True, True, True]
    assert all(p == {"model": "a"} for p, _ in got)
    assert (cache.stats.misses, cache.stats.hits, cache.stats.loads) == (1, 3, 1)


def test_least_recently_used_is_evicted_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    loads = Loads()
    cache = PredictorCache(max_models=2, loader=loads)
    caplog.set_level(logging.INFO, logger="node.segment.predictors")
    for name in ("a", "b", "a", "c"):  # "a" used again: "b" is the least recently used when "c" comes
        with cache.lease(key(name)):
            pass
    assert cache.loaded() == [key("a"), key("c")]
    assert cache.stats.evictions == 1 and [k.folder for k in loads.calls] == ["a", "b", "c"]
    assert any("model evicted (least recently used): b on cpu" in r.getMessage() for r in caplog.records)
    with cache.lease(key("b")):  # back again: loaded again, "a" goes
        pass
    assert [k.folder for k in loads.calls] == ["a", "b", "c", "b"] and cache.loaded() == [key("c"), key("b")]


def test_memory_budget_evicts_and_a_model_in_use_is_never_evicted() -> None:
    cache = PredictorCache(max_models=10, max_bytes=25_000_000, loader=Loads())  # two models of 10 MB
    with cache.lease(key("a")):
        with cache.lease(key("b")), cache.lease(key("c")):
            assert len(cache.loaded()) == 3 and cache.stats.evictions == 0  # all in use: over the budget
        assert len(cache.loaded()) == 2 and key("a") in cache.loaded()  # a, in use, stays
        assert cache.stats.evictions == 1
        with cache.lease(key("d")):
            pass
        assert key("a") in cache.loaded() and key("d") in cache.loaded()
    assert cache.nbytes() == 20_000_000 and cache.stats.evictions == 2


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    loads = Loads(delay=0.2)
    cache = PredictorCache(loader=loads)
    errors: list[BaseException] = []

    def job() -> None:
        try:
            with cache.lease(key("broken")):
                pass
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(errors) == 3 and len(loads.calls) == 1
    assert cache.loaded() == []
    with pytest.raises(OSError):
        with cache.lease(key("broken")):
            pass
    assert len(loads.calls) == 2  # tried again, not a cached failure


def test_preload_loads_once() -> None:
    loads = Loads()
    cache = PredictorCache(loader=loads)
    assert cache.preload(key("a")) is True
    assert cache.preload(key("a")) is False
    assert len(loads.calls) == 1


def test_body_envelope_box_margin_patch_and_noise() -> None:
    air = np.full((60, 80, 100), -1000, dtype=np.int16)
    body = air.copy()
    body[10:30, 20:50, 30:70] = 40  # the body
    body[5, 5, 5] = 300  # a speck: not body
    box = body_envelope(body, (2.0, 2.0, 2.0), margin_mm=4.0)
    assert (box.lo, box.hi) == ((8, 18, 28), (32, 52, 72))
    # grown to one 64-voxel patch along the last axis, evenly, and clipped where the array ends
    box = body_envelope(body, (2.0, 2.0, 2.0), margin_mm=0.0, min_extent=(40, 0, 64))
    assert (box.lo, box.hi) == ((0, 20, 18), (40, 50, 82))
    # a second large component (an arm) stays in the box
    body[40:50, 20:50, 30:70] = 40
    assert body_envelope(body, (1.0, 1.0, 1.0), 0.0).hi[0] == 50
    assert body_envelope(air, (1.0, 1.0, 1.0), 10.0) is None
