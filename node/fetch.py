"""Fetch a series from Orthanc by WADO-RS, and the hand-off route of the Orthanc plugin.

Plugin mode (``orthanc/segnode_plugin.py``): Orthanc says "series X is stable" with
``POST /api/orthanc/series`` ``{"orthanc_series_id", "study_uid", "series_uid", "instances", ...}``;
:class:`OrthancIntake` then retrieves the series from Orthanc's DICOMweb (``[orthanc]`` in the config)
and stores every instance through the ingest receiver, in one session, exactly as a C-STORE
association would: the spool, series completion, routing and the job follow unchanged, with
``Sender.via == "orthanc"``. No disk is shared with Orthanc.

The answer comes once every instance is in the spool (fsynced) and the session has ended: 200 with
counts and seconds; 502 when Orthanc could not be read or gave fewer instances than it announced
(the plugin tries again later; instances already spooled are duplicates then, and skipped); 503 when
``[orthanc] url`` is not set. A repeated hand-off of a series already handed on changes nothing.

Retrieval streams the ``multipart/related`` answer and hands each part's bytes on as they come, in
the transfer syntax Orthanc stored them (``transfer-syntax=*``): no decoding and re-encoding of every
instance, as dicomweb-client's ``retrieve_series`` (which yields parsed datasets) would need. The
HTTP session is the one dicomweb-client uses elsewhere (basic or bearer auth, TLS verification).
"""

from __future__ import annotations

import email.message
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.config import OrthancSection, Settings
from node.http import session_for
from node.ingest import Sender

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Threads that store fetched instances into the spool (their fsyncs overlap).
STORE_THREADS = 4


class FetchError(Exception):
    """The series could not be retrieved (as one line for people)."""


@dataclass
class FetchStats:
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0


class OrthancSource:
    """The DICOMweb side of the Orthanc in ``[orthanc]``."""

    def __init__(self, section: OrthancSection) -> None:
        if not section.url:
            raise FetchError("[orthanc] url is not set")
        self.section = section
        self.dicomweb_url = section.url.rstrip("/") + "/" + section.dicomweb_root.strip("/")
        self.session = session_for(section)

    def iter_series(
        self, study_uid: str, series_uid: str, stats: FetchStats | None = None
    ) -> Iterator[bytes]:
        """The instances of a series, as Part 10 bytes, while they arrive."""
        import requests

        for uid in (study_uid, series_uid):
            if not _UID.match(uid or ""):
                raise FetchError(f"not a UID: {uid!r}")
        url = f"{self.dicomweb_url}/studies/{study_uid}/series/{series_uid}"
        started = time.perf_counter()
        try:
            response = self.session.get(
                url, headers={"Accept": ACCEPT}, stream=True, timeout=(10, self.section.timeout_s)
            )
        except requests.RequestException as exc:
            raise FetchError(f"WADO-RS {url}: {type(exc).__name__}: {exc}") from None
        with response:
            if response.status_code != 200:
                raise FetchError(f"WADO-RS {url}: HTTP {response.status_code} {response.text[:200]}".rstrip())
            boundary = _boundary(response.headers.get("Content-Type", ""))
            try:
                for headers, content in iter_parts(response.iter_content(1 << 20), boundary):
                    kind = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
                    if kind != "application/dicom":
                        raise FetchError(f"WADO-RS part of type {kind!r}, not application/dicom")
                    if stats is not None:
                        stats.instances += 1
                        stats.bytes += len(content)
                        stats.seconds = time.perf_counter() - started
                    yield content
            except requests.RequestException as exc:
                raise FetchError(f"WADO-RS {url}: {type(exc).__name__}: {exc}") from None

    def fetch_series(self, study_uid: str, series_uid: str, out_dir: Path) -> list[Path]:
        """The series into ``out_dir``, one ``<SOPInstanceUID>.dcm`` per instance."""
        import pydicom

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, data in enumerate(self.iter_series(study_uid, series_uid), start=1):
            try:
                uid = str(
                    pydicom.dcmread(
                        _as_file(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                    ).SOPInstanceUID
                )
                name = f"{uid}.dcm" if _UID.match(uid) else f"part{n:05d}.dcm"
            except Exception:
                name = f"part{n:05d}.dcm"
            path = out / name
            path.write_bytes(data)
            paths.append(path)
        return paths

    def close(self) -> None:
        self.session.close()


def _as_file(data: bytes):
    import io

    return io.BytesIO(data)


def _boundary(content_type: str) -> str:
    header = email.message.Message()
    header["Content-Type"] = content_type
    if header.get_content_type() != "multipart/related":
        raise FetchError(f"WADO-RS answered {content_type!r}, not multipart/related")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise FetchError(f"no boundary in {content_type!r}")
    return boundary


def iter_parts(chunks: Iterable[bytes], boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """``(headers, content)`` of each part of a ``multipart/related`` body (RFC 2046 5.1) read from
    ``chunks``, as soon as the part is whole. Header names are lower-cased; content is byte-exact."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    buf = bytearray(b"\r\n")  # the first delimiter may have no CRLF before it
    search_from, started, closed = 0, False, False
    for chunk in chunks:
        if closed:
            break
        buf += chunk
        while True:
            at = buf.find(delimiter, search_from)
            if at < 0:
                search_from = max(0, len(buf) - len(delimiter) + 1)
                break
            if started:
                yield _part(bytes(buf[:at]))
            del buf[: at + len(delimiter)]
            started, search_from = True, 0
            if buf[:2] == b"--":
                closed = True
                break
    if not started:
        raise FetchError("multipart body without a single part")
    if not closed and buf[:2] != b"--":
        raise FetchError("multipart body ended before its close delimiter (truncated)")


def _part(raw: bytes) -> tuple[dict[str, str], bytes]:
    # raw: transport padding, CRLF, header lines, CRLF CRLF, content
    head, sep, content = raw.partition(b"\r\n\r\n")
    if not sep:
        raise FetchError("a multipart part has no blank line after its headers")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip():
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length and length.isdigit() and int(length) != len(content):
        raise FetchError(f"a part says Content-Length {length} but has {len(content)} bytes")
    return headers, content


# --- the plugin's hand-off ------------------------------------------------------------------------


@dataclass
class HandoffResult:
    series_uid: str
    instances: int = 0
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class OrthancIntake:
    """``POST /api/orthanc/series``: the plugin says a series is stable; the node fetches it into the
    spool through ``receiver`` (which has ``session(kind)`` and ``store(bytes, sender, session=...)``)."""

    def __init__(
        self, settings: Settings, receiver: Any, source: Callable[[], OrthancSource] | None = None
    ) -> None:
        self.settings, self.receiver = settings, receiver
        self._source = source or (lambda: OrthancSource(settings.orthanc))

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        return [Route("/api/orthanc/series", self.handle, methods=["POST"])]

    async def handle(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        if not self.settings.orthanc.url:
            return JSONResponse(
                {"error": "[orthanc] url is not set: this node takes no hand-offs from Orthanc"},
                status_code=503,
            )
        try:
            payload = await request.json()
            study, series = str(payload["study_uid"]), str(payload["series_uid"])
            expected = int(payload.get("instances") or 0)
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {"error": "expected JSON {study_uid, series_uid, instances, orthanc_series_id}"},
                status_code=400,
            )
        if not (_UID.match(study) and _UID.match(series)):
            return JSONResponse({"error": "study_uid and series_uid must be UIDs"}, status_code=400)
        sender = Sender(
            "orthanc", str(payload.get("aet", ""))[:16], request.client.host if request.client else ""
        )
        try:
            result = await run_in_threadpool(self.take, study, series, sender, expected)
        except FetchError as exc:
            log.warning("orthanc series %s: not fetched: %s", series, exc)
            return JSONResponse({"error": str(exc), "series_uid": series}, status_code=502)
        return JSONResponse(asdict(result))

    def take(self, study_uid: str, series_uid: str, sender: Sender, expected: int = 0) -> HandoffResult:
        """Fetch the series into the spool in one receiver session (ended cleanly only when whole).

        Instances are stored by :data:`STORE_THREADS` threads while the download goes on: each store
        waits on its fsyncs (file and folder), which overlap across threads (with fsync on, a 300-slice
        series is stored ~3x faster than one instance after the other)."""
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()
        result = HandoffResult(series_uid)
        stats = FetchStats()
        source = self._source()
        lock = threading.Lock()
        slots = threading.BoundedSemaphore(STORE_THREADS * 4)  # parts in memory at most

        def store(data: bytes, session: str) -> None:
            try:
                outcome = self.receiver.store(data, sender, session=session)
            finally:
                slots.release()
            with lock:
                if not outcome.ok:
                    result.refused += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"0x{outcome.status:04X}: {outcome.reason}")
                elif getattr(outcome, "duplicate", False):
                    result.duplicates += 1
                else:
                    result.stored += 1

        try:
            with self.receiver.session("orthanc") as session:
                with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="segnode-fetch") as pool:
                    futures = []
                    for data in source.iter_series(study_uid, series_uid, stats):
                        slots.acquire()
                        futures.append(pool.submit(store, data, session))
                    for future in futures:
                        future.result()  # a store that raised ends the session as interrupted
                if expected and stats.instances < expected:
                    raise FetchError(
                        f"Orthanc announced {expected} instances, WADO-RS gave {stats.instances}"
                    )
        finally:
            source.close()
        result.instances, result.bytes = stats.instances, stats.bytes
        result.seconds = round(time.perf_counter() - started, 3)
        log.info(
            "orthanc series %s: %d instance(s) fetched (%d new, %d already here, %d refused), %.1f MB "
            "in %.2f s",
            series_uid,
            result.instances,
            result.stored,
            result.duplicates,
            result.refused,
            result.bytes / 1e6,
            result.seconds,
        )
        return result
