"""DICOM Upper Layer framing for the listener: PDU headers, P-DATA-TF and its PDVs (PS3.8 9.3).

Every PDU starts with a 6-byte header: type (1 byte), reserved (1), length of the rest (4, big
endian), PS3.8 9.3.1. A P-DATA-TF (type 0x04, PS3.8 9.3.5) carries one or more presentation data
value items, each ``length (4) | context ID (1) | message control header (1) | value``; the
control header says whether the value is a command or data set fragment (bit 0) and whether it is
the last one (bit 1), PS3.8 Annex E.2.

:class:`Reader` reads these straight from the socket into preallocated buffers; the association
PDUs (A-ASSOCIATE-RQ/AC/RJ, A-ABORT) are decoded and encoded with pynetdicom's PDU classes
(:mod:`node.ingest.acse`), since they are rare and their rules are many.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT

# PDU types (PS3.8 Table 9-1).
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT_PDU = 0x07
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# A-ABORT reasons when the source is the service provider (PS3.8 Table 9-26).
REASON_NOT_SPECIFIED = 0x00
UNRECOGNIZED_PDU = 0x01
UNEXPECTED_PDU = 0x02
UNRECOGNIZED_PDU_PARAMETER = 0x04
UNEXPECTED_PDU_PARAMETER = 0x05
INVALID_PDU_PARAMETER_VALUE = 0x06

#: Message control header bits (PS3.8 E.2).
COMMAND = 0x01
LAST = 0x02

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
#: A reply to A-RELEASE-RQ: type 0x06, length 4, four reserved bytes (PS3.8 9.3.7).
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol: answered with an A-ABORT carrying ``reason``."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The connection was closed or reset by the peer (or by :meth:`Listener.stop`)."""


def abort_pdu(reason: int | None = None) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8): from the service provider with ``reason`` (Table 9-26), or from
    the service user when ``reason`` is None."""
    if reason is None:
        primitive: A_ABORT | A_P_ABORT = A_ABORT()
        primitive.abort_source = 0x00
    else:
        primitive = A_P_ABORT()
        primitive.provider_reason = reason
    return A_ABORT_RQ(primitive).encode()


def p_data_tf(context_id: int, value: bytes, *, command: bool, max_pdu: int = 0) -> Iterator[bytes]:
    """``value`` as P-DATA-TF PDUs of one PDV each, fragmented so that no PDU's variable field is
    longer than the peer's Maximum Length Received ``max_pdu`` (0 = unlimited), PS3.8 D.1 and E.2."""
    room = (len(value) or 1) if max_pdu <= 0 else max_pdu - 6  # a PDV item header is 6 bytes
    if room <= 0:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for a PDV")
    bits = COMMAND if command else 0
    view = memoryview(value)
    start = 0
    while True:
        fragment = view[start : start + room]
        start += len(fragment)
        control = bits | (LAST if start >= len(value) else 0)
        yield (
            _PDU_HEADER.pack(P_DATA_TF, len(fragment) + 6)
            + _PDV_HEADER.pack(len(fragment) + 2, context_id, control)
            + fragment
        )
        if start >= len(value):
            return


class Reader:
    """Reads PDUs from a socket through one preallocated buffer (``recv_into``, no per-read objects).

    Small items (headers, command sets) come out of the buffer; long data set fragments are copied
    into the caller's buffer, or received straight into it when most of them has not arrived yet.
    """

    #: Fragments at least this long, still mostly on the wire, skip the buffer.
    DIRECT = 64 * 1024

    def __init__(self, sock: socket.socket, size: int = 256 * 1024) -> None:
        self._recv_into = sock.recv_into
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0

    def _recv(self, into: memoryview) -> int:
        try:
            n = self._recv_into(into)
        except (ConnectionError, EOFError) as exc:
            raise PeerClosed(str(exc) or type(exc).__name__) from None
        if not n:
            raise PeerClosed("connection closed by the peer")
        return n

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available at ``_pos`` (``n`` is at most the buffer size)."""
        if self._pos == self._end:
            self._pos = self._end = 0
        elif self._pos + n > len(self._buf):  # no room behind: move what is left to the front
            left = self._end - self._pos
            self._view[:left] = bytes(self._view[self._pos : self._end])
            self._pos, self._end = 0, left
        while self._end - self._pos < n:
            self._end += self._recv(self._view[self._end :])

    def pdu_header(self) -> tuple[int, int]:
        """(PDU type, length of what follows), PS3.8 9.3.1."""
        if self._end - self._pos < 6:
            self._fill(6)
        pdu_type, length = _PDU_HEADER.unpack_from(self._buf, self._pos)
        self._pos += 6
        return pdu_type, length

    def pdv_header(self) -> tuple[int, int, int]:
        """(item length, presentation context ID, message control header), PS3.8 9.3.5.1."""
        if self._end - self._pos < 6:
            self._fill(6)
        item = _PDV_HEADER.unpack_from(self._buf, self._pos)
        self._pos += 6
        return item

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        if n > len(self._buf):
            out = bytearray(n)
            self.read_into(memoryview(out))
            return bytes(out)
        if self._end - self._pos < n:
            self._fill(n)
        data = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return data

    def read_into(self, into: memoryview) -> None:
        """Fill ``into`` with the next ``len(into)`` bytes."""
        n = len(into)
        have = min(self._end - self._pos, n)
        if have < n and n - have < self.DIRECT and n <= len(self._buf):
            self._fill(n)
            have = n
        into[:have] = self._view[self._pos : self._pos + have]
        self._pos += have
        while have < n:  # straight from the socket: no second copy of a long fragment
            have += self._recv(into[have:])

    def skip(self, n: int) -> None:
        """Discard the next ``n`` bytes."""
        while n:
            if self._end == self._pos:
                self._fill(1)
            step = min(n, self._end - self._pos)
            self._pos += step
            n -= step
