"""The resident model cache: initialised nnU-Net predictors kept per worker process.

nnU-Net v2 keeps a predictor reusable (``nnUNetPredictor.initialize_from_trained_model_folder`` once,
then ``predict_logits_from_preprocessed_data`` per case). TotalSegmentator 2.18 builds a new one and
loads every checkpoint from disk for every call; this cache is what a long-running node does instead.

* One cache per process (:func:`default_cache`), owned by the process that runs jobs (``segnode
  serve``'s worker threads, ``segnode worker``). Entries are keyed by :class:`ModelKey`: model folder,
  folds, checkpoint, device and precision.
* Bounded by a count (``[segmentation] cache_models``) and a memory budget (``cache_memory_mb``, the
  weights held: one copy per fold plus the network's own); the least recently used entry that no job
  is using is evicted, with a log line.
* Thread-safe: a job that asks for a model while another thread loads it waits for that load (never
  loads it twice); a predictor is used by one job at a time (its lease holds the entry's lock).
* Counters (hits, misses, loads, evictions, load seconds) for ``/metrics`` and the tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelKey:
    """What makes two predictors interchangeable."""

    folder: str
    folds: tuple[int | str, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    #: torch device string: ``cpu``, ``cuda:N``, ``mps``.
    device: str = "cpu"
    #: ``fp32``, or ``fp16-autocast`` (nnU-Net autocasts on CUDA).
    precision: str = "fp32"

    @property
    def name(self) -> str:
        return f"{self.folder.rstrip('/').split('/')[-2] if '/' in self.folder else self.folder} on {self.device}"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass
class _Entry:
    key: ModelKey
    ready: threading.Event = field(default_factory=threading.Event)
    lock: threading.RLock = field(default_factory=threading.RLock)
    predictor: Any = None
    error: BaseException | None = None
    nbytes: int = 0
    users: int = 0
    load_seconds: float = 0.0


@dataclass
class Lease:
    """A predictor held by one job; ``load_seconds`` is 0 when it was already warm."""

    key: ModelKey
    predictor: Any
    hit: bool
    load_seconds: float


def predictor_nbytes(predictor: Any) -> int:
    """Bytes of weights a predictor holds: every fold's state dict plus the network's parameters."""
    total = 0
    for params in getattr(predictor, "list_of_parameters", None) or []:
        total += sum(int(t.numel()) * int(t.element_size()) for t in params.values() if hasattr(t, "numel"))
    network = getattr(predictor, "network", None)
    if network is not None:
        total += sum(int(p.numel()) * int(p.element_size()) for p in network.parameters())
    return total


class PredictorCache:
    """LRU cache of loaded predictors; see the module docstring."""

    def __init__(self, max_models: int = 7, max_bytes: int | None = None,
                 loader: Callable[[ModelKey], Any] | None = None) -> None:
        self.max_models = max(1, int(max_models))
        self.max_bytes = int(max_bytes) if max_bytes else None
        self.loader = loader or load_predictor
        self.stats = CacheStats()
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def configure(self, max_models: int | None = None, max_bytes: int | None = None) -> None:
        with self._lock:
            if max_models is not None:
                self.max_models = max(1, int(max_models))
            self.max_bytes = int(max_bytes) if max_bytes else None

    # ------------------------------------------------------------------ state

    def loaded(self) -> list[ModelKey]:
        """Keys of the predictors loaded now, least recently used first."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.ready.is_set() and e.error is None]

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        """Drop every predictor no job is using (tests; a device given back)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.users == 0 and e.ready.is_set()]:
                del self._entries[key]

    # ------------------------------------------------------------------ use

    def _get(self, key: ModelKey) -> tuple[_Entry, bool]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.users += 1
                self.stats.hits += 1
                return entry, False
            entry = _Entry(key)
            entry.users = 1
            self._entries[key] = entry
            self.stats.misses += 1
        return entry, True

    def _load(self, entry: _Entry) -> None:
        started = time.perf_counter()
        try:
            predictor = self.loader(entry.key)
        except BaseException as exc:
            with self._lock:
                self._entries.pop(entry.key, None)
            entry.error = exc
            entry.ready.set()
            raise
        entry.predictor = predictor
        entry.nbytes = predictor_nbytes(predictor)
        entry.load_seconds = time.perf_counter() - started
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += entry.load_seconds
        log.info("model loaded: %s (%.1f MB of weights) in %.2f s", entry.key.name, entry.nbytes / 1e6,
                 entry.load_seconds)
        entry.ready.set()
        self._evict(keep=entry.key)

    def _evict(self, keep: ModelKey) -> None:
        with self._lock:
            def over() -> bool:
                too_many = len(self._entries) > self.max_models
                too_big = self.max_bytes is not None and sum(e.nbytes for e in self._entries.values()) > self.max_bytes
                return too_many or too_big

            while over():
                victim = next((k for k, e in self._entries.items()
                               if k != keep and e.users == 0 and e.ready.is_set()), None)
                if victim is None:
                    break  # everything else is in use: over the bound until a job ends
                gone = self._entries.pop(victim)
                self.stats.evictions += 1
                log.info("model evicted (least recently used): %s, %.1f MB; %d model(s), %.1f MB stay cached",
                         victim.name, gone.nbytes / 1e6, len(self._entries),
                         sum(e.nbytes for e in self._entries.values()) / 1e6)

    @contextmanager
    def lease(self, key: ModelKey) -> Iterator[Lease]:
        """The predictor for ``key``, loaded once, held by this job until the block ends."""
        entry, loader = self._get(key)
        try:
            if loader:
                self._load(entry)
            else:
                entry.ready.wait()
                if entry.error is not None:
                    raise entry.error
            with entry.lock:
                yield Lease(key, entry.predictor, hit=not loader, load_seconds=entry.load_seconds if loader else 0.0)
        finally:
            with self._lock:
                entry.users -= 1
            if loader and entry.error is None:
                self._evict(keep=key)

    def preload(self, key: ModelKey) -> bool:
        """Load ``key`` now if it is not cached; True when it was loaded by this call."""
        with self._lock:
            if key in self._entries:
                return False
        with self.lease(key) as lease:
            return not lease.hit


def load_predictor(key: ModelKey) -> Any:
    """An ``nnUNetPredictor`` for ``key``, initialised from its trained model folder.

    The predictor's settings are TotalSegmentator's (``nnunet.nnUNetv2_predict``): Gaussian weighting,
    no mirroring, everything on the device; the tile step is set per call.
    """
    import os

    import torch

    from node.segment.totalseg import load_totalsegmentator

    load_totalsegmentator()  # the torchvision stub, and TotalSegmentator's custom trainers registered
    import totalsegmentator.nnunet  # noqa: F401  (its import patches nnU-Net's trainer lookup)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(key.device)
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=True,
        device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
    )
    compile_env = os.environ.pop("nnUNet_compile", None)  # compiled below, only when asked for
    try:
        predictor.initialize_from_trained_model_folder(
            key.folder, use_folds=tuple(key.folds), checkpoint_name=key.checkpoint
        )
    finally:
        if compile_env is not None:
            os.environ["nnUNet_compile"] = compile_env
    predictor.network = predictor.network.to(device)
    predictor.network.eval()
    if key.precision.endswith("+compile"):
        predictor.network = torch.compile(predictor.network)
    return predictor


_TOTALS_LOCK = threading.Lock()
#: (task, device) -> [runs, seconds] of warm inference in this process, for /metrics.
INFERENCE_TOTALS: dict[tuple[str, str], list[float]] = {}


def record_inference(task: str, device: str, seconds: float) -> None:
    with _TOTALS_LOCK:
        entry = INFERENCE_TOTALS.setdefault((task, device), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds


def inference_totals() -> dict[tuple[str, str], tuple[int, float]]:
    with _TOTALS_LOCK:
        return {k: (int(v[0]), float(v[1])) for k, v in INFERENCE_TOTALS.items()}


_DEFAULT: PredictorCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> PredictorCache:
    """This process's cache (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = PredictorCache()
        return _DEFAULT
