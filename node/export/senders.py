"""Senders: deliver DICOM instances to one destination — DICOMweb STOW-RS, DICOM C-STORE, a folder.

Each sender answers per instance, so that one refused instance never holds the others back:

* :meth:`send` -> ``{sop_uid: None}`` when stored, or a :class:`Failure` (message, permanent or not);
  it raises :class:`DeliveryError` when the whole batch failed (connection refused, timeout, HTTP 503);
* :meth:`present` -> the SOP Instance UIDs the destination already holds, for deliveries that were in
  flight when the node stopped (the outbox asks before it sends them again; ``None``: cannot tell);
  a STOW-RS request that timed out stays open and is awaited first (:meth:`StowSender.send`);
* :meth:`delete` -> removes instances (Orthanc only: superseded results), see :class:`OrthancAdmin`.

Transient (retried with backoff): connection errors, timeouts, HTTP 408/429/5xx, C-STORE 0xA7xx (out of
resources) and 0x0110/0x0124-type processing failures. Permanent (failed at once, visible on the job,
``segnode outbox retry`` re-arms them): other HTTP 4xx, C-STORE refusals (0xA9xx, 0xCxxx), a rejected
association.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from node.config import Destination
from node.http import http_session, session_for
from node.scu import bound_socket_writes

log = logging.getLogger(__name__)

#: Seconds a STOW-RS request without an answer is kept open before its connection is closed (see
#: :meth:`StowSender.send`): an archive frozen for less than this gets each instance once.
SETTLE_S = 3600.0
#: HTTP statuses worth another attempt.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Item:
    """One DICOM instance to deliver (a file in the outbox)."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: Path


@dataclass(frozen=True)
class Failure:
    message: str
    permanent: bool = False


class DeliveryError(Exception):
    """The whole batch failed; ``permanent`` when trying again cannot help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _NoService(DeliveryError):
    """A DICOM peer that answered the association but accepted none of its presentation contexts."""


class Sender(Protocol):
    def send(self, items: list[Item]) -> dict[str, Failure | None]: ...

    def present(self, items: list[Item]) -> set[str] | None: ...

    def delete(self, sop_uids: list[str]) -> list[str]: ...

    def close(self) -> None: ...


def make_sender(destination: Destination, *, calling_aet: str = "SEGNODE", timeout: float = 60.0) -> Sender:
    if destination.kind == "stowrs":
        return StowSender(destination, timeout=timeout)
    if destination.kind == "cstore":
        return CStoreSender(destination, calling_aet=calling_aet, timeout=timeout)
    return FolderSender(destination)


def _http_failure(exc: Exception) -> DeliveryError:
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        body = (response.text or "").strip().replace("\n", " ")[:200]
        status = response.status_code
        return DeliveryError(
            f"HTTP {status} {response.reason}: {body}".rstrip(": "), permanent=status not in TRANSIENT_HTTP
        )
    return DeliveryError(f"{type(exc).__name__}: {exc}")


# --- DICOMweb STOW-RS -----------------------------------------------------------------------------


#: Bytes per read of a file a STOW-RS body streams. Large: between two chunks the sending thread needs
#: the GIL, which the worker thread holds in long numpy calls while it writes a job's other results
#: beside the delivery (the SEG is sent as soon as it is written); with 1 MB chunks, a 48 MB SEG's
#: STOW-RS took up to twice as long then.
STOW_CHUNK = 16 << 20


class StowSender:
    """STOW-RS (PS3.18 10.5) of the files as they are, and QIDO-RS (dicomweb-client) to ask what the
    destination holds.

    The request body streams each file byte for byte from the outbox, with a Content-Length:
    dicomweb-client's ``store_instances`` takes parsed datasets and encodes them again, and sends
    bodies over 1 MB with chunked transfer encoding; for a 100 MB SEG that costs ~0.5 s and a
    re-encoded copy of what was validated. Both share one session (auth, TLS verification).
    """

    def __init__(self, destination: Destination, timeout: float = 60.0, settle_s: float = SETTLE_S) -> None:
        from dicomweb_client import DICOMwebClient

        if not destination.url:
            raise DeliveryError(f"destination {destination.name}: kind stowrs needs a url", permanent=True)
        self.destination, self.timeout, self.settle_s = destination, timeout, settle_s
        #: Requests not answered within ``timeout``, by the SOP Instance UIDs they carry (see :meth:`send`).
        self._open: dict[str, Future] = {}
        self._open_lock = threading.Lock()
        self.url = destination.url.rstrip("/")
        self.session = session_for(destination)
        self.client = DICOMwebClient(self.url, session=self.session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)
        # dicomweb-client's retry decorator logs every failed request with a traceback at WARNING;
        # the outbox logs one line per failed attempt itself.
        logging.getLogger("retrying").setLevel(logging.ERROR)

    def _post(self, items: list[Item]):
        import uuid

        import pydicom
        import requests

        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"--{boundary}--\r\n".encode()
        sizes = [item.path.stat().st_size for item in items]
        length = sum(len(head) + size + 2 for size in sizes) + len(tail)

        class Body:  # iterable with a length: requests streams it with a Content-Length, not chunked
            def __len__(self) -> int:
                return length

            def __iter__(self):
                for item in items:
                    yield head
                    with open(item.path, "rb") as f:
                        while chunk := f.read(STOW_CHUNK):
                            yield chunk
                    yield b"\r\n"
                yield tail

        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = self.session.post(
                f"{self.url}/studies",
                data=Body(),
                headers=headers,
                timeout=(min(self.timeout, 10.0), max(self.timeout, self.settle_s)),
            )
            if response.status_code not in (200, 202, 409):  # 202/409: some/none stored, the body says which
                response.raise_for_status()
        except (requests.RequestException, OSError) as exc:
            raise _http_failure(exc) from None
        try:
            answer = pydicom.Dataset.from_json(response.json()) if response.content else pydicom.Dataset()
        except ValueError as exc:
            raise DeliveryError(
                f"STOW-RS answered HTTP {response.status_code} with an unreadable body: {exc}"
            )
        warnings = [_warn_text(v) for v in response.headers.get("warning", "").split(", 299 ") if v]
        return response.status_code, answer, warnings

    # A request that gets no answer within ``timeout`` is not abandoned: it stays open in its thread
    # (up to ``settle_s``), because an archive that is frozen, not down, stores it when it wakes up.
    # Until it is settled (answered, or its connection broken), its instances are neither sent again
    # nor looked up (a QIDO-RS would say "not there" and the late request would store a second copy);
    # its late answer is their outcome.

    def _settle(self, items: list[Item]) -> tuple[dict[str, Failure | None], list[Item]]:
        """Outcomes of the instances whose earlier request has settled meanwhile, and the instances
        free to send or look up. Raises :class:`DeliveryError` while such a request is still open."""
        with self._open_lock:
            waiting = {id(f): f for i in items if (f := self._open.get(i.sop_uid)) is not None}
        if not waiting:
            return {}, items
        done, pending = wait(list(waiting.values()), timeout=self.timeout)
        if pending:
            raise DeliveryError(f"an earlier STOW-RS request with these instances has had no answer for "
                                f"over {self.timeout:g} s; they are not sent or looked up again until it "
                                "is settled")
        outcomes: dict[str, Failure | None] = {}
        with self._open_lock:
            for future in done:
                uids = [uid for uid, f in self._open.items() if f is future]
                for uid in uids:
                    del self._open[uid]
                try:
                    outcomes.update({u: r for u, r in future.result().items() if u in uids})
                except DeliveryError as exc:  # its connection broke or it failed: no outcome, look again
                    log.info("outbox: a late STOW-RS request to %s settled: %s", self.destination.name, exc)
        return outcomes, [i for i in items if i.sop_uid not in outcomes]

    def send(self, items: list[Item]) -> dict[str, Failure | None]:
        settled, items = self._settle(items)
        if not items:
            return settled
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self._send_now(items))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=contextvars.copy_context().run, args=(run,),  # log lines keep the job id
                         name=f"segnode-stow-{self.destination.name}", daemon=True).start()
        try:
            return {**settled, **future.result(timeout=self.timeout)}
        except FutureTimeout:
            with self._open_lock:
                self._open.update({i.sop_uid: future for i in items})
            raise DeliveryError(f"no answer within {self.timeout:g} s; the request stays open and is awaited "
                                "before these instances are sent or looked up again") from None

    def _send_now(self, items: list[Item]) -> dict[str, Failure | None]:
        status, answer, warnings = self._post(items)
        failed: dict[str, Failure] = {}
        for entry in answer.get("FailedSOPSequence", []) or []:
            uid = str(entry.get("ReferencedSOPInstanceUID", ""))
            reason = int(entry.get("FailureReason", 0x0110) or 0x0110)
            said = next((w for w in warnings if uid and uid in w), "")
            failed[uid] = Failure(
                f"STOW-RS failure reason 0x{reason:04X}" + (f" ({said})" if said else ""),
                permanent=not _transient_status(reason),
            )
        stored = {
            str(e.get("ReferencedSOPInstanceUID", "")) for e in answer.get("ReferencedSOPSequence", []) or []
        }
        unlisted = Failure(f"STOW-RS answered HTTP {status} without this instance among the stored ones")
        # 200: all stored unless listed as failed; 202/409: only those listed as stored.
        return {
            item.sop_uid: failed.get(item.sop_uid)
            or (None if status == 200 or item.sop_uid in stored else unlisted)
            for item in items
        }

    def present(self, items: list[Item]) -> set[str] | None:
        import requests

        settled, items = self._settle(items)  # a late answer tells, without a QIDO-RS
        found: set[str] = {uid for uid, failure in settled.items() if failure is None}
        try:
            for item in items:
                hits = self.client.search_for_instances(
                    study_instance_uid=item.study_uid, search_filters={"SOPInstanceUID": item.sop_uid}
                )
                if any(h.get("00080018", {}).get("Value", [None])[0] == item.sop_uid for h in hits):
                    found.add(item.sop_uid)
        except (requests.RequestException, OSError) as exc:
            raise _http_failure(exc) from None
        return found

    def delete(self, sop_uids: list[str]) -> list[str]:
        return OrthancAdmin.for_destination(self.destination).delete_instances(sop_uids)

    def close(self) -> None:
        self.client._session.close()


def _warn_text(value: str) -> str:
    """The text of one RFC 7234 Warning value (``299 agent "text"``), unquoted; the value if not so."""
    match = re.search(r'"((?:[^"\\]|\\.)*)"', value)
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else value.strip()


def _transient_status(status: int) -> bool:
    """C-STORE / STOW-RS failure statuses worth another attempt: out of resources, processing failure."""
    return (status & 0xFF00) == 0xA700 or status == 0x0110


# --- DICOM C-STORE --------------------------------------------------------------------------------

#: C-STORE statuses that mean stored (success and the warnings of PS3.4 B.2.3).
_STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class CStoreSender:
    """C-STORE with pynetdicom: one association per batch, a presentation context per SOP class and
    transfer syntax of the files (plus Explicit/Implicit VR Little Endian for uncompressed ones)."""

    def __init__(
        self, destination: Destination, *, calling_aet: str = "SEGNODE", timeout: float = 60.0
    ) -> None:
        if not (destination.host and destination.ae_title):
            raise DeliveryError(
                f"destination {destination.name}: kind cstore needs host and ae_title", permanent=True
            )
        self.destination, self.calling_aet, self.timeout = destination, calling_aet, timeout

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        return ae

    def _associate(self, ae):
        d = self.destination
        try:
            assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        except Exception as exc:  # socket errors surface here on some platforms
            raise DeliveryError(f"cannot connect to {d.host}:{d.port}: {exc}") from None
        if assoc.is_established:
            bound_socket_writes(assoc, self.timeout)
            return assoc
        if assoc.is_rejected:
            raise DeliveryError(
                f"association rejected by {d.ae_title}@{d.host}:{d.port} (check the AE titles)",
                permanent=True,
            )
        if assoc.rejected_contexts:  # the peer answered, accepting none of the services asked for
            raise _NoService(f"{d.ae_title}@{d.host}:{d.port} accepted none of the presentation contexts")
        raise DeliveryError(
            f"no association with {d.ae_title}@{d.host}:{d.port} (refused, aborted or timed out)"
        )

    def send(self, items: list[Item]) -> dict[str, Failure | None]:
        from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ae = self._ae()
        contexts: dict[str, set[str]] = {}
        for item in items:
            syntaxes = contexts.setdefault(item.sop_class_uid, set())
            syntaxes.add(item.transfer_syntax)
            if not UID(item.transfer_syntax).is_compressed:
                syntaxes.update({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        if len(contexts) > 128:
            raise DeliveryError(f"{len(contexts)} SOP classes in one batch (at most 128)", permanent=True)
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        assoc = self._associate(ae)
        results: dict[str, Failure | None] = {}
        try:
            for item in items:
                if not assoc.is_established:
                    results[item.sop_uid] = Failure("association lost")
                    continue
                try:
                    status = assoc.send_c_store(item.path)
                except (ValueError, RuntimeError) as exc:  # no accepted context for the file
                    results[item.sop_uid] = Failure(f"{exc}", permanent=True)
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in _STORED:
                    results[item.sop_uid] = None
                elif code == -1:
                    results[item.sop_uid] = Failure("no C-STORE response (connection lost or timed out)")
                else:
                    comment = str(getattr(status, "ErrorComment", "") or "")
                    results[item.sop_uid] = Failure(
                        f"C-STORE status 0x{code:04X}{': ' + comment if comment else ''}",
                        permanent=not _transient_status(code),
                    )
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def present(self, items: list[Item]) -> set[str] | None:
        """Asks with C-FIND (Study Root, IMAGE level); None when the peer offers no query service."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        try:
            assoc = self._associate(ae)
        except _NoService:  # a C-STORE-only peer (dcmtk storescp, many PACS): we cannot tell
            return None
        found: set[str] = set()
        try:
            for item in items:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID, query.SeriesInstanceUID = item.study_uid, item.series_uid
                query.SOPInstanceUID = item.sop_uid
                try:
                    for status, identifier in assoc.send_c_find(
                        query, StudyRootQueryRetrieveInformationModelFind
                    ):
                        pending = status and status.Status in (0xFF00, 0xFF01) and identifier is not None
                        if pending and str(identifier.get("SOPInstanceUID", "")) == item.sop_uid:
                            found.add(item.sop_uid)
                except (ValueError, RuntimeError):  # C-FIND not accepted: we cannot tell
                    return None
        finally:
            if assoc.is_established:
                assoc.release()
        return found

    def delete(self, sop_uids: list[str]) -> list[str]:
        return OrthancAdmin.for_destination(self.destination).delete_instances(sop_uids)

    def close(self) -> None:
        pass


# --- a folder -------------------------------------------------------------------------------------


class FolderSender:
    """Copies each instance to ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (temporary name,
    fsync, rename: a file there is whole). Sending the same instance again replaces it."""

    def __init__(self, destination: Destination) -> None:
        if destination.path is None:
            raise DeliveryError(f"destination {destination.name}: kind folder needs a path", permanent=True)
        self.root = Path(destination.path)

    def _target(self, item: Item) -> Path:
        return self.root / item.study_uid / item.series_uid / f"{item.sop_uid}.dcm"

    def send(self, items: list[Item]) -> dict[str, Failure | None]:
        results: dict[str, Failure | None] = {}
        for item in items:
            target = self._target(item)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as out, open(item.path, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                _fsync_dir(target.parent)
                results[item.sop_uid] = None
            except OSError as exc:
                results[item.sop_uid] = Failure(f"{type(exc).__name__}: {exc}")
        return results

    def present(self, items: list[Item]) -> set[str] | None:
        return {
            item.sop_uid
            for item in items
            if self._target(item).is_file() and self._target(item).stat().st_size == item.path.stat().st_size
        }

    def delete(self, sop_uids: list[str]) -> list[str]:
        raise DeliveryError("a folder destination does not delete superseded results", permanent=True)

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Orthanc's REST API (superseded results) ------------------------------------------------------


class OrthancAdmin:
    """Finds instances by SOP Instance UID (``POST /tools/lookup``) and deletes them
    (``DELETE /instances/{id}``), through orthanc-api-client."""

    def __init__(
        self,
        url: str,
        *,
        username: str = "",
        password: str = "",
        token: str = "",
        verify_tls: bool = True,
        ca_bundle: Path | None = None,
    ) -> None:
        from orthanc_api_client import OrthancApiClient

        self.client = OrthancApiClient(
            url.rstrip("/") + "/", user=username or None, pwd=password or None, api_token=token or None
        )
        # Our session: the same auth, and TLS settings that REQUESTS_CA_BUNDLE cannot override.
        self.client._http_session = http_session(username, password, token, verify_tls, ca_bundle)

    @classmethod
    def for_destination(cls, destination: Destination) -> OrthancAdmin:
        return cls(
            orthanc_root(destination),
            username=destination.username,
            password=destination.password.get_secret_value(),
            token=destination.token.get_secret_value(),
            verify_tls=destination.verify_tls,
            ca_bundle=destination.ca_bundle,
        )

    def delete_instances(self, sop_uids: Iterable[str]) -> list[str]:
        """Deletes the instances Orthanc holds; returns the SOP Instance UIDs it deleted."""
        deleted = []
        for uid in sop_uids:
            orthanc_id = self.client.instances.lookup(uid)
            if orthanc_id:
                self.client.instances.delete(orthanc_id=orthanc_id)
                deleted.append(uid)
        return deleted


def orthanc_root(destination: Destination) -> str:
    """Orthanc's REST root for a destination: ``orthanc_url``, else ``url`` less its DICOMweb path."""
    if destination.orthanc_url:
        return destination.orthanc_url.rstrip("/")
    if destination.kind != "stowrs" or not destination.url:
        raise DeliveryError(
            f"destination {destination.name}: delete_superseded needs orthanc_url", permanent=True
        )
    parsed = urlparse(destination.url.rstrip("/"))
    path = parsed.path
    for suffix in ("/dicom-web", "/dicomweb", "/dicom-web/studies"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return parsed._replace(path=path).geturl()
