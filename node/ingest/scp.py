"""The DICOM listener: segnode's own Upper Layer server for Verification (C-ECHO) and Storage (C-STORE).

PS3.4 Annex A (Verification) and Annex B (Storage); PS3.7 9.1.1 and 9.3.1 (C-STORE), 9.1.5 and 9.3.5
(C-ECHO); PS3.8 (association, PDUs, state machine).

* One thread per connection. The hot path is ours: PDU and PDV headers are parsed as they arrive
  (:mod:`node.ingest.ul`), the command set is read and answered by hand (:mod:`node.ingest.dimse`)
  and the data set is received into one reused buffer and handed to :meth:`Receiver.store` as it is.
  Negotiation uses pynetdicom's PDU classes and rules (:mod:`node.ingest.acse`).
* Any storage SOP class, with uncompressed and compressed transfer syntaxes accepted as they are:
  the bytes are stored as sent, only a few header tags are read (:mod:`node.ingest.instance`).
* Unknown senders are refused at association with an A-ASSOCIATE-RJ (PS3.8 7.1.1.9, Table 9-21):
  addresses outside ``allowed_sources`` (rejected-permanent, no-reason-given), calling AE titles not
  in ``allowed_calling_aets`` (calling-AE-title-not-recognized), another called AE title when
  ``require_called_aet`` (called-AE-title-not-recognized), and more than ``max_associations`` at
  once (rejected-transient, local-limit-exceeded).
* The success status goes back only once the instance is durable in the spool; a bad instance gets
  a failure status (0xA700, 0xA900, 0xC000, 0xC010) and the association goes on. Other requests
  (C-FIND, C-MOVE, N-*) get 0x0211 (unrecognized operation), and the association goes on too.
* A PDU that breaks the protocol gets an A-ABORT (PS3.8 Table 9-26) and its connection is closed; an
  error in one association never reaches another. A connection silent for ``network_timeout``
  seconds is aborted.

Start it with a callback for complete series::

    listener = start_listener(settings, on_series_ready=router.submit)   # serves in threads
    ...
    listener.stop()
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Self

from node.config import DicomSection, Settings
from node.ingest import Sender, SeriesReady, dimse, ul
from node.ingest.acse import (
    LOCAL_LIMIT_EXCEEDED,
    NO_REASON,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_PRESENTATION,
    SOURCE_USER,
    Acceptor,
    Rejection,
    Request,
    decode_request,
)
from node.ingest.instance import Status
from node.ingest.receiver import Receiver
from node.ingest.spool import StoreResult, TempFile

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The longest A-ASSOCIATE-RQ read (128 contexts x 45 transfer syntaxes is ~0.3 MiB).
MAX_REQUEST_PDU = 4 << 20
#: The longest command set (a C-STORE-RQ is ~200 bytes).
MAX_COMMAND_SET = 64 << 10
#: How long to wait for the peer to close after our A-RELEASE-RP, A-ASSOCIATE-RJ or A-ABORT (ARTIM).
CLOSE_WAIT_SECONDS = 5.0
#: Connections beyond ``max_associations`` that may still be read (to be answered with a rejection).
EXTRA_CONNECTIONS = 8

_names = {ul.A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", ul.A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
          ul.A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", ul.A_RELEASE_RP: "A-RELEASE-RP"}  # fmt: skip


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


def tls_context(config: DicomSection) -> ssl.SSLContext | None:
    """A server TLS context from ``tls_cert``/``tls_key`` (PS3.15 B.1), or None when both are unset."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("[dicom] tls_cert and tls_key must be given together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class Association:
    """One connection, served in its own thread: negotiation, then C-STORE/C-ECHO until it ends."""

    def __init__(self, listener: Listener, sock: socket.socket, address: str) -> None:
        self.listener = listener
        self.receiver = listener.receiver
        self.sock = sock
        self.address = address
        self.calling_aet = "?"
        self.sender = Sender("dimse", "", address)
        #: Holds one of the listener's ``max_associations`` places.
        self.counted = False
        self._session: str | None = None
        self._contexts: dict[int, tuple[str, str]] = {}
        self._peer_max_pdu = 0
        # The message being received: its command set fragments, then its data set.
        self._command_bytes = b""
        self._command_context = 0
        self._command: dimse.Command | None = None
        self._data = bytearray(1 << 20)  # reused for every data set: store() only reads it during the call
        self._data_len = 0
        #: A temporary file made while waiting for the next instance, in the last instance's folder.
        self._spare: TempFile | None = None

    @property
    def who(self) -> str:
        return f"{self.calling_aet}@{self.address}"

    # --- life cycle ------------------------------------------------------------------------------

    def run(self) -> None:
        """The thread's body: never raises; always closes the connection and ends the session."""
        try:
            self._run()
        except ul.ProtocolError as exc:
            log.warning("association from %s aborted: %s", self.who, exc)
            self._send_and_close(ul.abort_pdu(exc.reason))
        except TimeoutError:
            silent = self.listener.config.network_timeout
            if self._contexts or self._command_bytes:  # an association: abort it (PS3.8 AA-1)
                log.warning("association from %s aborted: silent for %g s", self.who, silent)
                self._send_and_close(ul.abort_pdu(ul.REASON_NOT_SPECIFIED))
            else:  # no A-ASSOCIATE-RQ came: ARTIM expired, just close (PS3.8 Sta2, AA-2)
                log.warning("connection from %s closed: no association request in %g s", self.address, silent)
        except (ul.PeerClosed, OSError) as exc:
            if not self.listener.stopping:
                log.warning("association from %s: connection lost (%s)", self.who, exc)
        except Exception:  # a bug here must cost this association only
            log.exception("association from %s: internal error, aborting it", self.who)
            self._send_and_close(ul.abort_pdu(ul.REASON_NOT_SPECIFIED))
        finally:
            self._close()
            self.listener._finished(self)
            self._discard_spare()
            self._end(clean=False)

    def _run(self) -> None:
        config = self.listener.config
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers go out at once
        self.sock.settimeout(config.network_timeout)
        if self.listener.ssl_context is not None:
            try:
                self.sock = self.listener.ssl_context.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("connection from %s: TLS handshake failed: %s", self.address, exc)
                return
        reader = ul.Reader(self.sock)
        if not self._negotiate(reader):
            return
        self._serve(reader)

    def _negotiate(self, reader: ul.Reader) -> bool:
        """Read the A-ASSOCIATE-RQ and answer it (PS3.8 9.3.2-9.3.4); True when accepted."""
        pdu_type, length = reader.pdu_header()
        if pdu_type != ul.A_ASSOCIATE_RQ:
            if pdu_type == ul.A_ABORT_PDU:
                return False  # PS3.8 AA-2: just close
            reason = ul.UNEXPECTED_PDU if pdu_type in ul.KNOWN_PDU_TYPES else ul.UNRECOGNIZED_PDU
            raise ul.ProtocolError(reason, f"PDU type 0x{pdu_type:02X} where an A-ASSOCIATE-RQ was expected")
        if length > MAX_REQUEST_PDU:
            raise ul.ProtocolError(ul.INVALID_PDU_PARAMETER_VALUE, f"A-ASSOCIATE-RQ of {length} bytes")
        request = decode_request(struct.pack(">BxI", pdu_type, length) + reader.read(length))
        self.calling_aet = request.calling_aet
        rejection = self.listener._admit(self, request)
        if rejection is not None:
            log.warning("association from %s rejected: %s", self.who, rejection.why)
            self._send_and_close(rejection.pdu())
            return False
        accepted = self.listener.acceptor.accept(request)
        self._contexts = accepted.contexts
        self._peer_max_pdu = accepted.peer_max_pdu
        self.sender = Sender("dimse", self.calling_aet, self.address)
        self.sock.sendall(accepted.pdu)
        log.info("association from %s accepted", self.who)
        return True

    def _serve(self, reader: ul.Reader) -> None:
        """PDUs until the association ends (PS3.8 Table 9-10, state Sta6)."""
        while True:
            pdu_type, length = reader.pdu_header()
            if pdu_type == ul.P_DATA_TF:
                self._p_data(reader, length)
                continue
            if pdu_type not in (ul.A_RELEASE_RQ, ul.A_ABORT_PDU):
                if pdu_type in ul.KNOWN_PDU_TYPES:
                    raise ul.ProtocolError(ul.UNEXPECTED_PDU, f"unexpected {_names[pdu_type]}")
                raise ul.ProtocolError(ul.UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}")
            if length != 4:  # both carry four reserved bytes (PS3.8 9.3.6, 9.3.8)
                raise ul.ProtocolError(
                    ul.INVALID_PDU_PARAMETER_VALUE, f"PDU type 0x{pdu_type:02X} of {length} bytes"
                )
            reader.skip(length)
            if pdu_type == ul.A_ABORT_PDU:
                log.warning("association from %s aborted", self.who)
                return
            self.sock.sendall(ul.RELEASE_RP)
            log.info("association from %s released", self.who)
            self._end(clean=True)
            self._wait_for_close()
            return

    def _end(self, *, clean: bool) -> None:
        """Tell completion the session is over (once): released (``clean``), or aborted/lost."""
        session, self._session = self._session, None
        if session is None:
            return
        try:
            self.receiver.end_session(session, clean=clean)
        except Exception:
            log.exception("completion check failed after association from %s", self.who)

    # --- P-DATA ----------------------------------------------------------------------------------

    def _p_data(self, reader: ul.Reader, length: int) -> None:
        """The PDVs of one P-DATA-TF (PS3.8 9.3.5): command and data set fragments (Annex E)."""
        remaining = length
        while remaining:
            if remaining < 6:
                raise ul.ProtocolError(
                    ul.INVALID_PDU_PARAMETER_VALUE, "P-DATA-TF ends inside a PDV item header"
                )
            item_length, context_id, control = reader.pdv_header()
            size = item_length - 2
            remaining -= 4 + item_length
            if size < 0 or remaining < 0:
                raise ul.ProtocolError(
                    ul.INVALID_PDU_PARAMETER_VALUE, f"PDV item length {item_length} is invalid"
                )
            if context_id not in self._contexts:
                raise ul.ProtocolError(ul.INVALID_PDU_PARAMETER_VALUE,
                                       f"presentation context {context_id} was not accepted")  # fmt: skip
            if control & ul.COMMAND:
                self._command_fragment(reader, context_id, size, control & ul.LAST)
            else:
                self._data_fragment(reader, context_id, size, control & ul.LAST)

    def _command_fragment(self, reader: ul.Reader, context_id: int, size: int, last: int) -> None:
        if self._command is not None:
            raise ul.ProtocolError(
                ul.UNEXPECTED_PDU_PARAMETER, "a command fragment where data set fragments were due"
            )
        if self._command_bytes and context_id != self._command_context:
            raise ul.ProtocolError(
                ul.UNEXPECTED_PDU_PARAMETER, "command fragments in two presentation contexts"
            )
        if len(self._command_bytes) + size > MAX_COMMAND_SET:
            raise ul.ProtocolError(ul.INVALID_PDU_PARAMETER_VALUE, "command set longer than 64 KiB")
        self._command_bytes += reader.read(size)
        self._command_context = context_id
        if not last:
            return
        try:
            command = dimse.decode_command(self._command_bytes)
        except dimse.CommandError as exc:
            raise ul.ProtocolError(ul.INVALID_PDU_PARAMETER_VALUE, str(exc)) from None
        self._command_bytes = b""
        if command.has_dataset:
            self._command, self._data_len = command, 0
        else:
            self._dispatch(command, context_id, None)

    def _data_fragment(self, reader: ul.Reader, context_id: int, size: int, last: int) -> None:
        command = self._command
        if command is None or context_id != self._command_context:
            raise ul.ProtocolError(ul.UNEXPECTED_PDU_PARAMETER, "a data set fragment without its command")
        end = self._data_len + size
        if end > len(self._data):  # a bigger instance than any before: a bigger buffer, kept
            grown = bytearray(max(end, 2 * len(self._data)))
            grown[: self._data_len] = memoryview(self._data)[: self._data_len]
            self._data = grown
        reader.read_into(memoryview(self._data)[self._data_len : end])
        self._data_len = end
        if last:
            self._command = None
            self._dispatch(command, context_id, memoryview(self._data)[:end])

    # --- DIMSE -----------------------------------------------------------------------------------

    def _dispatch(self, command: dimse.Command, context_id: int, data: memoryview | None) -> None:
        """Answer one request (PS3.7 9.3): C-STORE and C-ECHO; anything else gets a failure status."""
        field = command.command_field
        if field == dimse.C_CANCEL_RQ:
            return  # nothing of ours runs long enough to be cancelled; C-CANCEL has no response
        if field & dimse.RESPONSE:
            log.warning("association from %s: ignored a DIMSE response (0x%04X) to a request never sent",
                        self.who, field)  # fmt: skip
            return
        abstract_syntax, transfer_syntax = self._contexts[context_id]
        if field == dimse.C_STORE_RQ and command.sop_class_uid == abstract_syntax and data is not None:
            self._store(command, context_id, transfer_syntax, data)
            return
        comment = ""
        if field not in (dimse.C_STORE_RQ, dimse.C_ECHO_RQ):
            status, comment = dimse.UNRECOGNIZED_OPERATION, "only C-STORE and C-ECHO are served here"
            log.warning("association from %s: request 0x%04X refused (not served)", self.who, field)
        elif command.sop_class_uid != abstract_syntax:
            status = dimse.SOP_CLASS_NOT_SUPPORTED
            comment = "SOP class is not the presentation context's abstract syntax"
        elif field == dimse.C_ECHO_RQ:
            status = dimse.SUCCESS
        else:
            status, comment = Status.CANNOT_UNDERSTAND, "C-STORE-RQ without a data set"
        self._respond(command, context_id, status, comment)

    def _respond(self, command: dimse.Command, context_id: int, status: int, comment: str = "") -> None:
        """Send the response to ``command`` (PS3.7 9.3.1.2, 9.3.5.2), in PDUs the peer accepts."""
        field = command.command_field
        response = dimse.encode_response(
            field | dimse.RESPONSE, command.message_id, status, command.sop_class_uid,
            command.sop_instance_uid if field != dimse.C_ECHO_RQ else "", comment,
        )  # fmt: skip
        self.sock.sendall(
            b"".join(ul.p_data_tf(context_id, response, command=True, max_pdu=self._peer_max_pdu))
        )

    def _store(self, command: dimse.Command, context_id: int, transfer_syntax: str, data: memoryview) -> None:
        """Write the data set as received into the spool and answer (PS3.4 B.2.3).

        Success is answered from ``on_durable``: once the instance is durable (its journal record
        flushed, or its file and folder fsynced), while the spool file, the spool index and series
        completion are written; the sender's next instance is on its way meanwhile. Then the next temporary file is made in the same folder, still before the next
        instance has arrived.
        """
        if self._session is None:
            self._session = self.receiver.new_session("dimse")
        sop_instance = command.sop_instance_uid
        sent: list[OSError | None] = []

        def acknowledge(_: StoreResult) -> None:
            try:
                self._respond(command, context_id, Status.SUCCESS)
                sent.append(None)
            except OSError as exc:  # raised again below, after the index is written
                sent.append(exc)

        reserved, self._spare = self._spare, None  # store() uses it or deletes it
        try:
            result = self.receiver.store(
                data,
                self.sender,
                session=self._session,
                transfer_syntax=transfer_syntax,
                sop_class_uid=command.sop_class_uid,
                sop_instance_uid=sop_instance,
                reserved=reserved,
                on_durable=acknowledge,
            )
        except Exception as exc:  # a bug here must cost one instance, never the association
            log.exception("C-STORE from %s: unexpected failure", self.who)
            if not sent:
                self._respond(
                    command, context_id, Status.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
                )
            return
        if sent and sent[0] is not None:
            raise sent[0]  # the connection failed while answering
        if result.ok:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("stored %s of series %s from %s", sop_instance, result.info.series_uid, self.who)
            if not sent:  # (a receiver that never calls on_durable)
                self._respond(command, context_id, Status.SUCCESS)
            self._spare = self.receiver.reserve(result.info.study_uid, result.info.series_uid)
            return
        series = result.info.series_uid if result.info else "?"
        log.warning(
            "C-STORE from %s refused with 0x%04X (series %s, instance %r): %s",
            self.who, result.status, series, sop_instance[:64], result.reason,
        )  # fmt: skip
        if not sent:
            self._respond(command, context_id, result.status, result.reason)
        else:  # durable and acknowledged, but not indexed: reconcile() adds it at the next start
            log.error(
                "C-STORE from %s: instance %r acknowledged but not indexed", self.who, sop_instance[:64]
            )

    def _discard_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                spare.discard()
            except OSError:
                pass

    # --- closing ---------------------------------------------------------------------------------

    def _send_and_close(self, pdu: bytes) -> None:
        """Send a last PDU (A-ABORT, A-ASSOCIATE-RJ), then wait briefly for the peer to close."""
        try:
            self.sock.sendall(pdu)
        except OSError:
            return
        self._wait_for_close()

    def _wait_for_close(self) -> None:
        """After our last PDU the peer closes the connection (PS3.8 Sta13); read and drop anything it
        still sends until then, so that closing never resets the connection under our last PDU."""
        try:
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + CLOSE_WAIT_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    return
        except OSError:
            pass

    def _close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def interrupt(self) -> None:
        """From another thread (listener stop): wake the association's blocking read; it then ends."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
        except OSError:
            pass


class Listener:
    """The C-STORE/C-ECHO SCP in background threads, feeding a :class:`Receiver`."""

    def __init__(self, config: DicomSection, receiver: Receiver, *, port: int | None = None) -> None:
        self.config = config
        self.receiver = receiver
        self.allowed_sources = parse_sources(config.allowed_sources)
        self.ssl_context = tls_context(config)
        self.acceptor = Acceptor(config)
        self.stopping = False
        self._port = config.port if port is None else port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: dict[Association, threading.Thread] = {}
        self._counted = 0
        self._ids = itertools.count(1)

    @property
    def port(self) -> int:
        """The port listened on (the real one when started with port 0)."""
        return self._sock.getsockname()[1] if self._sock else self._port

    def start(self) -> Listener:
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, self._port), family=family, backlog=128)
        self._sock.setblocking(False)
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()  # stop() writes to wake the accept loop
        self._thread = threading.Thread(target=self._accept_loop, name="segnode-dicom-listener", daemon=True)
        self._thread.start()
        log.info(
            "DICOM listener %s on %s:%d%s", self.config.ae_title, host, self.port,
            " (TLS)" if self.ssl_context else "",
        )  # fmt: skip
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping:
                selector.select()
                if self.stopping:
                    return
                try:
                    conn, address = self._sock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # e.g. out of file descriptors: try again shortly
                    log.warning("DICOM listener: accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                self._start_association(conn, str(address[0]))

    def _start_association(self, conn: socket.socket, address: str) -> None:
        conn.setblocking(True)
        with self._lock:
            if len(self._connections) >= self.config.max_associations + EXTRA_CONNECTIONS:
                log.warning("connection from %s closed: too many connections", address)
                conn.close()
                return
            association = Association(self, conn, address)
            thread = threading.Thread(
                target=association.run, name=f"segnode-dicom-{next(self._ids)}", daemon=True
            )
            self._connections[association] = thread
        thread.start()

    def _admit(self, association: Association, request: Request) -> Rejection | None:
        """Who may associate (sources, AE titles, how many at once); takes a place when admitted."""
        if not source_allowed(association.address, self.allowed_sources):
            return Rejection(REJECTED_PERMANENT, SOURCE_USER, NO_REASON, "source address not allowed")
        rejection = self.acceptor.check(request)
        if rejection is not None:
            return rejection
        with self._lock:
            if self._counted >= self.config.max_associations:
                return Rejection(REJECTED_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                                 f"already {self._counted} associations (max_associations)")  # fmt: skip
            self._counted += 1
            association.counted = True
        return None

    def _finished(self, association: Association) -> None:
        with self._lock:
            self._connections.pop(association, None)
            if association.counted:
                association.counted = False
                self._counted -= 1

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut open connections, wait for their threads (stores in progress finish)."""
        if self._sock is None:
            return
        self.stopping = True
        assert self._wake_r is not None and self._wake_w is not None
        self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()
        self._sock = None
        with self._lock:
            connections = list(self._connections.items())
        for association, _ in connections:
            association.interrupt()
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        return self.start() if self._sock is None else self

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
