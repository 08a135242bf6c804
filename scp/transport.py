"""Our pynetdicom server plumbing: port sharing, no forced GC, leaner reads and responses.

Small departures from pynetdicom's defaults, each for the hot path (the
largest, C-STORE requests received and answered on the DUL thread, lives in
:mod:`ctdx.scp.fastpath`; :meth:`EventDrivenDUL._read_pdu_data` hands it the PDUs):

- ``SO_REUSEPORT`` when several listener processes share the port;
- no ``gc.collect()`` from the accept loop (pynetdicom runs a full collection
  every 60 polls, holding the GIL for tens of milliseconds mid-transfer);
- each connection's A-ASSOCIATE-RQ is read and checked by :mod:`ctdx.scp.acceptor` in
  the connection's thread, within the ACSE time-out and at most 64 KiB, before
  pynetdicom builds the association and is handed the request as if its DUL had
  read it; :class:`ConnectionLimits` counts associations from that point on and
  bounds the connections still associating separately;
- the association socket reads a PDU with ``recv_into`` a reused buffer
  instead of 4 kB ``recv`` calls appended to a growing ``bytearray`` (a 256 kB
  P-DATA PDU: 64 system calls and copies become one or two); the buffer grows
  as bytes arrive, and a PDU longer than the maximum the listener announced is
  aborted before any of its body is read, so a length field never sizes memory;
- DIMSE command sets (a dozen group 0000 elements, always implicit VR little
  endian) are encoded by :func:`ctdx.scp.command_set.encode_command_set` instead of pydicom's
  general writer, which pynetdicom calls twice per message (once to measure
  the group length): about 1 ms of the listener's CPU per C-STORE response.
  Anything it does not recognise goes to pydicom as before, and a test keeps
  its bytes identical to pydicom's for every response the listener sends;
- the two threads of each association wait for work instead of sleep-polling
  (:class:`EventDrivenDUL`, :class:`EventDrivenAssociation`): pynetdicom's DUL
  thread sleeps 1 ms whenever it finds nothing to do and its association thread
  sleeps 1 ms between looks at the message queue, so each C-STORE waited on
  average about 0.5 ms for the handler to start, 0.5 ms for its response to
  leave and up to 1 ms for the next request to be read (measured: 2 of 6.4 ms
  per 512 kB instance), and every idle association woke 2000 times a second.
  Now the DUL thread waits in ``select`` on its socket and a wake-up pipe, and
  the association thread on an event; the queues between them wake the waiter
  when something is put. Waking early is always safe (pynetdicom's loops just
  look again); what nothing wakes (timers) is seen within ``MAX_IDLE_WAIT``.

The socket class is swapped on the association pynetdicom's request handler
just built (pynetdicom creates it inline); ``tests/scp/test_transport.py``
checks that this still happens, so a pynetdicom upgrade that changes the
construction fails a test instead of silently losing the optimisation.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pynetdicom.association
import pynetdicom.dul
from pydicom import Dataset
from pynetdicom import dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ctdx.scp.acceptor import (
    MAX_ASSOCIATE_RQ,
    ConnectionEnded,
    QuietLog,
    Refusal,
    limit_reached,
    parse_associate_rq,
    receive_associate_rq,
    refuse,
)
from ctdx.scp.command_set import encode_command_set
from ctdx.scp.fastpath import FastStoreConfig, FastStoreReceiver, ProtocolError, fast_path_allowed

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_IDLE_WAIT",
    "ConnectionLimits",
    "EventDrivenAssociation",
    "EventDrivenDUL",
    "ListenerServer",
    "ReceivingSocket",
    "use_event_driven_waits",
    "use_fast_command_sets",
]

_PDU_HEADER = struct.Struct(">BBL")
_PDU_TYPES = frozenset(range(0x01, 0x08))
#: Largest P-DATA-TF PDU read when the listener announces no maximum (``CTDX_MAX_PDU=0``);
#: otherwise a P-DATA-TF longer than the announced maximum is refused (A-ABORT).
MAX_PDU_READ = 64 * 1024 * 1024
#: First buffer of a connection's PDU reads; buffers double as bytes arrive.
FIRST_READ = 262_144


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
    """An :class:`AssociationSocket` whose reads grow with what arrives, never by a declared size.

    A PDU's length field comes from the peer: buffers grow as its bytes arrive
    (doubling, from :data:`FIRST_READ`), so a 4 GiB declaration followed by
    silence costs a small buffer, and the PDU reader has refused lengths over the
    negotiated maximum before asking for them.
    """

    _ctdx_buffer: bytearray | None = None

    def recv_reused(self, nr_bytes: int) -> memoryview:
        """Read ``nr_bytes`` into a buffer reused from call to call; shorter when closed.

        The view is valid until the next call (a buffer that grows is replaced, not resized,
        so an earlier view stays readable).
        """
        sock = self.socket
        if sock is None:
            return memoryview(b"")
        buffer = self._ctdx_buffer
        if buffer is None:
            buffer = self._ctdx_buffer = bytearray(min(nr_bytes, FIRST_READ))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):  # full: grow now that the bytes are arriving
                grown = bytearray(min(nr_bytes, max(2 * len(buffer), FIRST_READ)))
                grown[:received] = buffer[:received]
                buffer = self._ctdx_buffer = grown
            count = sock.recv_into(memoryview(buffer)[received:min(nr_bytes, len(buffer))])
            if not count:
                return memoryview(buffer)[:received]
            received += count
        return memoryview(buffer)[:nr_bytes]

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return bytearray()
        data = bytearray()
        while len(data) < nr_bytes:
            chunk = sock.recv(min(nr_bytes - len(data), FIRST_READ))
            if not chunk:  # connection closed: return what arrived, as pynetdicom does
                break
            data += chunk
        return data


#: Longest an idle association thread waits before looking again at what nothing wakes it
#: for (ARTIM and idle timers); pynetdicom looks every millisecond.
MAX_IDLE_WAIT = 0.02
_REACTOR_DELAY = 0.001  # the delay pynetdicom's two reactor loops sleep between looks
_real_sleep = time.sleep


class _WakingQueue(queue.Queue[Any]):
    """A ``queue.Queue`` that calls ``_ctdx_wake`` after each put (set by class swap)."""

    _ctdx_wake: Callable[[], None]

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._ctdx_wake()


def _make_waking(q: queue.Queue[Any], wake: Callable[[], None]) -> None:
    q.__class__ = _WakingQueue
    q._ctdx_wake = wake  # type: ignore[attr-defined]


class _WakePipe:
    """A self-pipe: any thread may ``poke``; the owner waits on ``read_fd`` and ``drain``s.

    Closed when the owning thread ends, so a long-running listener gets its descriptors
    back without waiting for the garbage collector; the lock keeps a late ``poke`` from
    writing to a descriptor number that was closed, or reused since.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._open = True

    def poke(self) -> None:
        with self._lock:
            if not self._open:
                return
            try:
                os.write(self._write_fd, b"\x00")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:  # empty (EAGAIN)
            pass

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                for fd in (self.read_fd, self._write_fd):
                    try:
                        os.close(fd)
                    except OSError:
                        pass


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL thread, waiting in ``select`` instead of sleeping 1 ms per idle loop.

    Woken by its socket (a PDU arriving), by a primitive put on its provider or
    event queue (a response to send), and by being told to stop.
    """

    _ctdx_pipe: _WakePipe
    _ctdx_on_exit: Callable[[], None]

    def _ctdx_setup(self, on_exit: Callable[[], None]) -> None:
        pipe = _WakePipe()
        self._ctdx_pipe = pipe
        self._ctdx_on_exit = on_exit
        weakref.finalize(self, pipe.close)  # a DUL whose thread never ran
        _make_waking(self.to_provider_queue, self._ctdx_poke)
        _make_waking(self.event_queue, self._ctdx_poke)

    def _ctdx_poke(self) -> None:
        if threading.current_thread() is not self:  # else it is awake: it put the item
            self._ctdx_pipe.poke()

    @property
    def _kill_thread(self) -> bool:
        return bool(self.__dict__.get("_kill_thread", False))

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_kill_thread"] = value
        if value and "_ctdx_pipe" in self.__dict__:
            self._ctdx_poke()

    def run(self) -> None:
        try:
            super().run()
        finally:
            fast = self.__dict__.get("_ctdx_fast")
            if fast is not None:
                fast.close()
            self._ctdx_pipe.close()
            self._ctdx_on_exit()

    def _ctdx_limit(self, pdu_type: int) -> int:
        """Longest PDU of this type the listener reads (PS3.8 D.1: the maximum we announced)."""
        if pdu_type != 0x04:
            return MAX_ASSOCIATE_RQ  # A-ASSOCIATE, A-RELEASE and A-ABORT PDUs are small
        announced = self.assoc.acceptor.maximum_length
        return int(announced) if announced else MAX_PDU_READ

    def _read_pdu_data(self) -> None:
        """Read one PDU; C-STORE P-DATA-TF PDUs go to the fast path (:mod:`ctdx.scp.fastpath`).

        A PDU of unknown type, or longer than :meth:`_ctdx_limit`, is Evt19 (A-ABORT)
        before anything of its body is read; after the listener has aborted (Sta13) such
        bytes just close the connection. Everything else is decoded and queued for the
        state machine exactly as pynetdicom's own ``_read_pdu_data`` does.
        """
        sock = self.socket
        if not isinstance(sock, ReceivingSocket):
            super()._read_pdu_data()
            return
        state = self.state_machine.current_state
        head = self._ctdx_receive(sock, 6, closed_quietly=True)
        if head is None:
            return
        header = bytes(head)
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES or pdu_length > self._ctdx_limit(pdu_type):
            if state == "Sta13":  # aborted already: what follows is dropped with the connection
                sock.close()
                return
            logger.error("invalid PDU received (type 0x%02X, length %d); aborting",
                         pdu_type, pdu_length)
            self.event_queue.put("Evt19")
            return
        body = self._ctdx_receive(sock, pdu_length)
        if body is None:
            return
        fast: FastStoreReceiver | None = self.__dict__.get("_ctdx_fast")
        if (fast is not None and pdu_type == 0x04 and state == "Sta6"
                and not self.assoc._sent_release):
            try:
                if fast.take(body, sock.send):
                    return
            except ProtocolError as exc:
                logger.error("invalid P-DATA-TF PDU from the peer: %s; aborting", exc)
                fast.close()
                self.event_queue.put("Evt19")
                return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception as exc:  # as pynetdicom: an undecodable PDU is Evt19
            logger.error("unable to decode the received PDU (%s)", type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _ctdx_receive(self, sock: ReceivingSocket, length: int,
                      closed_quietly: bool = False) -> memoryview | None:
        """``length`` bytes from the peer; ``None`` (Evt17 queued) when the connection broke.

        ``closed_quietly``: a connection closed before the first byte is not logged (between
        PDUs, as pynetdicom does).
        """
        try:
            data = sock.recv_reused(length)
        except (OSError, TimeoutError) as exc:
            logger.error("connection closed before the entire PDU was received (%s)",
                         type(exc).__name__)
            self.event_queue.put("Evt17")
            return None
        if len(data) != length:
            if closed_quietly and not data:
                self.event_queue.put("Evt17")
                return None
            logger.error("connection closed before the entire PDU was received "
                         "(%d of %d bytes)", len(data), length)
            self.event_queue.put("Evt17")
            return None
        return data

    def _ctdx_wait(self, seconds: float) -> None:
        if seconds != self._run_loop_delay:  # not the reactor's idle sleep
            _real_sleep(seconds)
            return
        wrapper = self.socket
        sock: socket.socket | None = wrapper.socket if wrapper is not None else None
        if sock is None:
            _real_sleep(seconds)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        try:
            waitables: list[Any] = [sock, self._ctdx_pipe.read_fd]
            ready, _, _ = select.select(waitables, [], [], MAX_IDLE_WAIT)
        except (OSError, ValueError):  # socket closed under us: pynetdicom notices next loop
            _real_sleep(seconds)
            return
        if self._ctdx_pipe.read_fd in ready:
            self._ctdx_pipe.drain()


class EventDrivenAssociation(Association):
    """pynetdicom's association thread, waiting on an event instead of sleeping 1 ms per look.

    Woken when a DIMSE message is complete, when the DUL hands up an ACSE
    primitive (release, abort), when its DUL thread ends, and when it is killed.
    """

    _ctdx_event: threading.Event

    def _ctdx_setup(self) -> None:
        event = threading.Event()
        self._ctdx_event = event
        _make_waking(self.dimse.msg_queue, event.set)
        _make_waking(self.dul.to_user_queue, event.set)

    @property
    def _kill(self) -> bool:
        return bool(self.__dict__.get("_kill", False))

    @_kill.setter
    def _kill(self, value: bool) -> None:
        self.__dict__["_kill"] = value
        event = self.__dict__.get("_ctdx_event")
        if value and event is not None:
            event.set()

    def _ctdx_wait(self, seconds: float) -> None:
        if seconds != _REACTOR_DELAY:  # hand-shakes with other threads, shutdown delays
            _real_sleep(seconds)
            return
        self._ctdx_event.wait(MAX_IDLE_WAIT)
        self._ctdx_event.clear()


class _Clock(types.ModuleType):
    """Stands in for ``time`` in pynetdicom's ``dul`` and ``association`` modules.

    ``sleep`` in a thread that is one of our event-driven associations or DULs
    becomes that thread's wait; anything else is the real ``time``.
    """

    def __init__(self) -> None:
        super().__init__("time")

    def sleep(self, seconds: float) -> None:
        wait = getattr(threading.current_thread(), "_ctdx_wait", None)
        if wait is None:
            _real_sleep(seconds)
        else:
            wait(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


_waits_lock = threading.Lock()
_waits_users = 0
_CLOCK = _Clock()


def use_event_driven_waits(enabled: bool) -> None:
    """Install (counted) or remove the :class:`_Clock` in pynetdicom's two reactor modules.

    Only associations built by :class:`ListenerServer` wait on events; every
    other pynetdicom user in the process keeps sleeping as before.
    """
    global _waits_users
    with _waits_lock:
        if enabled:
            if _waits_users == 0:
                setattr(pynetdicom.dul, "time", _CLOCK)  # noqa: B010
                setattr(pynetdicom.association, "time", _CLOCK)  # noqa: B010
            _waits_users += 1
        elif _waits_users:
            _waits_users -= 1
            if _waits_users == 0:
                setattr(pynetdicom.dul, "time", time)  # noqa: B010
                setattr(pynetdicom.association, "time", time)  # noqa: B010


def make_event_driven(assoc: Association) -> bool:
    """Swap a new, not yet started acceptor's classes; ``False`` when it is not pynetdicom's own."""
    dul = assoc.dul
    if type(assoc) is not Association or type(dul) is not DULServiceProvider:
        return False
    if assoc.is_alive() or dul.is_alive():
        return False
    assoc.__class__ = EventDrivenAssociation
    dul.__class__ = EventDrivenDUL
    assert isinstance(assoc, EventDrivenAssociation) and isinstance(dul, EventDrivenDUL)
    assoc._ctdx_setup()
    dul._ctdx_setup(assoc._ctdx_event.set)
    return True


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections a listener process serves, before and after association.

    ``max_associations`` counts associations from the moment their A-ASSOCIATE-RQ has
    been received in full until they end; connections still sending their request
    count against ``max_pending`` (per process) and ``max_pending_per_peer`` (per peer
    address) instead, and last at most the ACSE time-out (:mod:`ctdx.scp.acceptor`).
    """

    max_associations: int
    max_pending: int = 32
    max_pending_per_peer: int = 8


class _Slots:
    """The counters of :class:`ConnectionLimits`, shared by the accept loop and connections."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._pending_total = 0
        self.established = 0

    def enter_pending(self, peer: str) -> str | None:
        """Count a new connection; why it may not be served, or ``None``."""
        with self._lock:
            if self._pending_total >= self.limits.max_pending:
                return f"{self._pending_total} connections are still associating"
            if self._pending.get(peer, 0) >= self.limits.max_pending_per_peer:
                return f"{self._pending[peer]} connections from this peer are still associating"
            self._pending_total += 1
            self._pending[peer] = self._pending.get(peer, 0) + 1
            return None

    def leave_pending(self, peer: str) -> None:
        with self._lock:
            self._pending_total -= 1
            left = self._pending.get(peer, 1) - 1
            if left:
                self._pending[peer] = left
            else:
                self._pending.pop(peer, None)

    def reserve(self) -> Callable[[], None] | None:
        """An association slot and the (idempotent) call that gives it back; ``None``: full."""
        with self._lock:
            if self.established >= self.limits.max_associations:
                return None
            self.established += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.established -= 1

        return release


#: After these the association is over, although its threads take a moment to end.
_ENDING_EVENTS = (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_REJECTED, evt.EVT_CONN_CLOSE)


def _release_at_end(assoc: Association, release: Callable[[], None]) -> None:
    """Call ``release`` when the association is released, aborted, rejected or closed, and
    at the latest when its thread ends, however it ends."""
    for event in _ENDING_EVENTS:
        assoc.bind(event, _released_by_event, [release])
    run = assoc.run

    def run_then_release() -> None:
        try:
            run()
        finally:
            release()

    setattr(assoc, "run", run_then_release)  # noqa: B010 (an instance's Thread.run)


def _released_by_event(event: Any, release: Callable[[], None]) -> None:
    release()


class _RequestHandler(RequestHandler):
    """One connection: its A-ASSOCIATE-RQ read and checked here (:mod:`ctdx.scp.acceptor`), then
    handed to pynetdicom as if its DUL had read it."""

    server: ListenerServer

    def handle(self) -> None:
        server = self.server
        sock = cast(socket.socket, self.request)
        peer = str(self.client_address[0])
        counted = True

        def leave_pending() -> None:  # once, and before the socket closes (see _receive_request)
            nonlocal counted
            if counted:
                counted = False
                server.slots.leave_pending(peer)

        try:
            accepted = self._receive_request(sock, peer, leave_pending)
        finally:
            leave_pending()
        if accepted is None:
            return
        request, release = accepted
        try:
            assoc = self._create_association()
            # from now on a read or write that stalls for the network time-out ends it
            sock.settimeout(self.ae.network_timeout)
            assoc.dul._recv_pdu.put(request)  # as pynetdicom's DUL queues a received PDU
            assoc.dul.event_queue.put("Evt6")  # after the socket's Evt5: Sta1 -> Sta2 -> Sta3
            _release_at_end(assoc, release)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": request})
            assoc.start()
        except BaseException:
            release()
            raise

    def _receive_request(
        self, sock: socket.socket, peer: str, leave_pending: Callable[[], None]
    ) -> tuple[A_ASSOCIATE_RQ, Callable[[], None]] | None:
        """The checked request and its association slot; ``None`` when answered or closed.

        A connection stops counting as pending before its socket closes: a peer that sees
        its connection end may connect again at once without meeting its own old count.
        """
        deadline = time.monotonic() + float(self.ae.acse_timeout or 30.0)
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.do_handshake()
            request = parse_associate_rq(receive_associate_rq(sock, deadline))
            release = self.server.slots.reserve()
            if release is None:
                raise limit_reached()
        except Refusal as exc:
            self.server.quiet_log(logging.WARNING, "connection from %s: %s; answered %s",
                                  peer, exc, exc.kind)
            leave_pending()
            refuse(sock, exc)
            return None
        except (ConnectionEnded, OSError, ValueError) as exc:
            reason = exc if isinstance(exc, ConnectionEnded) else type(exc).__name__
            self.server.quiet_log(logging.INFO, "connection from %s closed before association: "
                                  "%s", peer, reason)
            leave_pending()
            self.server.shutdown_request(sock)
            return None
        return request, release

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            sock.__class__ = ReceivingSocket
        if make_event_driven(assoc) and self.server.fast_store is not None:
            if fast_path_allowed(assoc):
                assoc.dul._ctdx_fast = FastStoreReceiver(  # type: ignore[attr-defined]
                    assoc, self.server.fast_store)
        return assoc


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the changes listed in the module docstring.

    Connections beyond :class:`ConnectionLimits`' pending limits are closed at once,
    without a thread; a TLS handshake happens in the connection's thread, within the
    ACSE time-out, not in the accept loop.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, reuse_port: bool = False,
                 fast_store: FastStoreConfig | None = None,
                 limits: ConnectionLimits | None = None,
                 **kwargs: Any) -> None:
        self._reuse_port = reuse_port
        #: what the C-STORE fast path needs (scp.fastpath); None: pynetdicom receives everything
        self.fast_store = fast_store
        kwargs.setdefault("request_handler", _RequestHandler)
        super().__init__(*args, **kwargs)
        self.slots = _Slots(limits or ConnectionLimits(self.ae.maximum_associations))
        self.quiet_log = QuietLog()  # what happens before association, rate-limited

    def server_bind(self) -> None:
        if self._reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:  # the handshake is the connection thread's (see _RequestHandler)
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        refused = self.slots.enter_pending(peer)
        if refused is not None:
            self.quiet_log(logging.WARNING, "connection from %s closed at once: %s", peer,
                           refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.leave_pending(peer)
            self.shutdown_request(request)
            raise

    def service_actions(self) -> None:
        """Nothing: the interpreter's generational collector reclaims finished associations."""

    def shutdown(self) -> None:
        # pynetdicom's shutdown also unregisters from the AE, which never registered us
        socketserver.BaseServer.shutdown(self)
        self.server_close()
