"""Event-driven waits for pynetdicom's two polling loops: the listener's main speed-up.

pynetdicom 3 runs two loops per association that poll with 1 ms sleeps: the association reactor
(``Association._run_reactor``: ``time.sleep(0.001)`` between looks at the DIMSE message queue) and
the DUL reactor (``DULServiceProvider.run_reactor``: ``time.sleep(_run_loop_delay)`` between looks at
the socket and at the queue of PDUs to send). A C-STORE waits on them several times: with 512x512
slices that is about half of pynetdicom's time (500 slices: 1.6 s with a handler that does nothing,
0.85 s with these waits; dcmtk storescp takes 0.55 s for the same, disk writes included).

:func:`install` replaces the ``time`` module those two pynetdicom modules see with one whose
``sleep`` returns as soon as there is work: the association reactor waits on its message queue's
condition, the DUL waits in ``select()`` on its socket and on a wake-up socket written whenever a PDU
is queued to send. A wait never lasts longer than the sleep it replaces, so both loops run exactly
as before, only sooner; idle CPU is unchanged. Any other thread or sleep length gets ``time.sleep``.
Only pynetdicom 3.0.x is patched (the loops above are what it runs); another version is left alone.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
import weakref
from types import ModuleType
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger(__name__)

#: The association reactor's poll interval in pynetdicom 3.0 (association.py, ``_run_reactor``).
_REACTOR_SLEEP = 0.001
_installed = False
_lock = threading.Lock()


class _Clock:
    """Stands in for the ``time`` module inside one pynetdicom module; only ``sleep`` differs."""

    def __init__(self, sleep: Any) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _reactor_sleep(seconds: float) -> None:
    """The association reactor's sleep: wake when a DIMSE message arrives."""
    messages = getattr(getattr(threading.current_thread(), "dimse", None), "msg_queue", None)
    if seconds != _REACTOR_SLEEP or not isinstance(messages, queue.Queue):
        time.sleep(seconds)
        return
    with messages.not_empty:
        if not messages._qsize():
            messages.not_empty.wait(seconds)


def _waker(dul: DULServiceProvider) -> socket.socket:
    """The read end of a socket pair written whenever a PDU is queued on ``dul`` (made once)."""
    reader = getattr(dul, "_segnode_waker", None)
    if reader is None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        outgoing = dul.to_provider_queue
        put = outgoing.put

        def put_and_wake(item: Any, *args: Any, **kwargs: Any) -> None:
            put(item, *args, **kwargs)
            try:
                writer.send(b"\0")
            except OSError:  # full (already awake) or closed
                pass

        outgoing.put = put_and_wake  # type: ignore[method-assign]
        dul._segnode_waker = reader  # type: ignore[attr-defined]
        # Closed when the DUL is collected; a put after that finds a closed socket and is ignored.
        weakref.finalize(dul, reader.close)
        weakref.finalize(dul, writer.close)
    return reader


def _dul_sleep(seconds: float) -> None:
    """The DUL reactor's sleep: wake when the peer sends data or a PDU is queued to send."""
    dul = threading.current_thread()
    if not isinstance(dul, DULServiceProvider) or seconds != dul._run_loop_delay:
        time.sleep(seconds)
        return
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        time.sleep(seconds)
        return
    reader = _waker(dul)
    if dul.to_provider_queue.qsize():
        return
    try:
        readable, _, _ = select.select([sock, reader], [], [], seconds)
    except (OSError, ValueError):  # the socket was closed meanwhile: the loop will notice
        return
    if reader in readable:
        try:
            reader.recv(4096)
        except OSError:
            pass


def install() -> bool:
    """Patch pynetdicom's reactor sleeps once per process; False (and no change) on another version."""
    global _installed
    with _lock:
        if _installed:
            return True
        if not pynetdicom.__version__.startswith("3.0."):
            log.warning("pynetdicom %s: event-driven waits not installed (made for 3.0)", pynetdicom.__version__)
            return False
        modules: tuple[ModuleType, ModuleType] = (pynetdicom.association, pynetdicom.dul)
        modules[0].time = _Clock(_reactor_sleep)  # type: ignore[attr-defined]
        modules[1].time = _Clock(_dul_sleep)  # type: ignore[attr-defined]
        _installed = True
        return True
