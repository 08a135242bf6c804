"""A new connection until its A-ASSOCIATE-RQ is complete and sound (PS3.8 9.3.2).

pynetdicom reads the first PDU of a connection like any other: into a buffer of
the size the peer declares (a 4 GiB length field allocated 4 GiB), with no time
limit of its own, and it accepts requests the standard says are malformed. The
listener therefore reads the request itself, in the connection's own thread,
before pynetdicom builds an association (:mod:`ctdx.scp.transport` hands the request
over):

- the whole phase, TLS handshake included, ends within the ACSE time-out
  (``deadline``); a peer that sends nothing, part of a PDU, or closes, is closed
  without an answer (PS3.8 AA-2, AA-5);
- at most :data:`MAX_ASSOCIATE_RQ` bytes are read; a longer request, an unknown
  PDU type (seen from the first byte) and any other PDU type get an A-ABORT at
  once (source: service-provider; reason: invalid parameter value, unrecognised
  or unexpected PDU);
- a request that breaks PS3.8 9.3.2 (application context, presentation context
  or user information item missing or repeated, no maximum length sub-item,
  even or repeated presentation context IDs, items longer than the PDU) gets an
  A-ABORT, reason *invalid PDU parameter value*;
- a well-formed request the listener declines gets an A-ASSOCIATE-RJ,
  permanent: an application context other than DICOM's (service-user,
  *application context name not supported*), a protocol version without bit 0
  (service-provider ACSE, *protocol version not supported*), a calling or
  called AE title that is no AE title (all spaces, control characters, NULs,
  backslash, non-ASCII: service-user, *calling/called AE title not
  recognised*);
- what the standard tells a receiver to ignore is ignored: unknown item types,
  unknown user information sub-items, protocol version bits other than bit 0;
- a presentation context that proposes no transfer syntax is answered as
  rejected (*transfer syntaxes not supported*) instead of reaching pynetdicom,
  whose negotiation fails on it.

After an A-ABORT or A-ASSOCIATE-RJ the listener waits at most
:data:`LINGER_SECONDS` for the peer to close (PS3.8 Sta13), then closes.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator

from pynetdicom.pdu import A_ASSOCIATE_RQ

logger = logging.getLogger(__name__)

__all__ = [
    "LINGER_SECONDS",
    "MAX_ASSOCIATE_RQ",
    "ConnectionEnded",
    "QuietLog",
    "Refusal",
    "abort_pdu",
    "limit_reached",
    "parse_associate_rq",
    "receive_associate_rq",
    "refuse",
    "reject_pdu",
]

#: Largest A-ASSOCIATE-RQ PDU read, header included (a request for every storage SOP class
#: with a dozen transfer syntaxes each is about 40 kB).
MAX_ASSOCIATE_RQ = 65_536
#: How long the listener waits for the peer to close after an A-ABORT or A-ASSOCIATE-RJ.
LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20  # at most this much is read and dropped while lingering

APPLICATION_CONTEXT_NAME = b"1.2.840.10008.3.1.1.1"
_FIXED = 68  # protocol version, reserved, called and calling AE titles, reserved
_USER_SUBITEMS = frozenset(range(0x51, 0x59))  # what pynetdicom decodes in a request

# A-ABORT source and reasons, PS3.8 9.3.8
SERVICE_PROVIDER = 0x02
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06
# A-ASSOCIATE-RJ result, source and reasons, PS3.8 9.3.4
PERMANENT, TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_ACSE, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x02, 0x03
CONTEXT_NAME_NOT_SUPPORTED, CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x02, 0x03, 0x07
PROTOCOL_VERSION_NOT_SUPPORTED = 0x02
LOCAL_LIMIT_EXCEEDED = 0x02


class QuietLog:
    """At most ``burst`` lines per ``window`` seconds; then one line saying how many were
    left out (a peer opening thousands of bad connections must not fill the disk)."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._count = 0

    def __call__(self, level: int, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= self.window:
                dropped = self._count - self.burst
                if dropped > 0:
                    logger.warning("%d more connection(s) refused or closed before association "
                                   "in the last %.0f s (not logged one by one)",
                                   dropped, now - self._start)
                self._start, self._count = now, 0
            self._count += 1
            if self._count > self.burst:
                return
        logger.log(level, message, *args)


class ConnectionEnded(Exception):
    """The peer closed, broke the connection or let the ACSE time-out pass: close, no answer."""


class Refusal(Exception):
    """Answer ``answer`` (an A-ABORT or A-ASSOCIATE-RJ PDU) and close; ``str()`` says why."""

    def __init__(self, answer: bytes, reason: str) -> None:
        super().__init__(reason)
        self.answer = answer

    @property
    def kind(self) -> str:
        return "A-ABORT" if self.answer[0] == 0x07 else "A-ASSOCIATE-RJ"


def abort_pdu(source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


def _abort(reason: int, why: str) -> Refusal:
    return Refusal(abort_pdu(SERVICE_PROVIDER, reason), why)


def _reject(source: int, reason: int, why: str, result: int = PERMANENT) -> Refusal:
    return Refusal(reject_pdu(result, source, reason), why)


def limit_reached() -> Refusal:
    """A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local limit."""
    return _reject(SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                   "association limit reached", result=TRANSIENT)


def _receive(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Exactly ``count`` bytes (callers bound it) before ``deadline`` (``time.monotonic``)."""
    buffer = bytearray(count)
    view = memoryview(buffer)
    received = 0
    while received < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionEnded("ACSE time-out before the A-ASSOCIATE-RQ was complete")
        try:
            sock.settimeout(left)
            got = sock.recv_into(view[received:], count - received)
        except TimeoutError:
            raise ConnectionEnded(
                "ACSE time-out before the A-ASSOCIATE-RQ was complete") from None
        except OSError as exc:
            raise ConnectionEnded(f"connection broken ({type(exc).__name__})") from None
        if not got:
            raise ConnectionEnded("closed by the peer before the A-ASSOCIATE-RQ was complete")
        received += got
    return bytes(buffer)


def receive_associate_rq(sock: socket.socket, deadline: float) -> bytes:
    """The connection's first PDU, an A-ASSOCIATE-RQ of at most :data:`MAX_ASSOCIATE_RQ` bytes.

    Raises :class:`Refusal` (answer, then close) or :class:`ConnectionEnded` (close).
    """
    first = _receive(sock, 1, deadline)
    kind = first[0]
    if kind == 0x07:
        raise ConnectionEnded("A-ABORT from the peer")
    if 0x02 <= kind <= 0x06:
        raise _abort(UNEXPECTED_PDU, f"PDU type 0x{kind:02X} before an A-ASSOCIATE-RQ")
    if kind != 0x01:
        raise _abort(UNRECOGNISED_PDU, f"unknown PDU type 0x{kind:02X}")
    rest = _receive(sock, 5, deadline)
    length = int.from_bytes(rest[1:5], "big")
    if length + 6 > MAX_ASSOCIATE_RQ:
        raise _abort(INVALID_PARAMETER,
                     f"A-ASSOCIATE-RQ declares {length} bytes (at most {MAX_ASSOCIATE_RQ})")
    if length < _FIXED:
        raise _abort(INVALID_PARAMETER, f"A-ASSOCIATE-RQ of {length} bytes is too short")
    return first + rest + _receive(sock, length, deadline)


def _items(data: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, value) of the items between ``start`` and ``end``; each must fit."""
    offset = start
    while offset < end:
        if offset + 4 > end:
            raise _abort(INVALID_PARAMETER, "item header cut short")
        kind, _, length = struct.unpack_from(">BBH", data, offset)
        if offset + 4 + length > end:
            raise _abort(INVALID_PARAMETER, f"item 0x{kind:02X} longer than what contains it")
        yield kind, data[offset + 4:offset + 4 + length]
        offset += 4 + length


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _is_ae_title(raw: bytes) -> bool:
    """PS3.5 AE: default repertoire without backslash or control characters; not only spaces."""
    text = raw.strip(b" ")
    return bool(text) and all(0x20 <= c <= 0x7E and c != 0x5C for c in text)


def _presentation_context(value: bytes, seen: set[int]) -> bytes:
    if len(value) < 4:
        raise _abort(INVALID_PARAMETER, "presentation context item cut short")
    context_id = value[0]
    if context_id % 2 == 0 or context_id in seen:
        raise _abort(INVALID_PARAMETER,
                     f"presentation context ID {context_id} is even or repeated")
    seen.add(context_id)
    subitems = list(_items(value, 4, len(value)))
    abstract = [v for kind, v in subitems if kind == 0x30]
    if len(abstract) != 1 or not abstract[0].strip(b"\x00 "):
        raise _abort(INVALID_PARAMETER,
                     f"presentation context {context_id} has no single abstract syntax")
    syntaxes = [v for kind, v in subitems if kind == 0x40 and v.strip(b"\x00 ")]
    if not syntaxes:
        # a SOP Class UID is no transfer syntax: negotiated as "transfer syntaxes not supported"
        syntaxes = abstract
    return _item(0x20, value[:4] + _item(0x30, abstract[0])
                 + b"".join(_item(0x40, syntax) for syntax in syntaxes))


def _user_information(value: bytes) -> bytes:
    subitems = list(_items(value, 0, len(value)))
    maximum = [v for kind, v in subitems if kind == 0x51]
    if len(maximum) != 1 or len(maximum[0]) != 4:
        raise _abort(INVALID_PARAMETER, "user information without one maximum length sub-item")
    return _item(0x50, b"".join(_item(kind, v) for kind, v in subitems
                                if kind in _USER_SUBITEMS))


def parse_associate_rq(data: bytes) -> A_ASSOCIATE_RQ:
    """The request as pynetdicom's PDU, rebuilt from what PS3.8 lets a receiver use.

    Raises :class:`Refusal` for what the module docstring lists.
    """
    end = len(data)
    top = list(_items(data, 6 + _FIXED, end))
    application = [v for kind, v in top if kind == 0x10]
    contexts = [v for kind, v in top if kind == 0x20]
    users = [v for kind, v in top if kind == 0x50]
    if len(application) != 1 or not application[0].strip(b"\x00 "):
        raise _abort(INVALID_PARAMETER, "no single application context name")
    if not contexts:
        raise _abort(INVALID_PARAMETER, "no presentation context")
    if len(users) != 1:
        raise _abort(INVALID_PARAMETER, "no single user information item")
    seen: set[int] = set()
    variable = _item(0x10, application[0]) \
        + b"".join(_presentation_context(v, seen) for v in contexts) \
        + _user_information(users[0])
    version = int.from_bytes(data[6:8], "big")
    if not version & 0x0001:
        raise _reject(SERVICE_PROVIDER_ACSE, PROTOCOL_VERSION_NOT_SUPPORTED,
                      f"protocol version 0x{version:04X} without version 1")
    if not _is_ae_title(data[26:42]):
        raise _reject(SERVICE_USER, CALLING_AE_NOT_RECOGNISED, "calling AE title is invalid")
    if not _is_ae_title(data[10:26]):
        raise _reject(SERVICE_USER, CALLED_AE_NOT_RECOGNISED, "called AE title is invalid")
    if application[0].rstrip(b"\x00 ") != APPLICATION_CONTEXT_NAME:
        raise _reject(SERVICE_USER, CONTEXT_NAME_NOT_SUPPORTED,
                      "application context name is not DICOM's")
    fixed = struct.pack(">H", 0x0001) + data[8:6 + _FIXED]
    body = fixed + variable
    rebuilt = struct.pack(">BBL", 0x01, 0, len(body)) + body
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(rebuilt)
        pdu.to_primitive()  # what pynetdicom does next: fail here, not in its DUL thread
    except Exception as exc:
        raise _abort(INVALID_PARAMETER,
                     f"A-ASSOCIATE-RQ not decodable ({type(exc).__name__})") from None
    return pdu


def refuse(sock: socket.socket, refusal: Refusal) -> None:
    """Send the refusal, wait up to :data:`LINGER_SECONDS` for the peer to close, close."""
    deadline = time.monotonic() + LINGER_SECONDS
    try:
        sock.settimeout(LINGER_SECONDS)
        sock.sendall(refusal.answer)  # the peer closes first (Sta13), or we do after lingering
        drained = 0
        while drained < _LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(65_536)
            if not data:
                break
            drained += len(data)
    except (OSError, ValueError):
        pass
    finally:
        sock.close()
