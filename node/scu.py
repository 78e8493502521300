"""What the node's pynetdicom SCUs (``segnode send``, the outbox's C-STORE sender) do to an established
association's socket; one copy for both."""

from __future__ import annotations

from typing import Any


def bound_socket_writes(assoc: Any, timeout: float) -> None:
    """Give the association's socket a timeout, so a peer that stops reading fails the send.

    pynetdicom 3.0 clears the socket's timeout once connected, and its DUL thread writes PDUs (PS3.8
    9.3.5 P-DATA-TF) with ``socket.send``: when the peer stops reading (a stalled or suspended SCP, a
    full TCP window), that thread blocks in ``send`` for ever, and so does the ``abort()`` that
    ``dimse_timeout`` triggers (it waits for the DUL to stop). With a timeout the write fails after
    ``timeout`` seconds without progress and pynetdicom takes it as the transport closing (Evt17): the
    C-STORE gets no response and the association is gone.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.settimeout(timeout)
