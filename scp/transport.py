"""Our pynetdicom server plumbing: port sharing, no forced GC, leaner reads and responses.

Four small departures from pynetdicom's defaults, each for the hot path:

- ``SO_REUSEPORT`` when several listener processes share the port;
- no ``gc.collect()`` from the accept loop (pynetdicom runs a full collection
  every 60 polls, holding the GIL for tens of milliseconds mid-transfer);
- the association socket reads a PDU with ``recv_into`` a buffer of the PDU's
  size instead of 4 kB ``recv`` calls appended to a growing ``bytearray``
  (a 256 kB P-DATA PDU: 64 system calls and copies become one or two);
- DIMSE command sets (a dozen group 0000 elements, always implicit VR little
  endian) are encoded by :func:`encode_command_set` instead of pydicom's
  general writer, which pynetdicom calls twice per message (once to measure
  the group length): about 1 ms of the listener's CPU per C-STORE response.
  Anything it does not recognise goes to pydicom as before, and a test keeps
  its bytes identical to pydicom's for every response the listener sends.

The socket class is swapped on the association pynetdicom's request handler
just built (pynetdicom creates it inline); ``tests/scp/test_transport.py``
checks that this still happens, so a pynetdicom upgrade that changes the
construction fails a test instead of silently losing the optimisation.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pynetdicom import dimse_messages
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

logger = logging.getLogger(__name__)

__all__ = [
    "ListenerServer",
    "ReceivingSocket",
    "encode_command_set",
    "use_fast_command_sets",
]

_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_HEAD = struct.Struct("<HHL")


def _value_bytes(vr: str, value: Any) -> bytes | None:
    """The implicit VR LE encoding of one command element value; ``None``: not handled."""
    if value is None or value == "":
        return b""
    if vr == "US":
        values = value if isinstance(value, list) else [value]
        return b"".join(_US.pack(int(v)) for v in values)
    if vr == "UL":
        values = value if isinstance(value, list) else [value]
        return b"".join(_UL.pack(int(v)) for v in values)
    if vr == "UI":
        raw = str(value).encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw
    if vr in ("AE", "LO", "SH", "CS", "ST"):
        if not isinstance(value, str):
            return None
        raw = value.encode("ascii")
        return raw + b" " if len(raw) % 2 else raw
    return None


def encode_command_set(ds: Dataset) -> bytes | None:
    """Encode a DIMSE command set (group 0000, implicit VR LE); ``None`` when not one.

    Same bytes as pydicom's ``write_dataset`` for what it handles: US, UL, UI
    (NUL padded), short text VRs (space padded); other VRs or groups: ``None``.
    """
    out = bytearray()
    for tag in sorted(ds.keys()):
        if tag >> 16 != 0:
            return None
        element = ds[tag]
        try:
            vr = element.VR or dictionary_VR(tag)
            encoded = _value_bytes(vr, element.value)
        except (KeyError, UnicodeEncodeError, TypeError, ValueError, struct.error):
            return None
        if encoded is None:
            return None
        out += _HEAD.pack(tag >> 16, tag & 0xFFFF, len(encoded))
        out += encoded
    return bytes(out)


_lock = threading.Lock()
_users = 0
_original_encode: Callable[..., bytes | None] | None = None


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    if is_implicit_vr and is_little_endian and not deflated:
        encoded = encode_command_set(ds)
        if encoded is not None:
            return encoded
    assert _original_encode is not None
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)


def use_fast_command_sets(enabled: bool) -> None:
    """Install (counted) or remove :func:`encode_command_set` for pynetdicom's command sets.

    pynetdicom's ``dimse_messages`` module calls ``encode`` only for command sets.
    """
    global _users, _original_encode
    with _lock:
        if enabled:
            if _users == 0:
                _original_encode = getattr(dimse_messages, "encode")  # noqa: B009
                setattr(dimse_messages, "encode", _encode)  # noqa: B010
            _users += 1
        elif _users:
            _users -= 1
            if _users == 0 and _original_encode is not None:
                setattr(dimse_messages, "encode", _original_encode)  # noqa: B010
                _original_encode = None


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
