"""The listener's own DICOM Upper Layer and DIMSE code, byte for byte, checked against pydicom and
pynetdicom as independent decoders/encoders."""

from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom.dimse_messages import C_STORE_RQ as StoreRequestMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from node.config import DicomSection
from node.ingest import dimse, ul
from node.ingest.acse import Accepted, Acceptor, Rejection, decode_request
from node.ingest.instance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.1234567"  # 33 characters: padded to 34


def command_set(data: bytes):
    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)


# --- DIMSE command sets -------------------------------------------------------------------------


def test_c_store_rsp_exact_bytes() -> None:
    rsp = dimse.encode_response(0x8001, 7, 0x0000, CTImageStorage, SOP_INSTANCE)
    ct = b"1.2.840.10008.5.1.4.1.1.2\0"  # 25 characters: one NUL makes it even
    uid = SOP_INSTANCE.encode() + b"\0"
    body = (
        struct.pack("<HHI", 0, 0x0002, len(ct)) + ct
        + struct.pack("<HHIH", 0, 0x0100, 2, 0x8001)
        + struct.pack("<HHIH", 0, 0x0120, 2, 7)
        + struct.pack("<HHIH", 0, 0x0800, 2, 0x0101)
        + struct.pack("<HHIH", 0, 0x0900, 2, 0x0000)
        + struct.pack("<HHI", 0, 0x1000, len(uid)) + uid
    )  # fmt: skip
    assert rsp == struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body


def test_c_store_rsp_decodes_with_pydicom_to_the_exact_values() -> None:
    comment = "dataset is truncated \\ or malformed: " + "x" * 60
    rsp = dimse.encode_response(0x8001, 65535, 0xC000, CTImageStorage, SOP_INSTANCE, comment)
    ds = command_set(rsp)
    assert ds.CommandGroupLength == len(rsp) - 12  # what follows the group length element itself
    assert (ds.AffectedSOPClassUID, ds.CommandField, ds.MessageIDBeingRespondedTo) == (
        CTImageStorage,
        0x8001,
        65535,
    )
    assert (ds.CommandDataSetType, ds.Status, ds.AffectedSOPInstanceUID) == (0x0101, 0xC000, SOP_INSTANCE)
    assert ds.ErrorComment == ("dataset is truncated / or malformed: " + "x" * 60)[:64]  # LO: 64, no "\"
    assert [e.tag for e in ds] == sorted(e.tag for e in ds)


def test_c_echo_rsp_has_no_instance_uid() -> None:
    ds = command_set(dimse.encode_response(0x8030, 3, 0x0000, Verification))
    assert list(ds.keys()) == [0x00000000, 0x00000002, 0x00000100, 0x00000120, 0x00000800, 0x00000900]
    assert (ds.AffectedSOPClassUID, ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (
        Verification,
        0x8030,
        3,
        0,
    )


def pynetdicom_store_request(message_id: int = 12) -> tuple[bytes, list[bytes]]:
    """A C-STORE-RQ as pynetdicom encodes it: (command set, P-DATA-TF PDUs for max PDU 16384)."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Priority = 0x0002
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00" + b"\x22\x00\x00\x00" + SOP_INSTANCE.encode() + b"\0")
    message = StoreRequestMessage()
    message.primitive_to_message(primitive)
    pdus = [P_DATA_TF(p).encode() for p in message.encode_msg(1, 16384)]
    return message.encoded_command_set, pdus


def test_decode_command_reads_what_pynetdicom_writes() -> None:
    pdus = pynetdicom_store_request(message_id=12)[1]
    pdu = P_DATA_TF()
    pdu.decode(pdus[0])
    [(context_id, value)] = pdu.to_primitive().presentation_data_value_list
    assert (context_id, value[0]) == (1, ul.COMMAND | ul.LAST)
    assert dimse.decode_command(value[1:]) == dimse.Command(
        command_field=dimse.C_STORE_RQ, message_id=12, has_dataset=True,
        sop_class_uid=CTImageStorage, sop_instance_uid=SOP_INSTANCE,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00\x01\x02", "header cut short"),
        (struct.pack("<HHIH", 0x0008, 0x0100, 2, 1), "only group 0000"),
        (struct.pack("<HHI", 0, 0x0100, 10) + b"\x01\x00", "needs 10 bytes"),
        (struct.pack("<HHIH", 0, 0x0110, 2, 1), "no valid CommandField"),
        (struct.pack("<HHIHHHIH", 0, 0x0100, 2, 1, 0, 0x0800, 2, 0x0101), "no valid MessageID"),
    ],
)
def test_malformed_command_sets_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(dimse.CommandError, match=message):
        dimse.decode_command(data)


# --- PDUs ------------------------------------------------------------------------------------------


def test_p_data_tf_is_fragmented_to_the_peers_maximum() -> None:
    value = bytes(range(50))
    pdus = list(ul.p_data_tf(3, value, command=True, max_pdu=20))  # 14 bytes of value per PDV
    assert [len(p) - 6 for p in pdus] == [20, 20, 20, 14]
    pieces = []
    for n, raw in enumerate(pdus):
        pdu = P_DATA_TF()
        pdu.decode(raw)
        [(context_id, pdv)] = pdu.to_primitive().presentation_data_value_list
        last = n == len(pdus) - 1
        assert (context_id, pdv[0]) == (3, ul.COMMAND | (ul.LAST if last else 0))
        pieces.append(pdv[1:])
    assert b"".join(pieces) == value
    assert list(ul.p_data_tf(3, value, command=False)) == [
        struct.pack(">BxIIBB", 4, 56, 52, 3, ul.LAST) + value]  # fmt: skip


def test_abort_and_release_pdus() -> None:
    assert ul.abort_pdu(ul.UNEXPECTED_PDU) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"
    assert ul.abort_pdu(None) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert ul.RELEASE_RP == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_reader_reads_pdus_however_the_bytes_arrive(piece: int) -> None:
    """PDU and PDV headers, small reads and long fragments (straight into the caller's buffer)."""
    big = bytes(range(256)) * 1024  # 256 KiB: past the Reader's buffer and its direct-read threshold
    stream = (
        struct.pack(">BxI", 4, 6 + 3) + struct.pack(">IBB", 5, 1, 3) + b"abc"
        + struct.pack(">BxI", 4, 6 + len(big)) + struct.pack(">IBB", 2 + len(big), 1, 2) + big
        + ul.RELEASE_RP
    )  # fmt: skip
    a, b = socket.socketpair()

    def send() -> None:
        for start in range(0, len(stream), piece):
            a.sendall(stream[start : start + piece])
        a.close()

    sender = threading.Thread(target=send)
    sender.start()
    reader = ul.Reader(b, size=64 * 1024)
    assert reader.pdu_header() == (4, 9)
    assert reader.pdv_header() == (5, 1, 3)
    assert reader.read(3) == b"abc"
    assert reader.pdu_header() == (4, 6 + len(big))
    assert reader.pdv_header() == (2 + len(big), 1, 2)
    into = bytearray(len(big))
    reader.read_into(memoryview(into))
    assert into == big
    assert reader.pdu_header() == (ul.A_RELEASE_RQ + 1, 4)
    reader.skip(4)
    with pytest.raises(ul.PeerClosed):
        reader.pdu_header()
    sender.join()
    b.close()


# --- association negotiation ---------------------------------------------------------------------


def request(*, called: str = "SEGNODE", calling: str = "MODALITY", roles: bool = False,
            app_context: str = "1.2.840.10008.3.1.1.1") -> bytes:  # fmt: skip
    primitive = A_ASSOCIATE()
    primitive.application_context_name = app_context
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    contexts = [
        build_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        build_context(StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian]),
        build_context(MRImageStorage, ["1.2.3.4.5"]),
    ]
    for n, context in enumerate(contexts):
        context.context_id = 2 * n + 1
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.3.4"
    items = [length, uid]
    if roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, True
        items.append(role)
    primitive.user_information = items
    return A_ASSOCIATE_RQ(primitive).encode()


def accepted(**request_args) -> tuple[Accepted, A_ASSOCIATE]:
    answer = Acceptor(DicomSection(max_pdu=65536)).accept(decode_request(request(**request_args)))
    ac = A_ASSOCIATE_AC()
    ac.decode(answer.pdu)
    return answer, ac.to_primitive()


def test_accept_negotiates_contexts_and_says_who_we_are() -> None:
    answer, ac = accepted()
    assert (ac.called_ae_title, ac.calling_ae_title, ac.result) == ("SEGNODE", "MODALITY", 0x00)
    assert (ac.maximum_length_received, ac.implementation_class_uid) == (65536, IMPLEMENTATION_CLASS_UID)
    [version] = [i for i in ac.user_information if isinstance(i, ImplementationVersionNameNotification)]
    assert version.implementation_version_name == IMPLEMENTATION_VERSION
    results = {
        cx.context_id: (cx.result, cx.transfer_syntax[0])
        for cx in ac.presentation_context_definition_results_list
    }
    # Our preference order decides among proposed syntaxes (pynetdicom's acceptor rules): implicit first.
    assert results[1] == (0x00, ImplicitVRLittleEndian)
    assert results[3][0] == 0x03  # abstract syntax not supported
    assert results[5][0] == 0x04  # transfer syntax not supported
    assert answer.contexts == {1: (CTImageStorage, ImplicitVRLittleEndian)}
    assert answer.peer_max_pdu == 16384
    assert not [i for i in ac.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]


def test_role_selection_keeps_the_default_roles() -> None:
    """A proposed SCP/SCU role selection gets no reply item: the default roles hold (requestor SCU,
    us SCP; PS3.7 D.3.3.4), as a pynetdicom SCP with default roles answers."""
    answer, ac = accepted(roles=True)
    assert not [i for i in ac.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert answer.contexts == {1: (CTImageStorage, ImplicitVRLittleEndian)}


@pytest.mark.parametrize(
    ("config", "request_args", "expected"),
    [
        ({}, {}, None),
        ({}, {"called": "SOMEONE-ELSE"}, None),  # any called AE title unless required
        ({"require_called_aet": True}, {"called": "SOMEONE-ELSE"}, (1, 1, 7)),
        ({"require_called_aet": True}, {}, None),
        ({"allowed_calling_aets": ["CT1", "MODALITY"]}, {}, None),
        ({"allowed_calling_aets": ["CT1"]}, {}, (1, 1, 3)),
        ({}, {"app_context": "1.2.3"}, (1, 1, 2)),
    ],
)
def test_who_may_associate(config: dict, request_args: dict, expected: tuple | None) -> None:
    rejection = Acceptor(DicomSection(**config)).check(decode_request(request(**request_args)))
    assert (None if rejection is None else (rejection.result, rejection.source, rejection.reason)) == expected


def test_protocol_version_and_rejection_pdu() -> None:
    raw = bytearray(request())
    raw[6:8] = b"\x00\x02"  # protocol version without bit 0
    rejection = Acceptor(DicomSection()).check(decode_request(bytes(raw)))
    assert (rejection.result, rejection.source, rejection.reason) == (1, 2, 2)
    assert Rejection(2, 3, 2, "busy").pdu() == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
    rj = A_ASSOCIATE_RJ()
    rj.decode(rejection.pdu())
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 2, 2)


def test_malformed_request_is_a_protocol_error() -> None:
    raw = bytearray(request())
    raw[10:26] = b" " * 16  # a called AE title of spaces only is not allowed (PS3.8 9.3.2)
    with pytest.raises(ul.ProtocolError) as caught:
        decode_request(bytes(raw))
    assert caught.value.reason == ul.INVALID_PDU_PARAMETER_VALUE
