"""The DICOM listener: a pynetdicom SCP for Verification (C-ECHO) and every Storage SOP class (C-STORE).

PS3.4 Annex A (Verification) and Annex B (Storage); PS3.7 9.1.1 (C-STORE); PS3.8 (association).

* Any storage SOP class, with uncompressed and compressed transfer syntaxes accepted as they are:
  the bytes are stored as sent, only a few header tags are read (:mod:`node.ingest.instance`).
* Unknown senders are refused at association with an A-ASSOCIATE-RJ (PS3.8 7.1.1.9): calling AE
  titles not in ``allowed_calling_aets`` (rejected-permanent, calling-AE-title-not-recognized) and
  addresses outside ``allowed_sources`` (rejected-permanent, no-reason-given).
* The success status goes back only once the instance is fsynced into the spool; a bad instance gets
  a failure status (0xA700, 0xA900, 0xC000, 0xC010) and the association goes on.
* Speed: Nagle off on every connection, no PDU size limit, and pynetdicom's 1 ms polling loops
  replaced by event-driven waits (:mod:`node.ingest.reactor`, ``[dicom] event_driven_waits``).

Start it with a callback for complete series::

    listener = start_listener(settings, on_series_ready=router.submit)   # serves in threads
    ...
    listener.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from node.config import DicomSection, Settings
from node.ingest import SeriesReady, Sender, reactor
from node.ingest.instance import Status
from node.ingest.receiver import Receiver

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_sources(sources: list[str]) -> list[Network]:
    """``allowed_sources`` as networks: addresses (``10.1.2.3``) or CIDR blocks (``10.1.0.0/16``)."""
    try:
        return [ipaddress.ip_network(s.strip(), strict=False) for s in sources]
    except ValueError as exc:
        raise ValueError(f"[dicom] allowed_sources: {exc}") from None


def source_allowed(address: str, allowed: list[Network]) -> bool:
    """True when ``allowed`` is empty or holds ``address`` (an IPv4-mapped IPv6 address counts as IPv4)."""
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allowed)


# --- event handlers (pynetdicom style: plain functions, extra arguments bound at start) ----------


def _sender(assoc: Association) -> Sender:
    return Sender("dimse", str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address))


def _who(assoc: Association) -> str:
    return f"{str(assoc.requestor.ae_title).strip()}@{assoc.requestor.address}"


def handle_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN: turn off Nagle's algorithm. pynetdicom writes a PDU header and its data in
    separate sends; with Nagle each C-STORE waits for a delayed ACK (~40 ms)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def handle_requested(event: evt.Event, allowed: list[Network]) -> None:
    """EVT_REQUESTED: refuse an address outside ``allowed_sources`` before negotiation."""
    assoc = event.assoc
    address = str(assoc.requestor.address)
    if not source_allowed(address, allowed):
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        log.warning("association from %s@%s rejected: source address not allowed", calling, address)
        # rejected-permanent, DICOM UL service-user, no-reason-given (PS3.8 Table 9-21); then, as
        # pynetdicom's own rejections do, wait for the DUL to send it and the peer to close.
        assoc.acse.send_reject(0x01, 0x01, 0x01)
        assoc.kill()


def handle_rejected(event: evt.Event) -> None:
    log.warning("association from %s rejected", _who(event.assoc))


def handle_accepted(event: evt.Event) -> None:
    log.info("association from %s accepted", _who(event.assoc))


def _session(assoc: Association, receiver: Receiver) -> str:
    session = getattr(assoc, "segnode_session", None)
    if session is None:
        session = assoc.segnode_session = receiver.new_session("dimse")  # type: ignore[attr-defined]
    return session


def _status(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment.replace("\\", "/")[:64]  # LO: at most 64 characters, no backslash
    return rsp


def handle_store(event: evt.Event, receiver: Receiver) -> int | Dataset:
    """EVT_C_STORE: write the dataset as received into the spool, then answer (PS3.4 B.2.3)."""
    assoc, request = event.assoc, event.request
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    try:
        result = receiver.store(
            request.DataSet.getvalue(),
            _sender(assoc),
            session=_session(assoc, receiver),
            transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=sop_instance,
        )
    except Exception as exc:  # a bug here must cost one instance, never the association
        log.exception("C-STORE from %s: unexpected failure", _who(assoc))
        return _status(Status.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
    if result.ok:
        log.debug("stored %s of series %s from %s", sop_instance, result.info.series_uid, _who(assoc))
        return Status.SUCCESS
    series = result.info.series_uid if result.info else "?"
    log.warning(
        "C-STORE from %s refused with 0x%04X (series %s, instance %r): %s",
        _who(assoc), result.status, series, sop_instance[:64], result.reason,
    )  # fmt: skip
    return _status(result.status, result.reason)


def _end(event: evt.Event, receiver: Receiver, clean: bool) -> None:
    assoc = event.assoc
    session = getattr(assoc, "segnode_session", None)
    if session is None or getattr(assoc, "segnode_ended", False):
        return
    assoc.segnode_ended = True  # type: ignore[attr-defined]
    try:
        receiver.end_session(session, clean=clean)
    except Exception:
        log.exception("completion check failed after association from %s", _who(assoc))


def handle_released(event: evt.Event, receiver: Receiver) -> None:
    """EVT_RELEASED: the sender says it is done; its series may be complete now."""
    log.info("association from %s released", _who(event.assoc))
    _end(event, receiver, clean=True)


def handle_aborted(event: evt.Event, receiver: Receiver) -> None:
    """EVT_ABORTED: the transfer was cut; its series complete only by the quiet period."""
    log.warning("association from %s aborted", _who(event.assoc))
    _end(event, receiver, clean=False)


# No EVT_CONN_CLOSE handler: the peer may close right after our A-RELEASE-RP, before the reactor
# fires EVT_RELEASED. A connection lost without either event leaves its series to the quiet period.


# --- the listener ------------------------------------------------------------------------------


def tls_context(config: DicomSection) -> ssl.SSLContext | None:
    """A server TLS context from ``tls_cert``/``tls_key`` (PS3.15 B.1), or None when both are unset."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("[dicom] tls_cert and tls_key must be given together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def build_ae(config: DicomSection) -> AE:
    """The application entity: our AE title, every storage SOP class with every transfer syntax."""
    ae = AE(ae_title=config.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    ae.require_calling_aet = list(config.allowed_calling_aets)
    ae.maximum_associations = config.max_associations
    # 0 = no limit on what a sender may put in one PDU: fewer, larger reads are faster (PS3.8 D.1).
    ae.maximum_pdu_size = config.max_pdu
    return ae


class Listener:
    """The C-STORE/C-ECHO SCP in background threads, feeding a :class:`Receiver`."""

    def __init__(self, config: DicomSection, receiver: Receiver, *, port: int | None = None) -> None:
        self.config = config
        self.receiver = receiver
        self.allowed_sources = parse_sources(config.allowed_sources)
        self.ssl_context = tls_context(config)
        self.ae = build_ae(config)
        self._port = config.port if port is None else port
        self._server: Any = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when started with port 0)."""
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> Listener:
        if self.config.event_driven_waits:
            reactor.install()
        if logging.getLogger("pynetdicom").level == logging.NOTSET:
            logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # ours say what matters, without PHI
        r = self.receiver
        handlers = [
            (evt.EVT_CONN_OPEN, handle_open),
            (evt.EVT_REQUESTED, handle_requested, [self.allowed_sources]),
            (evt.EVT_REJECTED, handle_rejected),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_C_STORE, handle_store, [r]),
            (evt.EVT_RELEASED, handle_released, [r]),
            (evt.EVT_ABORTED, handle_aborted, [r]),
        ]
        self._server = self.ae.start_server(
            (self.config.host, self._port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        log.info(
            "DICOM listener %s on %s:%d%s", self.config.ae_title, self.config.host, self.port,
            " (TLS)" if self.ssl_context else "",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Listener:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_listener(
    settings: Settings,
    on_series_ready: Callable[[SeriesReady], None] | None = None,
    *,
    receiver: Receiver | None = None,
    port: int | None = None,
) -> Listener:
    """Start the receiver (if not given) and the listener; ``listener.stop()`` and
    ``listener.receiver.close()`` end them."""
    if receiver is None:
        receiver = Receiver.from_settings(settings, on_series_ready)
        receiver.start()
    return Listener(settings.dicom, receiver, port=port).start()


def serve_forever(listener: Listener, stop: threading.Event) -> None:
    """Block until ``stop`` is set, then stop the listener and its receiver."""
    try:
        stop.wait()
    finally:
        listener.stop()
        listener.receiver.close()
