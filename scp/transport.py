"""Our pynetdicom server plumbing: port sharing, no forced GC, a leaner socket read.

Three small departures from pynetdicom's defaults, each for the hot path:

- ``SO_REUSEPORT`` when several listener processes share the port;
- no ``gc.collect()`` from the accept loop (pynetdicom runs a full collection
  every 60 polls, holding the GIL for tens of milliseconds mid-transfer);
- the association socket reads a PDU with ``recv_into`` a buffer of the PDU's
  size instead of 4 kB ``recv`` calls appended to a growing ``bytearray``
  (a 256 kB P-DATA PDU: 64 system calls and copies become one or two).

The socket class is swapped on the association pynetdicom's request handler
just built (pynetdicom creates it inline); ``tests/scp/test_transport.py``
checks that this still happens, so a pynetdicom upgrade that changes the
construction fails a test instead of silently losing the optimisation.
"""

from __future__ import annotations

import logging
import socket
import socketserver
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

logger = logging.getLogger(__name__)

__all__ = ["ListenerServer", "ReceivingSocket"]


class ReceivingSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``recv`` fills one buffer of the requested size."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return bytearray()
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = sock.recv_into(view[received:], nr_bytes - received)
            if not count:  # connection closed: return what arrived, as pynetdicom does
                del view
                del buffer[received:]
                return buffer
            received += count
        return buffer


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            sock.__class__ = ReceivingSocket
        return assoc


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the changes listed in the module docstring."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, reuse_port: bool = False, **kwargs: Any) -> None:
        self._reuse_port = reuse_port
        kwargs.setdefault("request_handler", _RequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def service_actions(self) -> None:
        """Nothing: the interpreter's generational collector reclaims finished associations."""

    def shutdown(self) -> None:
        # pynetdicom's shutdown also unregisters from the AE, which never registered us
        socketserver.BaseServer.shutdown(self)
        self.server_close()
