"""Association negotiation for the listener, with pynetdicom's PDU classes and negotiation rules.

An A-ASSOCIATE-RQ (PS3.8 9.3.2) is decoded by :class:`pynetdicom.pdu.A_ASSOCIATE_RQ`; presentation
contexts and SCP/SCU role selection are negotiated by
:func:`pynetdicom.presentation.negotiate_as_acceptor` (PS3.8 7.1.1.13, PS3.7 D.3.3.4), so transfer
syntax choice and roles stay what a pynetdicom SCP would answer; the reply is an A-ASSOCIATE-AC
(PS3.8 9.3.3) carrying our Maximum Length (PS3.8 D.1) and implementation identity (PS3.7 D.3.3.2),
or an A-ASSOCIATE-RJ (PS3.8 9.3.4) with a result, source and reason from Table 9-21.

The supported contexts (every storage SOP class and Verification, every transfer syntax pynetdicom
knows) are built once, by :class:`Acceptor`, when the listener starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor
from pynetdicom.sop_class import Verification

from node.config import DicomSection
from node.ingest.instance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from node.ingest.ul import INVALID_PDU_PARAMETER_VALUE, ProtocolError

#: The DICOM application context name (PS3.7 A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ result, source and reasons (PS3.8 Table 9-21).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_USER = 0x01
SOURCE_ACSE = 0x02
SOURCE_PRESENTATION = 0x03
NO_REASON = 0x01  # service user / ACSE: no-reason-given
APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02  # service user
CALLING_AE_NOT_RECOGNIZED = 0x03  # service user
CALLED_AE_NOT_RECOGNIZED = 0x07  # service user
PROTOCOL_VERSION_NOT_SUPPORTED = 0x02  # ACSE
LOCAL_LIMIT_EXCEEDED = 0x02  # presentation


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused: the A-ASSOCIATE-RJ fields and a sentence for the log."""

    result: int
    source: int
    reason: int
    why: str

    def pdu(self) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.result = self.result
        primitive.result_source = self.source
        primitive.diagnostic = self.reason
        return A_ASSOCIATE_RJ(primitive).encode()


@dataclass(frozen=True)
class Request:
    """A decoded A-ASSOCIATE-RQ."""

    primitive: A_ASSOCIATE
    protocol_version: int

    @property
    def calling_aet(self) -> str:
        return str(self.primitive.calling_ae_title).strip()

    @property
    def called_aet(self) -> str:
        return str(self.primitive.called_ae_title).strip()


@dataclass(frozen=True)
class Accepted:
    """A negotiated association: what to send back and what was agreed."""

    #: The A-ASSOCIATE-AC PDU to send.
    pdu: bytes
    #: Accepted presentation contexts: context ID -> (abstract syntax, transfer syntax).
    contexts: dict[int, tuple[str, str]]
    #: The peer's Maximum Length Received: our P-DATA-TF PDUs must not be longer (0 = no limit).
    peer_max_pdu: int


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class and Verification, each with every transfer syntax, as acceptor."""
    contexts = [
        build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts
    ]
    contexts.append(build_context(Verification, ALL_TRANSFER_SYNTAXES))
    return contexts


def decode_request(pdu: bytes) -> Request:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included); :class:`ProtocolError` if malformed."""
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(pdu)
        return Request(rq.to_primitive(), rq.protocol_version)
    except Exception as exc:  # noqa: BLE001 (pynetdicom raises many kinds for bad fields)
        raise ProtocolError(INVALID_PDU_PARAMETER_VALUE, f"malformed A-ASSOCIATE-RQ: {exc}") from None


class Acceptor:
    """The listener's side of association negotiation; one per listener, shared by its threads."""

    def __init__(self, config: DicomSection) -> None:
        self.ae_title = config.ae_title.strip()
        self.allowed_calling_aets = frozenset(a.strip() for a in config.allowed_calling_aets)
        self.require_called_aet = config.require_called_aet
        self.max_pdu = config.max_pdu
        self.contexts = supported_contexts()

    def check(self, request: Request) -> Rejection | None:
        """The reason to refuse this request, or None (PS3.8 7.1.1.9, Table 9-21)."""
        if not request.protocol_version & 0x01:  # bit 0: version 1, the only one (PS3.8 9.3.2)
            return Rejection(REJECTED_PERMANENT, SOURCE_ACSE, PROTOCOL_VERSION_NOT_SUPPORTED,
                             f"protocol version 0x{request.protocol_version:04X} not supported")  # fmt: skip
        if str(request.primitive.application_context_name) != APPLICATION_CONTEXT:
            return Rejection(REJECTED_PERMANENT, SOURCE_USER, APPLICATION_CONTEXT_NOT_SUPPORTED,
                             "application context name not supported")  # fmt: skip
        if self.allowed_calling_aets and request.calling_aet not in self.allowed_calling_aets:
            return Rejection(REJECTED_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNIZED,
                             "calling AE title not allowed")  # fmt: skip
        if self.require_called_aet and request.called_aet != self.ae_title:
            return Rejection(REJECTED_PERMANENT, SOURCE_USER, CALLED_AE_NOT_RECOGNIZED,
                             f"called AE title {request.called_aet!r} is not ours")  # fmt: skip
        return None

    def accept(self, request: Request) -> Accepted:
        """Negotiate the presentation contexts and roles; the A-ASSOCIATE-AC to send."""
        rq = request.primitive
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in rq.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_replies = negotiate_as_acceptor(
            rq.presentation_context_definition_list, self.contexts, roles
        )
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title  # returned as received, not tested (PS3.8 9.3.3)
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = SOURCE_USER
        ac.presentation_context_definition_results_list = results
        length = MaximumLengthNotification()
        length.maximum_length_received = self.max_pdu
        uid = ImplementationClassUIDNotification()
        uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [length, uid, version, *role_replies]
        contexts = {
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))  # type: ignore[arg-type]
            for cx in results
            if cx.result == 0x00
        }
        return Accepted(A_ASSOCIATE_AC(ac).encode(), contexts, int(rq.maximum_length_received or 0))
