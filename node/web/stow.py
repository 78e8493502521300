"""STOW-RS receiver (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with
``multipart/related; type="application/dicom"``.

The body is streamed to a temporary file under ``<data_dir>/tmp`` (so a large upload never sits in
memory), split into parts, and each part goes to the receiver (spool + series completion) in one
session: instances from several POSTs of one series land in the same spool series and complete
together. Answers (PS3.18 Table 10.5.3-1): 200 all stored, 202 some stored, 409 none stored,
415 not ``multipart/related`` of ``application/dicom``, 413 over ``[http] max_upload_mb``, 400 a
body that is not well-formed multipart. The body is a Store Instances Response (PS3.18 10.5.3.2)
in the DICOM JSON model: ReferencedSOPSequence and FailedSOPSequence with FailureReason.

FailureReason is a number; the reason in words goes where a client can show it without a change to
the response module: one ``Warning`` header per failed instance (RFC 7234 5.5, warn-code 299, as PS3.18
answers its UPS and Thin-Client transactions, 11.6.3.2 and 13.4.3.2, where it recommends the DICOM status
and a reason as the text): ``299 host:port "<SOP Instance UID or part n>: 0xC000: <reason>"``, patient
data scrubbed (:mod:`node.logs`).
"""

from __future__ import annotations

import email.message
import io
import logging
import mmap
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.ingest import Sender

log = logging.getLogger(__name__)

#: FailureReason (0008,1197) values we use beyond the receiver's C-STORE statuses.
CANNOT_UNDERSTAND = 0xC000
#: The instance belongs to another study than the one in the URL (as dcm4chee answers it).
STUDY_MISMATCH = 0xC409
DICOM_JSON = "application/dicom+json"


class StoreOutcome(Protocol):
    status: int
    reason: str
    info: Any  # has sop_class_uid, sop_instance_uid when known


class Target(Protocol):
    """What the route stores into: :class:`node.ingest.receiver.Receiver`."""

    def session(self, kind: str = ...) -> AbstractContextManager[str]: ...

    def store(self, dataset: bytes | memoryview, sender: Sender, *, session: str) -> StoreOutcome: ...


class MultipartError(ValueError):
    """The body is not well-formed multipart (answered 400)."""


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``("multipart/related", {"type": ..., "boundary": ...})`` from a Content-Type value."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    params = {k.lower(): str(v) for k, v in header.get_params(failobj=[])[1:]}
    return header.get_content_type(), params


def split_parts(body: bytes | mmap.mmap, boundary: str) -> Iterator[tuple[dict[str, str], int, int]]:
    """``(headers, start, end)`` of each part of a multipart body (RFC 2046 5.1), byte offsets, so
    parts are never copied; raises :class:`MultipartError`."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    # The first delimiter may open the body without a CRLF before it.
    if body[: len(delimiter) - 2] == delimiter[2:]:
        position = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        if found < 0:
            raise MultipartError("no multipart boundary in the body")
        position = found + len(delimiter)
    while True:
        if body[position:position + 2] == b"--":
            return  # the close delimiter
        line_end = body.find(b"\r\n", position)  # transport padding, then CRLF
        if line_end < 0:
            raise MultipartError("multipart body ends inside a boundary line")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if body[line_end:line_end + 4] == b"\r\n\r\n":
            headers_end = line_end
        if headers_end < 0:
            raise MultipartError("a multipart part has no blank line after its headers")
        headers: dict[str, str] = {}
        for line in bytes(body[line_end + 2:headers_end]).decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        start = headers_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise MultipartError("multipart body has no close delimiter")
        yield headers, start, end
        position = end + len(delimiter)


@dataclass
class _Item:
    sop_class: str | None
    sop_instance: str | None
    reason: int | None = None  # None = stored
    #: Why it was not stored, for people.
    text: str = ""


#: Warning header values per response, at most (the rest are counted in one more).
MAX_WARNINGS = 50


def _quoted(text: str) -> str:
    """An RFC 7230 quoted-string of ``text`` in printable ASCII (header values are Latin-1 at best)."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def warning_headers(items: list[_Item], agent: str) -> list[tuple[str, str]]:
    """``Warning: 299 <agent> "<what>: 0x<reason>: <text>"`` for each failed item (RFC 7234 5.5)."""
    from node import logs

    failed = [(n, i) for n, i in enumerate(items, 1) if i.reason is not None]
    values = [f"299 {agent} " + _quoted(logs.scrub(
        f"{i.sop_instance or f'part {n}'}: 0x{i.reason:04X}: {i.text or 'refused'}")) for n, i in failed]
    if len(values) > MAX_WARNINGS:
        values = values[:MAX_WARNINGS] + [f'299 {agent} "and {len(values) - MAX_WARNINGS} more failed"']
    return [("warning", v) for v in values]


def _attr(uid: str | None, vr: str = "UI") -> dict[str, Any]:
    return {"vr": vr, "Value": [uid]} if uid else {"vr": vr}


def store_response(items: list[_Item], retrieve_url: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-2) in the DICOM JSON model."""
    response: dict[str, Any] = {}
    if retrieve_url:
        response["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    failed = [i for i in items if i.reason is not None]
    stored = [i for i in items if i.reason is None]
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _attr(i.sop_class), "00081155": _attr(i.sop_instance),
             "00081197": {"vr": "US", "Value": [i.reason]}} for i in failed]}
    if stored:
        response["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _attr(i.sop_class), "00081155": _attr(i.sop_instance)} for i in stored]}
    return response


def _peek(part: memoryview) -> tuple[str | None, str | None, str | None]:
    """(SOP class, SOP instance, study) UIDs of a part, as far as it can be read."""
    try:
        ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        file_meta = getattr(ds, "file_meta", None)
        sop_class = ds.get("SOPClassUID") or (file_meta.get("MediaStorageSOPClassUID") if file_meta else None)
        return (str(sop_class) if sop_class else None, str(ds.get("SOPInstanceUID") or "") or None,
                str(ds.get("StudyInstanceUID") or "") or None)
    except Exception:
        return None, None, None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class StowRoute:
    """The endpoint; ``target`` is the receiver, uploads are buffered under ``tmp_dir``."""

    def __init__(self, target: Target, max_upload_mb: int, tmp_dir: Path) -> None:
        self.target = target
        self.max_bytes = max_upload_mb * 1024 * 1024
        self.tmp_dir = Path(tmp_dir)

    def routes(self) -> list[Route]:
        return [Route("/dicomweb/studies", self.handle, methods=["POST"]),
                Route("/dicomweb/studies/{study}", self.handle, methods=["POST"])]

    async def handle(self, request: Request) -> Response:
        kind, params = media_type(request.headers.get("content-type", ""))
        if kind != "multipart/related":
            return _error(415, f"expected multipart/related; type=\"application/dicom\", got {kind!r}")
        part_type = params.get("type", "application/dicom").split(";")[0].strip().lower()
        if part_type != "application/dicom":
            return _error(415, f"only application/dicom parts are accepted, got type={part_type!r}")
        boundary = params.get("boundary")
        if not boundary:
            return _error(400, "multipart/related without a boundary")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            return _error(413, f"upload over the limit of {self.max_bytes >> 20} MB")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.tmp_dir, prefix="stow-") as buffer:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_bytes:
                    return _error(413, f"upload over the limit of {self.max_bytes >> 20} MB")
                await run_in_threadpool(buffer.write, chunk)
            if size == 0:
                return _error(400, "empty body")
            buffer.flush()
            study = request.path_params.get("study")
            sender = Sender("stow", "", request.client.host if request.client else "")
            try:
                items = await run_in_threadpool(self._store_all, buffer.fileno(), boundary, sender, study)
            except MultipartError as exc:
                return _error(400, str(exc))
        stored = sum(i.reason is None for i in items)
        status = 200 if stored == len(items) else 202 if stored else 409
        log.info("STOW-RS: %d part(s), %d stored, %d failed%s", len(items), stored, len(items) - stored,
                 f" (study {study})" if study else "")
        retrieve = str(request.url) if study else None
        response = JSONResponse(store_response(items, retrieve), status_code=status, media_type=DICOM_JSON)
        agent = request.url.netloc or "segnode"
        for name, value in warning_headers(items, agent):
            response.headers.append(name, value)
        return response

    def _store_all(self, fd: int, boundary: str, sender: Sender, study: str | None) -> list[_Item]:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as body:
            parts = list(split_parts(body, boundary))  # the whole body must be well-formed first
            if not parts:
                raise MultipartError("multipart body has no parts")
            view = memoryview(body)
            try:
                with self.target.session("stow") as session:
                    return [self._store_one(view[start:end], headers, sender, session, study)
                            for headers, start, end in parts]
            finally:
                view.release()

    def _store_one(self, part: memoryview, headers: dict[str, str], sender: Sender, session: str,
                   study: str | None) -> _Item:
        sop_class, sop_instance, part_study = _peek(part)
        content_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if content_type != "application/dicom":
            return _Item(sop_class, sop_instance, CANNOT_UNDERSTAND,
                         f"the part is {content_type}, not application/dicom")
        if study is not None and part_study != study:
            return _Item(sop_class, sop_instance, STUDY_MISMATCH,
                         f"the instance belongs to study {part_study or '(none)'}, not to {study} of the URL")
        if bytes(part[128:132]) != b"DICM" and bytes(part[:2]) == b"\x02\x00":
            # File meta without preamble, as pydicom writes in-memory datasets (dicomweb-client does):
            # give it the 128-byte preamble and prefix of a Part 10 file (PS3.10 7.1).
            part = memoryview(b"\x00" * 128 + b"DICM" + bytes(part))
        result = self.target.store(part, sender, session=session)
        info = getattr(result, "info", None)
        sop_class = getattr(info, "sop_class_uid", None) or sop_class
        sop_instance = getattr(info, "sop_instance_uid", None) or sop_instance
        if result.status != 0:
            log.warning("STOW-RS: instance refused (0x%04X): %s", result.status, result.reason)
            return _Item(sop_class, sop_instance, int(result.status), str(result.reason or ""))
        return _Item(sop_class, sop_instance)
