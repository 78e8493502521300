"""The correction editor's HTTP side: a series from the spool, its latest segmentation, slices on
demand, and saves as new DICOM-SEG versions.

=============================================  =====================================================
``GET  /edit/{series}``                        the editor page (static; data comes from the API)
``GET  /api/edit/{series}``                    geometry, window presets, label classes, version, history
``GET  /api/edit/{series}/image/{k}``          slice ``k``: raw little-endian int16 (or float32) rows x
                                               columns; ``?format=png&center=40&width=400``: 8-bit PNG
``GET  /api/edit/{series}/labels/{k}``         the label plane of slice ``k``: raw little-endian uint16
``POST /api/edit/{series}/save``               edited label planes -> a new SEG version (201)
``GET  /api/edit/{series}/versions/{v}/labels/{k}``  slice ``k``'s label plane in version ``v`` (compare)
``POST /api/edit/{series}/restore``            ``{"version": v, "base_version": n}``: version ``v``'s labels
                                               as a new version (201); nothing is deleted
``GET  /api/edit/{series}/view/{axis}/{index}``  a coronal (``axis`` = ``coronal``, ``index`` = row) or
                                               sagittal (``sagittal``, column) plane through the series
                                               with the shown version's labels: 8-bit RGB PNG,
                                               ``?center=&width=&opacity=``
``GET  /api/annotations`` / ``.csv``            the annotation log (``?series=`` for one series)
=============================================  =====================================================

Slices are indexed ``k`` = 0.. along the slice normal, as :class:`~node.volume.Volume` orders them.
Raw planes are gzip-compressed when the client accepts it (label planes shrink ~50x). ``?t=`` on an
image request and ``?v=`` on a labels request name the series state / version the client has; a
mismatch answers 409 (the series got new instances, or someone saved a newer version): reload.

Where the labels come from (the *latest* segmentation of the series):

1. the newest correction saved here (the annotation log has its path, under ``<data_dir>/corrections``),
   unless a job finished after it (a new generation of the series: its result wins);
2. the newest done job's results: ``seg.dcm`` (read with :func:`node.dicom.seg.read_seg`), else
   ``labels.nii.gz`` + ``classes.json``;
3. nothing: an empty label volume (version 0).

A job's result counts as version 1 (the engine's); each save writes version ``max(shown, newest saved) + 1``.
The ``versions`` of the info answer list version 1 and every correction; any of them can be shown
beside the current one (its label planes, read-only) and made current again: ``restore`` writes its
labels as the next version, attributed to the user, so the history only grows.

Save (``POST .../save``, JSON)::

    {"base_version": 1, "token": "<image token>", "labels_token": "<labels token>", "encoding": "zlib",
     "slices": {"12": "<base64 of rows*columns uint16 LE, zlib-compressed>", ...},
     "labels": [{"id": 300, "name": "lesion", "color": [255, 64, 0]}]}  # custom labels used

Only edited slices travel. Every id on them must be a known class or one of ``labels`` (else 400);
what the edit started from (``base_version``, and the tokens when given) must still be what the editor
shows (else 409: someone saved, or a new job or new instances arrived). The new label volume goes through
:func:`node.dicom.seg.write_seg` (same source references, ``version``, ContentCreatorName = the
user) into ``<data_dir>/corrections/<series>/v<version>.dcm``; with an outbox and destinations it is
queued there (to the destinations of the series' job, else all), and a row goes into the annotation
log (:mod:`node.web.annotations`). Saving needs a signed-in user: with no ``[http] tokens`` it is refused.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import logging
import os
import struct
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node import logs
from node.classes import LabelClass, LabelVolume
from node.config import Settings
from node.ingest.instance import valid_uid
from node.jobs.store import Job, JobStore
from node.volume import Volume
from node.web.annotations import Annotation, AnnotationLog, VersionTaken

log = logging.getLogger(__name__)

#: Loaded series kept in memory (image + labels; a 512x512x400 CT is ~400 MB with its labels).
CACHE_SIZE = 3
#: Window presets (centre, width) offered for CT; "Auto" (0.5-99.5 percentiles) is added for any series.
CT_PRESETS = (("Soft tissue", 40, 400), ("Liver", 80, 150), ("Lung", -600, 1500), ("Bone", 400, 1800),
              ("Brain", 40, 80))
MAX_LABEL_NAME = 64


class EditError(Exception):
    """An answer other than 2xx, with one sentence for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# --- DICOM-SEG ---------------------------------------------------------------------------------------
# The one place that calls node.dicom.seg: write_seg(labels, source, out_path, *, options) and
# read_seg(seg, source) -> LabelVolume on the source grid (ids as written: the private label id element).

def read_seg_labels(path: Path, ct: Volume) -> LabelVolume:
    """A SEG file as labels on the series grid."""
    from node.dicom.seg import read_seg

    try:
        labels = read_seg(path, ct)
    except ValueError as exc:  # SegError (a ValueError) with a sentence for people
        raise EditError(422, f"{path.name} cannot be read as a segmentation of this series: {exc}") from None
    if labels.array.shape != ct.array.shape:
        raise EditError(422, f"{path.name}: its segments are not on the grid of the series "
                             f"({labels.array.shape} vs {ct.array.shape})")
    return labels


def write_seg_file(labels: LabelVolume, folder: Path, out_path: Path, *, version: int, user: str) -> Path:
    """The correction as DICOM-SEG on the series in ``folder``: a new SEG series (version n, SeriesNumber
    and SeriesDescription from the writer), SEMIAUTOMATIC, ContentCreatorName = the user."""
    from node.dicom.seg import SegOptions, write_seg

    options = SegOptions(version=version, content_creator=user, algorithm_type="SEMIAUTOMATIC",
                         content_description=f"corrected by {user} in the segnode editor")
    with warnings.catch_warnings():
        # ContentCreatorName is the node's user name ("alice"): a one-component person name, on purpose.
        warnings.filterwarnings("ignore", message=r'The string ".*" is unlikely to represent the intended '
                                "person name", category=UserWarning)
        return write_seg(labels, folder, out_path, options=options)


# --- small encoders --------------------------------------------------------------------------------

def png_gray8(plane: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG (PNG spec 11.2.2) of a uint8 ``rows x columns`` array."""
    rows, columns = plane.shape
    raw = np.zeros((rows, columns + 1), np.uint8)  # each row: filter type 0, then the pixels
    raw[:, 1:] = plane

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", columns, rows, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def png_rgb8(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (PNG spec 11.2.2, colour type 2) of a uint8 ``rows x columns x 3`` array."""
    rows, columns, _ = image.shape
    raw = np.zeros((rows, columns * 3 + 1), np.uint8)
    raw[:, 1:] = image.reshape(rows, columns * 3)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", columns, rows, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def windowed(plane: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (PS3.3 C.11.2.1.2 without the half-pixel offsets) to 0..255."""
    low = center - width / 2.0
    out = (plane.astype(np.float32) - np.float32(low)) * np.float32(255.0 / max(width, 1e-6))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _binary(request: Request, data: bytes, headers: dict[str, str]) -> Response:
    headers = {**headers, "vary": "Accept-Encoding", "cache-control": "private, no-cache"}
    if "gzip" in request.headers.get("accept-encoding", "") and len(data) > 1024:
        data = gzip.compress(data, compresslevel=1, mtime=0)
        headers["content-encoding"] = "gzip"
    return Response(data, media_type="application/octet-stream", headers=headers)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# --- a series loaded for editing -----------------------------------------------------------------

@dataclass
class Loaded:
    series_uid: str
    study_uid: str
    folder: Path
    #: The image state (spool folder mtime and file count): changes when instances arrive.
    token: str
    ct: Volume
    labels: np.ndarray  # uint16 [k, j, i]
    classes: dict[int, LabelClass]
    version: int
    base: str
    #: (newest correction version, newest done job id): what the labels were read from.
    labels_key: tuple[int, str]
    auto_window: tuple[float, float]
    lock: threading.RLock = field(default_factory=threading.RLock)


def labels_token(key: tuple[int, str]) -> str:
    """Names what the labels were read from (newest correction, newest done job)."""
    return hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _class_json(c: LabelClass) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "color": list(c.color), "category": c.category}


class Editor:
    """Loads series for editing (a small LRU cache) and saves corrections; thread-safe."""

    def __init__(self, settings: Settings, store: JobStore, annotations: AnnotationLog,
                 outbox: Callable[[], Any] | None = None) -> None:
        self.settings, self.store, self.annotations = settings, store, annotations
        #: ``outbox()`` -> the node's :class:`node.export.Outbox`, or None (corrections folder only).
        self.outbox = outbox or (lambda: None)
        self.data_dir = Path(settings.node.data_dir)
        self.corrections = self.data_dir / "corrections"
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._series_locks: dict[str, threading.Lock] = {}
        #: Other versions' label volumes read for comparing: (series, version, image token) -> labels.
        self._versions: OrderedDict[tuple[str, int, str], tuple[np.ndarray, dict[int, LabelClass]]]
        self._versions = OrderedDict()

    # --- finding and loading ------------------------------------------------------------------
    def _lock_for(self, series_uid: str) -> threading.Lock:
        with self._cache_lock:
            return self._series_locks.setdefault(series_uid, threading.Lock())

    def find(self, series_uid: str) -> tuple[str, Path]:
        """(study UID, spool folder) of a series; 404 when it is not on this node."""
        if not valid_uid(series_uid):
            raise EditError(404, f"{series_uid[:80]!r} is not a series UID")
        spool = self.data_dir / "spool"
        for folder in sorted(spool.glob(f"*/{series_uid}")):
            if folder.is_dir() and any(folder.glob("*.dcm")):
                return folder.parent.name, folder
        for job in reversed(self.store.for_series(series_uid)):
            if Path(job.folder).is_dir() and any(Path(job.folder).glob("*.dcm")):
                return job.study_uid, Path(job.folder)
        days = self.settings.ingest.retention_days
        kept = f"; the spool keeps series {days:g} days after their job" if days else ""
        raise EditError(404, f"series {series_uid} is not on this node (not in the spool{kept})")

    @staticmethod
    def _image_token(folder: Path) -> str:
        count = sum(1 for p in folder.glob("*.dcm") if not p.name.startswith("."))
        state = f"{folder.stat().st_mtime_ns}:{count}"
        return hashlib.sha1(state.encode()).hexdigest()[:12]

    def _newest_done_job(self, series_uid: str) -> Job | None:
        done = [j for j in self.store.for_series(series_uid)
                if j.state == "done" and j.results and Path(j.results).is_dir()]
        return max(done, key=lambda j: (j.finished or 0.0, j.created)) if done else None

    def _labels_key(self, series_uid: str) -> tuple[int, str]:
        latest = self.annotations.latest(series_uid)
        job = self._newest_done_job(series_uid)
        return (latest["version"] if latest else 0, job.id if job else "")

    def load(self, series_uid: str, *, refresh: bool = False) -> Loaded:
        """The series, from the cache unless ``refresh`` finds its image or labels changed."""
        with self._cache_lock:
            cached = self._cache.get(series_uid)
            if cached is not None:
                self._cache.move_to_end(series_uid)
        if cached is not None and not refresh:
            return cached
        with self._lock_for(series_uid):
            with self._cache_lock:
                cached = self._cache.get(series_uid)
            study_uid, folder = self.find(series_uid)
            token = self._image_token(folder)
            if cached is not None and cached.token == token and cached.folder == folder:
                key = self._labels_key(series_uid)
                if key != cached.labels_key:
                    with cached.lock:
                        self._read_labels(cached)
                return cached
            loaded = self._read(series_uid, study_uid, folder, token)
            with self._cache_lock:
                self._cache[series_uid] = loaded
                self._cache.move_to_end(series_uid)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            return loaded

    def _read(self, series_uid: str, study_uid: str, folder: Path, token: str) -> Loaded:
        from node.dicom.series import VolumeError, read_series

        logs.register_path(folder)  # the save writes a SEG with its patient's name: keep it out of logs
        try:
            ct = read_series(folder, series_uid, spacing_tolerance=self.settings.volume.spacing_tolerance)
        except VolumeError as exc:
            raise EditError(422, f"series {series_uid} cannot be shown as one volume: {exc.message} "
                                 f"({exc.code})") from None
        sample = ct.array[:, ::4, ::4]
        lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
        loaded = Loaded(series_uid=series_uid, study_uid=study_uid, folder=folder, token=token,
                        ct=ct, labels=np.zeros(ct.array.shape, np.uint16), classes={}, version=0, base="",
                        labels_key=(0, ""), auto_window=((lo + hi) / 2, max(hi - lo, 1.0)))
        self._read_labels(loaded)
        log.info("editor: series %s loaded (%d slices, labels %s)", series_uid, ct.array.shape[0], loaded.base)
        return loaded

    def _read_labels(self, loaded: Loaded) -> None:
        """The latest segmentation of the series into ``loaded`` (see the module docstring)."""
        uid, ct = loaded.series_uid, loaded.ct
        key = self._labels_key(uid)
        latest = self.annotations.latest(uid)
        job = self._newest_done_job(uid)
        labels: LabelVolume | None = None
        if latest is not None and Path(latest["path"]).is_file() and (
                job is None or _epoch(latest["time"]) >= (job.finished or 0.0)):
            labels = read_seg_labels(Path(latest["path"]), ct)
            version, base = latest["version"], f"version {latest['version']} by {latest['user']}"
        else:
            version, base = 0, "no segmentation yet"
            if job is not None:
                results = Path(job.results or "")
                version = 1
                if (results / "seg.dcm").is_file():
                    labels, base = read_seg_labels(results / "seg.dcm", ct), f"job {job.id} (seg.dcm)"
                elif (results / "labels.nii.gz").is_file():
                    labels, base = self._nifti_labels(results, ct), f"job {job.id} (labels.nii.gz)"
                else:
                    version, base = 0, f"job {job.id} wrote no labels"
        if labels is None:
            array, classes = np.zeros(ct.array.shape, np.uint16), {}
        else:
            array, classes = np.ascontiguousarray(labels.array, dtype=np.uint16), dict(labels.classes)
            for i in np.unique(array):  # every id shown must have a class
                if i and int(i) not in classes:
                    from node.segment.labelmap import make_class

                    classes[int(i)] = make_class(int(i), f"label_{int(i)}")
        loaded.labels, loaded.classes = array, dict(sorted(classes.items()))
        loaded.version, loaded.base, loaded.labels_key = version, base, key

    @staticmethod
    def _nifti_labels(results: Path, ct: Volume) -> LabelVolume:
        from node.nifti import read_nifti
        from node.segment import SegmentationError
        from node.segment.labelmap import place_on_grid, read_class_table

        try:
            volume = read_nifti(results / "labels.nii.gz")
            array, _ = place_on_grid(volume, ct.geometry, ct.array.shape)
            classes = read_class_table(results / "classes.json") if (results / "classes.json").is_file() else {}
        except SegmentationError as exc:
            raise EditError(422, f"the job's labels cannot be shown on this series: {exc}") from None
        return LabelVolume(np.asarray(array, dtype=np.uint16), ct.geometry, ct.source, classes=classes)

    # --- answers ------------------------------------------------------------------------------
    def info(self, series_uid: str, user: str | None) -> dict[str, Any]:
        loaded = self.load(series_uid, refresh=True)
        ct, source = loaded.ct, loaded.ct.source
        n, rows, columns = ct.array.shape
        presets = [{"name": "Auto", "center": round(loaded.auto_window[0], 1),
                    "width": round(loaded.auto_window[1], 1)}]
        modality = source.modality if source else ""
        if modality == "CT":
            presets = [{"name": name, "center": c, "width": w} for name, c, w in CT_PRESETS] + presets
        labelled = np.flatnonzero(loaded.labels.reshape(n, -1).any(axis=1)).tolist()
        history = [{k: row[k] for k in ("version", "time", "user", "seg_uid", "slices", "labels", "delivery")}
                   for row in self.annotations.rows(series_uid)]
        outbox = self.outbox()
        for row in history:  # where each version is now, per destination
            row["destinations"] = {}
            if outbox is not None and row["delivery"].startswith("outbox:"):
                states = outbox.job_destinations(correction_job_id(series_uid, row["version"]))
                row["destinations"] = {name: state["state"] for name, state in states.items()}
        versions = []
        job = self._newest_done_job(series_uid)
        if job is not None:
            versions.append({"version": 1, "source": "engine", "job_id": job.id, "user": None,
                             "time": datetime.fromtimestamp(job.finished or job.created, UTC).isoformat(
                                 timespec="seconds").replace("+00:00", "Z"), "base": f"job {job.id}"})
        for row in self.annotations.rows(series_uid):
            versions.append({"version": row["version"], "source": "correction", "job_id": None,
                             "user": row["user"], "time": row["time"], "base": row["base"]})
        for entry in versions:
            entry["current"] = entry["version"] == loaded.version
        return {
            "series_uid": series_uid, "study_uid": loaded.study_uid, "modality": modality,
            "versions": versions,
            "description": source.series_description if source else "",
            "slices": n, "rows": rows, "columns": columns, "spacing": list(ct.geometry.spacing),
            "dtype": "int16" if ct.array.dtype == np.int16 else "float32",
            "token": loaded.token, "labels_token": labels_token(loaded.labels_key), "version": loaded.version,
            "base": loaded.base,
            "classes": [_class_json(c) for c in loaded.classes.values()],
            "labelled_slices": labelled, "presets": presets, "history": history,
            "user": user, "can_save": bool(self.settings.http.tokens) and user is not None,
            "destinations": self._destinations(series_uid),
        }

    def image(self, series_uid: str, k: int, token: str | None) -> tuple[Loaded, np.ndarray]:
        loaded = self.load(series_uid)
        if token and token != loaded.token:
            raise EditError(409, "the series changed since it was opened (new instances): reload the editor")
        if not 0 <= k < loaded.ct.array.shape[0]:
            raise EditError(404, f"slice {k} is outside 0..{loaded.ct.array.shape[0] - 1}")
        return loaded, loaded.ct.array[k]

    def label_plane(self, series_uid: str, k: int, version: int | None) -> tuple[Loaded, np.ndarray]:
        loaded = self.load(series_uid)
        with loaded.lock:
            if version is not None and version != loaded.version:
                raise EditError(409, f"version {loaded.version} was saved since version {version} was opened: "
                                     "reload the editor")
            if not 0 <= k < loaded.labels.shape[0]:
                raise EditError(404, f"slice {k} is outside 0..{loaded.labels.shape[0] - 1}")
            return loaded, loaded.labels[k]

    def _destinations(self, series_uid: str) -> list[str]:
        """Where a correction of the series goes: its newest job's destinations, else all configured."""
        configured = [d.name for d in self.settings.destinations]
        jobs = self.store.for_series(series_uid)
        if jobs:
            return [name for name in jobs[-1].destinations if name in configured]
        return configured

    # --- saving -------------------------------------------------------------------------------
    def save(self, series_uid: str, user: str, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise EditError(400, "the body must be a JSON object")
        base_version = payload.get("base_version")
        if not isinstance(base_version, int) or isinstance(base_version, bool):
            raise EditError(400, "base_version (the version the edit started from) must be an integer")
        loaded = self.load(series_uid, refresh=True)
        with loaded.lock:
            if payload.get("token") not in (None, loaded.token):
                raise EditError(409, "the series changed since it was opened (new instances): reload the editor")
            latest = self.annotations.latest(series_uid)
            current = loaded.version
            if base_version != current:
                if loaded.base.startswith("job "):
                    raise EditError(409, f"a newer result ({loaded.base}) arrived after version {base_version} "
                                         "was opened: reload the editor (your edits are not saved)")
                who = f" by {latest['user']}" if latest and latest["version"] == current else ""
                raise EditError(409, f"version {current} was saved{who} after version {base_version} was "
                                     "opened: reload the editor (your edits are not saved)")
            if payload.get("labels_token") not in (None, labels_token(loaded.labels_key)):
                raise EditError(409, f"the labels shown now ({loaded.base}) are not the ones the edit started "
                                     "from: reload the editor (your edits are not saved)")
            classes = dict(loaded.classes)
            for c in self._custom_labels(payload.get("labels", []), classes):
                classes[c.id] = c
            planes = self._planes(payload, loaded)
            new = loaded.labels.copy()
            changed_slices, changed_ids, voxels = [], set(), 0
            for k, plane in sorted(planes.items()):
                unknown = sorted(int(i) for i in np.unique(plane) if i and int(i) not in classes)
                if unknown:
                    raise EditError(400, f"slice {k} uses label id(s) {', '.join(map(str, unknown))}, which are "
                                         "not in the label list: add them as labels first")
                diff = plane != loaded.labels[k]
                if diff.any():
                    changed_slices.append(k)
                    voxels += int(diff.sum())
                    changed_ids |= {int(i) for i in np.unique(plane[diff])} | {
                        int(i) for i in np.unique(loaded.labels[k][diff])}
                    new[k] = plane
            if not changed_slices:
                raise EditError(400, f"the slices sent are the same as version {current}: nothing to save")
            return self._commit(loaded, new, classes, changed_slices, changed_ids, voxels, user,
                                loaded.base or f"version {current}")

    def _commit(self, loaded: Loaded, new: np.ndarray, classes: dict[int, LabelClass],
                changed_slices: list[int], changed_ids: set[int], voxels: int, user: str,
                base: str) -> dict[str, Any]:
        """Write ``new`` as the next version (caller holds ``loaded.lock`` and checked the base)."""
        series_uid, current = loaded.series_uid, loaded.version
        latest = self.annotations.latest(series_uid)
        changed_ids.discard(0)
        version = max(current, latest["version"] if latest else 0) + 1
        present = [int(i) for i in np.unique(new) if i]
        if not present:
            raise EditError(400, "the edit leaves no labelled voxel in the series: a DICOM-SEG needs at "
                                 "least one segment")
        volume = LabelVolume(new, loaded.ct.geometry, loaded.ct.source,
                             classes={i: classes[i] for i in present})
        out = self.corrections / series_uid / f"v{version}.dcm"
        path = self._write(volume, loaded, out, version=version, user=user)
        seg_uid, seg_series_uid = self._uids(path)
        delivery = self._deliver(path, loaded, version)
        source = loaded.ct.source
        instances = (tuple(source.instance_uids[k] for k in changed_slices)
                     if source and source.instance_uids else ())
        try:
            row = self.annotations.append(Annotation(
                user=user, study_uid=loaded.study_uid, series_uid=series_uid, seg_uid=seg_uid,
                seg_series_uid=seg_series_uid, version=version, base=base,
                slices=tuple(changed_slices), source_instances=instances,
                labels=tuple(classes[i].name for i in sorted(changed_ids)), voxels_changed=voxels,
                path=str(path), delivery=delivery))
        except VersionTaken as exc:
            raise EditError(409, f"{exc}: reload the editor") from None
        loaded.labels, loaded.version = new, version
        loaded.classes = dict(sorted(classes.items()))
        loaded.base, loaded.labels_key = f"version {version} by {user}", (version, loaded.labels_key[1])
        log.info("editor: series %s version %d saved by %s (%d slice(s), %d voxel(s); %s)", series_uid,
                 version, user, len(changed_slices), voxels, delivery)
        return {"version": version, "seg_uid": seg_uid, "seg_series_uid": seg_series_uid,
                "path": str(path.relative_to(self.data_dir)) if path.is_relative_to(self.data_dir) else str(path),
                "delivery": delivery, "slices": changed_slices, "labels": list(row["labels"].split(";")),
                "voxels_changed": voxels, "time": row["time"], "user": user,
                "labels_token": labels_token(loaded.labels_key),
                "classes": [_class_json(c) for c in loaded.classes.values()]}

    # --- other versions -----------------------------------------------------------------------
    def version_labels(self, series_uid: str,
                       version: int) -> tuple[Loaded, np.ndarray, dict[int, LabelClass]]:
        """The label volume and classes of ``version`` of the series (1: the engine's; 2..: corrections)."""
        loaded = self.load(series_uid)
        with loaded.lock:
            if version == loaded.version:
                return loaded, loaded.labels, loaded.classes
        key = (series_uid, version, loaded.token)
        with self._cache_lock:
            hit = self._versions.get(key)
            if hit is not None:
                self._versions.move_to_end(key)
                return loaded, *hit
        if version == 1:
            job = self._newest_done_job(series_uid)
            results = Path(job.results or "") if job is not None else None
            if results is not None and (results / "seg.dcm").is_file():
                labels = read_seg_labels(results / "seg.dcm", loaded.ct)
            elif results is not None and (results / "labels.nii.gz").is_file():
                labels = self._nifti_labels(results, loaded.ct)
            else:
                raise EditError(404, f"series {series_uid} has no engine result (version 1)")
        else:
            row = next((r for r in self.annotations.rows(series_uid) if r["version"] == version), None)
            if row is None or not Path(row["path"]).is_file():
                raise EditError(404, f"series {series_uid} has no version {version}")
            labels = read_seg_labels(Path(row["path"]), loaded.ct)
        entry = (np.ascontiguousarray(labels.array, dtype=np.uint16), dict(labels.classes))
        with self._cache_lock:
            self._versions[key] = entry
            while len(self._versions) > CACHE_SIZE:
                self._versions.popitem(last=False)
        return loaded, *entry

    def restore(self, series_uid: str, user: str, payload: Any) -> dict[str, Any]:
        """Version ``payload["version"]`` made current again: its labels written as the next version."""
        if not isinstance(payload, dict):
            raise EditError(400, "the body must be a JSON object")
        version, base_version = payload.get("version"), payload.get("base_version")
        for name, value in (("version", version), ("base_version", base_version)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise EditError(400, f"{name} must be an integer")
        self.load(series_uid, refresh=True)
        loaded, array, version_classes = self.version_labels(series_uid, version)
        with loaded.lock:
            current = loaded.version
            if base_version != current:
                raise EditError(409, f"version {current} is current now, not version {base_version}: "
                                     "reload the editor")
            if version == current:
                raise EditError(400, f"version {version} is the current version already")
            diff = array != loaded.labels
            changed_slices = [int(k) for k in np.flatnonzero(diff.reshape(diff.shape[0], -1).any(axis=1))]
            if not changed_slices:
                raise EditError(400, f"version {version} has the same labels as version {current}: "
                                     "nothing to do")
            classes = {**loaded.classes, **version_classes}
            changed_ids = ({int(i) for i in np.unique(array[diff])}
                           | {int(i) for i in np.unique(loaded.labels[diff])})
            return self._commit(loaded, array.copy(), classes, changed_slices, changed_ids, int(diff.sum()),
                                user, f"version {version} made current again (was version {current})")

    def view(self, series_uid: str, axis: str, index: int, center: float | None, width: float | None,
             opacity: float, version: int | None) -> tuple[bytes, bool]:
        """A coronal or sagittal plane as an RGB PNG (labels blended at ``opacity``), the patient's head
        up; and whether slice k = 0 is at its bottom (the client maps clicks to slices with it)."""
        if axis not in ("coronal", "sagittal"):
            raise EditError(404, f"axis must be coronal or sagittal, not {axis!r}")
        if version is None:
            version = self.load(series_uid).version
        loaded, labels, classes = self.version_labels(series_uid, version)
        n, rows, columns = loaded.ct.array.shape
        size = rows if axis == "coronal" else columns
        if not 0 <= index < size:
            raise EditError(404, f"{axis} plane {index} is outside 0..{size - 1}")
        take = (slice(None), index, slice(None)) if axis == "coronal" else (slice(None), slice(None), index)
        center = loaded.auto_window[0] if center is None else center
        width = loaded.auto_window[1] if width is None else width
        grey = windowed(loaded.ct.array[take], center, width).astype(np.float32)
        plane = labels[take]
        colors = np.zeros((max([0, *classes, int(plane.max())]) + 1, 3), np.float32)
        for c in classes.values():
            colors[c.id] = c.color
        alpha = np.where(plane > 0, np.float32(min(max(opacity, 0.0), 1.0)), np.float32(0.0))[..., None]
        rgb = np.rint(grey[..., None] * (1 - alpha) + colors[plane] * alpha).astype(np.uint8)
        # Head up: rows are slices k; flip when k runs towards the head (+z in LPS is superior).
        bottom_is_first = float(loaded.ct.geometry.direction_matrix[2, 2]) > 0
        if bottom_is_first:
            rgb = rgb[::-1]
        return png_rgb8(np.ascontiguousarray(rgb)), bottom_is_first

    @staticmethod
    def _custom_labels(given: Any, classes: dict[int, LabelClass]) -> list[LabelClass]:
        from node.segment.labelmap import make_class

        if not isinstance(given, list):
            raise EditError(400, "labels must be a list of {id, name, color}")
        out = []
        for entry in given:
            if not isinstance(entry, dict):
                raise EditError(400, "each label must be an object {id, name, color}")
            label_id, name = entry.get("id"), entry.get("name")
            if not isinstance(label_id, int) or isinstance(label_id, bool) or not 0 < label_id < 65536:
                raise EditError(400, f"label id {label_id!r} must be an integer 1..65535")
            if not isinstance(name, str) or not name.strip() or len(name) > MAX_LABEL_NAME:
                raise EditError(400, f"label {label_id} needs a name of 1..{MAX_LABEL_NAME} characters")
            name = name.strip()
            known = classes.get(label_id)
            if known is not None:
                if known.name != name:
                    raise EditError(400, f"label id {label_id} is {known.name!r} already, not {name!r}")
                continue
            out.append(make_class(label_id, name, {"color": entry.get("color")}))
        return out

    @staticmethod
    def _planes(payload: dict[str, Any], loaded: Loaded) -> dict[int, np.ndarray]:
        slices = payload.get("slices")
        if not isinstance(slices, dict) or not slices:
            raise EditError(400, "slices must be an object {slice index: base64 label plane} with at least one")
        encoding = payload.get("encoding", "raw")
        if encoding not in ("raw", "zlib"):
            raise EditError(400, f"encoding must be raw or zlib, not {encoding!r}")
        n, rows, columns = loaded.labels.shape
        planes: dict[int, np.ndarray] = {}
        for key, text in slices.items():
            try:
                k = int(key)
            except (TypeError, ValueError):
                raise EditError(400, f"slice index {key!r} is not an integer") from None
            if not 0 <= k < n:
                raise EditError(400, f"slice {k} is outside 0..{n - 1}")
            try:
                data = base64.b64decode(str(text), validate=True)
                if encoding == "zlib":
                    data = zlib.decompress(data, bufsize=rows * columns * 2)
            except (binascii.Error, zlib.error) as exc:
                raise EditError(400, f"slice {k}: not {encoding} base64 data ({exc})") from None
            if len(data) != rows * columns * 2:
                raise EditError(400, f"slice {k}: {len(data)} bytes, expected {rows}x{columns} uint16 "
                                     f"({rows * columns * 2} bytes)")
            planes[k] = np.frombuffer(data, dtype="<u2").reshape(rows, columns).astype(np.uint16)
        return planes

    def _write(self, volume: LabelVolume, loaded: Loaded, out: Path, *, version: int, user: str) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            write_seg_file(volume, loaded.folder, tmp, version=version, user=user)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, out)
        except ValueError as exc:  # SegError: these labels cannot be a SEG of this series
            raise EditError(422, f"the SEG cannot be written: {exc}") from None
        except Exception as exc:
            log.exception("editor: series %s: SEG version %d cannot be written", loaded.series_uid, version)
            raise EditError(500, f"the SEG cannot be written: {type(exc).__name__}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return out

    @staticmethod
    def _uids(path: Path) -> tuple[str, str]:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
        return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)

    def _deliver(self, path: Path, loaded: Loaded, version: int) -> str:
        names = self._destinations(loaded.series_uid)
        outbox = self.outbox() if names else None
        if outbox is None:
            return f"kept in {self.corrections.name}/ (no destination)" if not names else \
                f"kept in {self.corrections.name}/ (no outbox running)"
        try:
            states = outbox.enqueue(correction_job_id(loaded.series_uid, version), names, [path],
                                    source_series_uid=loaded.series_uid, study_uid=loaded.study_uid)
        except Exception as exc:
            log.exception("editor: series %s version %d: outbox refused it", loaded.series_uid, version)
            return f"kept in {self.corrections.name}/; outbox failed: {type(exc).__name__}: {exc}"
        refused = [f"{name} ({states[name].get('last_error')})" for name in names
                   if states.get(name, {}).get("state") == "failed"]
        return "outbox: " + ", ".join(names) + (f"; refused: {', '.join(refused)}" if refused else "")

    # --- HTTP ---------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        return [
            Route("/api/edit/{series}", self._info_route),
            Route("/api/edit/{series}/image/{k:int}", self._image_route),
            Route("/api/edit/{series}/labels/{k:int}", self._labels_route),
            Route("/api/edit/{series}/save", self._save_route, methods=["POST"]),
            Route("/api/edit/{series}/restore", self._restore_route, methods=["POST"]),
            Route("/api/edit/{series}/versions/{v:int}/labels/{k:int}", self._version_labels_route),
            Route("/api/edit/{series}/view/{axis}/{index:int}", self._view_route),
            Route("/api/annotations", self._annotations_route),
            Route("/api/annotations.csv", self._annotations_csv_route),
        ]

    @staticmethod
    def _user(request: Request) -> str | None:
        return request.scope.get("state", {}).get("user")

    def _info_route(self, request: Request) -> Response:
        try:
            return JSONResponse(self.info(request.path_params["series"], self._user(request)))
        except EditError as exc:
            return _error(exc.status, exc.message)

    def _image_route(self, request: Request) -> Response:
        q = request.query_params
        try:
            loaded, plane = self.image(request.path_params["series"], request.path_params["k"], q.get("t"))
            if q.get("format", "raw") == "png":
                try:
                    center = float(q.get("center", loaded.auto_window[0]))
                    width = float(q.get("width", loaded.auto_window[1]))
                except ValueError:
                    raise EditError(400, "center and width must be numbers") from None
                return Response(png_gray8(windowed(plane, center, width)), media_type="image/png",
                                headers={"cache-control": "private, max-age=3600"})
            if q.get("format", "raw") != "raw":
                raise EditError(400, "format must be raw or png")
        except EditError as exc:
            return _error(exc.status, exc.message)
        dtype = "<i2" if plane.dtype == np.int16 else "<f4"
        data = np.ascontiguousarray(plane, dtype=dtype).tobytes()
        return _binary(request, data, {"x-dtype": "int16" if dtype == "<i2" else "float32",
                                       "x-shape": f"{plane.shape[0]},{plane.shape[1]}"})

    def _labels_route(self, request: Request) -> Response:
        version = request.query_params.get("v")
        try:
            loaded, plane = self.label_plane(request.path_params["series"], request.path_params["k"],
                                             int(version) if version and version.isdigit() else None)
        except EditError as exc:
            return _error(exc.status, exc.message)
        data = np.ascontiguousarray(plane, dtype="<u2").tobytes()
        return _binary(request, data, {"x-dtype": "uint16", "x-shape": f"{plane.shape[0]},{plane.shape[1]}",
                                       "x-version": str(loaded.version)})

    async def _save_route(self, request: Request) -> Response:
        user = self._user(request)
        if not self.settings.http.tokens or user is None:
            return _error(403, "saving needs a signed-in user (every save is attributed): "
                               "this node has no [http] tokens")
        limit = self.settings.http.max_upload_mb * 1024 * 1024
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, f"save over the limit of {limit >> 20} MB")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        try:
            result = await run_in_threadpool(self.save, request.path_params["series"], user, payload)
        except EditError as exc:
            if exc.status >= 500:
                log.warning("editor: save of %s failed: %s", request.path_params["series"], exc.message)
            return _error(exc.status, exc.message)
        return JSONResponse(result, status_code=201)

    async def _restore_route(self, request: Request) -> Response:
        user = self._user(request)
        if not self.settings.http.tokens or user is None:
            return _error(403, "making a version current needs a signed-in user (every version is "
                               "attributed): this node has no [http] tokens")
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        try:
            result = await run_in_threadpool(self.restore, request.path_params["series"], user, payload)
        except EditError as exc:
            return _error(exc.status, exc.message)
        return JSONResponse(result, status_code=201)

    def _version_labels_route(self, request: Request) -> Response:
        k = request.path_params["k"]
        try:
            _, labels, _ = self.version_labels(request.path_params["series"], request.path_params["v"])
            if not 0 <= k < labels.shape[0]:
                raise EditError(404, f"slice {k} is outside 0..{labels.shape[0] - 1}")
        except EditError as exc:
            return _error(exc.status, exc.message)
        data = np.ascontiguousarray(labels[k], dtype="<u2").tobytes()
        return _binary(request, data, {"x-dtype": "uint16", "x-shape": f"{labels.shape[1]},{labels.shape[2]}",
                                       "x-version": str(request.path_params["v"])})

    def _view_route(self, request: Request) -> Response:
        q = request.query_params
        try:
            try:
                center = float(q["center"]) if "center" in q else None
                width = float(q["width"]) if "width" in q else None
                opacity = float(q.get("opacity", 0.5))
                version = int(q["v"]) if "v" in q else None
            except ValueError:
                raise EditError(400, "center, width and opacity must be numbers, v an integer") from None
            png, bottom_is_first = self.view(request.path_params["series"], request.path_params["axis"],
                                             request.path_params["index"], center, width, opacity, version)
        except EditError as exc:
            return _error(exc.status, exc.message)
        return Response(png, media_type="image/png", headers={
            "cache-control": "private, no-cache", "x-first-slice": "bottom" if bottom_is_first else "top"})

    def _annotations_route(self, request: Request) -> Response:
        return JSONResponse(self.annotations.rows(request.query_params.get("series") or None))

    def _annotations_csv_route(self, request: Request) -> Response:
        text = self.annotations.csv(request.query_params.get("series") or None)
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="annotations.csv"'})


def correction_job_id(series_uid: str, version: int) -> str:
    """The outbox's job id for a correction (its delivery state is kept under it)."""
    return f"edit-{series_uid}-v{version}"


__all__ = ["EditError", "Editor", "correction_job_id", "png_gray8", "png_rgb8", "windowed"]
