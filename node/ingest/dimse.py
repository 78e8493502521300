"""DIMSE command sets, read and written by hand (PS3.7 6.3, 9.3, 10.3; Annex E).

A command set is always Implicit VR Little Endian (PS3.7 6.3.1) and holds only group 0000, so a
tag/length walk is all the decoding it needs; the answers this node gives (C-STORE-RSP, C-ECHO-RSP
and a failure response to anything else) are a handful of elements, packed directly. That keeps
pydicom's general dataset reader and writer (with its UID validation) off the per-instance path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Command Field values (PS3.7 Table E.1-1 and 10.3): a response is its request | 0x8000.
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE = 0x8000
#: Command Data Set Type (0000,0800) meaning "no data set follows" (PS3.7 Table E.1-1).
NO_DATASET = 0x0101

#: Status: success; refused, SOP class not supported; unrecognized operation (PS3.7 Annex C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211

# Tags of group 0000 that are read or written (PS3.7 Table E.1-1).
_GROUP_LENGTH = 0x00000000
_AFFECTED_SOP_CLASS = 0x00000002
_REQUESTED_SOP_CLASS = 0x00000003
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_RESPONDED_TO = 0x00000120
_DATASET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE = 0x00001000
_REQUESTED_SOP_INSTANCE = 0x00001001

_HEADER = struct.Struct("<HHI")  # group, element, value length (implicit VR, PS3.5 7.1.3)
_US = struct.Struct("<H")


class CommandError(ValueError):
    """A command set that cannot be read (truncated, wrong group, a required element missing)."""


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE request this node acts on."""

    command_field: int
    message_id: int
    has_dataset: bool
    #: Affected SOP Class UID, or Requested SOP Class UID for N-services ("" when absent).
    sop_class_uid: str = ""
    #: Affected (or Requested) SOP Instance UID ("" when absent).
    sop_instance_uid: str = ""


def _text(raw: bytes) -> str:
    # UI values are padded with NUL, other text with spaces (PS3.5 6.2).
    return raw.decode("ascii", "replace").rstrip("\0 ")


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Read a request's command set (PS3.7 6.3.1); :class:`CommandError` when it is malformed."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise CommandError(f"command element header cut short at byte {pos}")
        group, element, length = _HEADER.unpack_from(data, pos)
        if group != 0x0000:
            raise CommandError(f"({group:04X},{element:04X}) in a command set (only group 0000 may be)")
        pos += 8
        if length > end - pos:
            raise CommandError(f"(0000,{element:04X}) needs {length} bytes, the command set ends first")
        values[element] = bytes(data[pos : pos + length])
        pos += length

    def us(tag: int, name: str) -> int:
        raw = values.get(tag)
        if raw is None or len(raw) != 2:
            raise CommandError(f"command set has no valid {name}")
        return int(_US.unpack(raw)[0])

    field = us(_COMMAND_FIELD, "CommandField (0000,0100)")
    # C-CANCEL carries MessageIDBeingRespondedTo instead of a MessageID (PS3.7 9.3.2.3).
    message_id = us(_MESSAGE_ID_RESPONDED_TO if field == C_CANCEL_RQ else _MESSAGE_ID, "MessageID")
    dataset_type = us(_DATASET_TYPE, "CommandDataSetType (0000,0800)")
    sop_class = values.get(_AFFECTED_SOP_CLASS, values.get(_REQUESTED_SOP_CLASS, b""))
    sop_instance = values.get(_AFFECTED_SOP_INSTANCE, values.get(_REQUESTED_SOP_INSTANCE, b""))
    return Command(field, message_id, dataset_type != NO_DATASET, _text(sop_class), _text(sop_instance))


def _element(element: int, value: bytes) -> bytes:
    return _HEADER.pack(0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
    error_comment: str = "",
) -> bytes:
    """A response command set with no data set (C-STORE-RSP PS3.7 9.3.1.2, C-ECHO-RSP 9.3.5.2, and
    the failure answer to other requests), elements in ascending tag order after the group length.

    ``command_field`` is the response's own (request | 0x8000). UIDs are padded with NUL to even
    length, the ErrorComment (LO: at most 64 characters, no backslash) with a space.
    """
    elements = []
    if sop_class_uid:
        elements.append(_element(0x0002, _padded(sop_class_uid, b"\0")))
    elements.append(_element(0x0100, _US.pack(command_field)))
    elements.append(_element(0x0120, _US.pack(message_id)))
    elements.append(_element(0x0800, _US.pack(NO_DATASET)))
    elements.append(_element(0x0900, _US.pack(status)))
    if error_comment:
        comment = error_comment.replace("\\", "/")[:64]
        elements.append(_element(0x0902, _padded(comment, b" ")))
    if sop_instance_uid:
        elements.append(_element(0x1000, _padded(sop_instance_uid, b"\0")))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body
