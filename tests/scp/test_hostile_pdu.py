"""Hostile and broken peers at the association/PDU level (PS3.8) against a real `ctdx scp`.

The listener runs as its own process (``ctdx scp``) so that its resident memory, threads
and descriptors can be read from ``/proc`` without the test's own. PDUs are built here
from PS3.8 9.3 (not with pynetdicom's encoders); good associations (pynetdicom) are
interleaved and must keep succeeding.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ctdx.db import migrate
from tests.conftest import free_port, wait_for
from tests.scp.conftest import Running, associate, phantom, send_files
from tests.scp.test_tls import Pki, _client, pki  # noqa: F401 (pki: the fixture)

CTDX = [sys.executable, "-c", "from ctdx.cli import main; main()"]
NETWORK_TIMEOUT = 6.0  # the listener's ACSE time-out is min(30 s, this)
MAX_ASSOCIATIONS = 3
PENDING_PER_PEER = 16  # connections still associating, per peer address

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR = b"1.2.840.10008.1.2"
EXPLICIT_VR = b"1.2.840.10008.1.2.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_ABORT = 0x05, 0x07


# --- PDUs, as PS3.8 9.3 lays them out ------------------------------------------------------

def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if declared is None else declared) + body


def presentation_context(context_id: int, abstract: bytes, *syntaxes: bytes) -> bytes:
    subitems = item(0x30, abstract) + b"".join(item(0x40, ts) for ts in syntaxes)
    return item(0x20, bytes([context_id, 0, 0, 0]) + subitems)


def user_information(max_length: int | None = 16384) -> bytes:
    subitems = b"" if max_length is None else item(0x51, struct.pack(">L", max_length))
    return item(0x50, subitems + item(0x52, b"1.2.826.0.1.3680043.9.3811.1"))


def associate_rq(
    calling: bytes = b"HOSTILE",
    called: bytes = b"CTDX",
    application_context: bytes | None = APPLICATION_CONTEXT,
    contexts: bytes | None = None,
    user_info: bytes | None = None,
    protocol_version: int = 1,
) -> bytes:
    """The variable part is built from the arguments; ``None`` leaves an item out."""
    fixed = struct.pack(">HH", protocol_version, 0) + called.ljust(16)[:16] \
        + calling.ljust(16)[:16] + bytes(32)
    variable = b""
    if application_context is not None:
        variable += item(0x10, application_context)
    variable += presentation_context(1, VERIFICATION, IMPLICIT_VR) if contexts is None \
        else contexts
    variable += user_information() if user_info is None else user_info
    return pdu(A_ASSOCIATE_RQ, fixed + variable)


def p_data(context_id: int, payload: bytes, header: int = 0x03) -> bytes:
    pdv = bytes([context_id, header]) + payload
    return pdu(P_DATA_TF, struct.pack(">L", len(pdv)) + pdv)


@dataclass(frozen=True)
class Answer:
    """What the listener sent back: PDUs (type, body) and whether it closed the connection."""

    pdus: tuple[tuple[int, bytes], ...]
    closed: bool
    seconds: float

    @property
    def types(self) -> tuple[int, ...]:
        return tuple(kind for kind, _ in self.pdus)

    def abort(self) -> tuple[int, int]:
        """(source, reason) of the A-ABORT received."""
        body = dict(self.pdus)[A_ABORT]
        return body[2], body[3]

    def reject(self) -> tuple[int, int, int]:
        """(result, source, reason) of the A-ASSOCIATE-RJ received."""
        body = dict(self.pdus)[A_ASSOCIATE_RJ]
        return body[1], body[2], body[3]


def read_answer(sock: socket.socket, timeout: float, until: int | None = None) -> Answer:
    """PDUs until the listener closes, ``until`` arrives (a PDU type) or ``timeout`` passes."""
    start = time.monotonic()
    deadline = start + timeout
    buffer = b""
    pdus: list[tuple[int, bytes]] = []
    closed = False
    while True:
        while len(buffer) >= 6:
            kind, _, length = struct.unpack(">BBL", buffer[:6])
            if len(buffer) < 6 + length:
                break
            pdus.append((kind, buffer[6:6 + length]))
            buffer = buffer[6 + length:]
        if until is not None and until in (kind for kind, _ in pdus):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buffer += chunk
    return Answer(tuple(pdus), closed, time.monotonic() - start)


def exchange(port: int, data: bytes, timeout: float = 10.0, close_after: bool = False,
             until: int | None = None) -> Answer:
    """Send ``data`` on a new connection (``close_after``: then close our sending side)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            if close_after:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed before we were done
            pass
        return read_answer(sock, timeout, until)


# --- the listener process -------------------------------------------------------------------

class ListenerProcess:
    """``ctdx scp`` with MAX_ASSOCIATIONS and NETWORK_TIMEOUT; its resources from /proc."""

    def __init__(self, directory: Path) -> None:
        database = f"sqlite:///{directory / 'ctdx.sqlite3'}"
        migrate.upgrade(database)
        self.port = free_port()
        self.log = directory / "scp.log"
        env = {**os.environ, "CTDX_DATA_DIR": str(directory / "data"),
               "CTDX_DATABASE_URL": database, "CTDX_BROKER_URL": "memory://",
               "CTDX_HOST": "127.0.0.1", "CTDX_MIN_FREE_BYTES": "0",
               "CTDX_MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
               "CTDX_MAX_PENDING_PER_PEER": str(PENDING_PER_PEER),
               "CTDX_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT)}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([*CTDX, "scp", "--port", str(self.port)], env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=90, message="ctdx scp listening")

    def _ready(self) -> bool:
        self.assert_alive()
        return "listening on" in self.log.read_text(errors="replace")

    def assert_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"ctdx scp exited: {self.log.read_text(errors='replace')}")

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{key} not in /proc status")

    @property
    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024

    @property
    def threads(self) -> int:
        return self._status("Threads")

    @property
    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def connections(self) -> int:
        """The listener's open TCP connections (established or closed by the peer only)."""
        port = f":{self.port:04X}"
        count = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(port) and fields[3] in ("01", "08"):
                count += 1
        return count

    def settle(self, threads: int, fds: int, timeout: float = 30.0) -> None:
        """Wait until threads and descriptors are back to (at most) the given counts.

        Descriptors get ``POOL_SLACK``: under load the database pool may open a second SQLite
        connection (its file and WAL: two descriptors) and keep it, which is no leak; a leak
        of one association's socket, pipe and file (three or more) per connection still shows.
        """
        limit = fds + POOL_SLACK
        wait_for(lambda: self.threads <= threads and self.fds <= limit, timeout=timeout,
                 message=f"threads {self.threads} <= {threads} and descriptors "
                         f"{self.fds} <= {limit}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


#: descriptors a second pooled SQLite connection may hold (see ListenerProcess.settle)
POOL_SLACK = 2

@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListenerProcess]:
    process = ListenerProcess(tmp_path_factory.mktemp("hostile"))
    try:
        for _ in range(3):  # warm up: first-use allocations, database pool, logging
            good_association(process.port)
        yield process
    finally:
        process.stop()


def good_association(port: int, calling: str = "MODALITY", source: str = "127.0.0.1") -> None:
    """A real modality: associates, verifies, releases (fails the test otherwise)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTDX", bind_address=(source, 0))
    assert assoc.is_established, "a good association was not accepted"
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


@pytest.fixture
def baseline(listener: ListenerProcess) -> tuple[int, int]:
    """Threads and descriptors of the idle listener before the test (back to them after)."""
    wait_for(lambda: listener.connections() == 0, timeout=15, message="no connections left")
    return listener.threads, listener.fds


# --- memory ----------------------------------------------------------------------------------

def test_declared_4_gib_pdus_cost_no_memory(listener: ListenerProcess,
                                            baseline: tuple[int, int]) -> None:
    """16 peers each declare a 4 GiB A-ASSOCIATE-RQ (issue: RSS grew by the declared size)."""
    before = listener.rss_mb
    real = associate_rq()
    sockets = []
    try:
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            sock.sendall(pdu(A_ASSOCIATE_RQ, real[6:], declared=0xFFFF_FFFF))
            sockets.append(sock)
        answers = [read_answer(sock, timeout=10, until=A_ABORT) for sock in sockets]
        peak = listener.rss_mb
    finally:
        for sock in sockets:
            sock.close()
    assert all(answer.types == (A_ABORT,) for answer in answers), answers
    assert peak < 300 and peak - before < 50, f"RSS {before:.0f} -> {peak:.0f} MB"
    good_association(listener.port)
    listener.settle(*baseline)


def test_p_data_longer_than_our_maximum_is_aborted(listener: ListenerProcess,
                                                   baseline: tuple[int, int]) -> None:
    """After A-ASSOCIATE-AC: a P-DATA-TF declaring more than the maximum we announced."""
    before = listener.rss_mb
    sockets = []
    try:
        for _ in range(MAX_ASSOCIATIONS):
            sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            sock.sendall(associate_rq())
            assert read_answer(sock, 10, until=A_ASSOCIATE_AC).types == (A_ASSOCIATE_AC,)
            sock.sendall(struct.pack(">BBL", P_DATA_TF, 0, 0xFFFF_FFF0) + bytes(1000))
            sockets.append(sock)
        answers = [read_answer(sock, timeout=10, until=A_ABORT) for sock in sockets]
        peak = listener.rss_mb
    finally:
        for sock in sockets:
            sock.close()
    assert all(A_ABORT in answer.types for answer in answers), answers
    assert peak < 300 and peak - before < 50, f"RSS {before:.0f} -> {peak:.0f} MB"
    good_association(listener.port)
    listener.settle(*baseline)


def test_associate_rq_over_the_fixed_bound_is_aborted(listener: ListenerProcess) -> None:
    big = b"".join(presentation_context(i, VERIFICATION, *([IMPLICIT_VR] * 1000))
                   for i in (1, 3, 5, 7))  # 84 kB
    answer = exchange(listener.port, associate_rq(contexts=big))
    assert answer.types == (A_ABORT,) and answer.closed
    assert answer.abort() == (0x02, 0x06)  # service-provider, invalid PDU parameter value


# --- slots and time-outs ---------------------------------------------------------------------

def test_half_open_connections_take_no_association_slot(listener: ListenerProcess,
                                                        baseline: tuple[int, int]) -> None:
    """MAX_ASSOCIATIONS half-open connections: a real modality still associates; the limit
    still counts established associations; the half-open ones end within the ACSE time-out."""
    half_rq = associate_rq()[:40]
    sockets = [socket.create_connection(("127.0.0.1", listener.port), timeout=5)
               for _ in range(MAX_ASSOCIATIONS)]
    try:
        sockets[1].sendall(b"\x01\x00\x00")  # 3 bytes of a PDU header
        sockets[2].sendall(half_rq)
        started = time.monotonic()
        for _ in range(2):
            good_association(listener.port)
        # the limit itself: MAX_ASSOCIATIONS established associations, one more is rejected
        held = [_raw_association(listener.port) for _ in range(MAX_ASSOCIATIONS)]
        try:
            refused = exchange(listener.port, associate_rq())
            assert refused.types == (A_ASSOCIATE_RJ,)
            assert refused.reject() == (0x02, 0x03, 0x02)  # transient, provider, local limit
        finally:
            for sock in held:
                sock.close()
        answers = [read_answer(sock, timeout=NETWORK_TIMEOUT + 10) for sock in sockets]
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert all(answer.closed for answer in answers)
    assert elapsed < NETWORK_TIMEOUT + 5, f"half-open connections kept {elapsed:.1f} s"
    good_association(listener.port)
    listener.settle(*baseline)


def test_pending_connections_per_peer_are_bounded(listener: ListenerProcess,
                                                  baseline: tuple[int, int]) -> None:
    """One address may keep PENDING_PER_PEER connections associating; the next is closed at
    once (no thread, no answer), and other addresses still associate meanwhile."""
    sockets = [socket.create_connection(("127.0.0.1", listener.port), timeout=5)
               for _ in range(PENDING_PER_PEER)]
    try:
        wait_for(lambda: listener.connections() >= PENDING_PER_PEER, timeout=10,
                 message="pending connections accepted")
        extra = exchange(listener.port, associate_rq(), timeout=5)
        assert extra.closed and extra.types == () and extra.seconds < 3, extra
        good_association(listener.port, source="127.0.0.2")
    finally:
        for sock in sockets:
            sock.close()
    # a closed connection no longer counts once the listener has closed its end (CI under
    # load: the modality's next association met the 16 still counted and was closed at once)
    wait_for(lambda: listener.connections() == 0, timeout=15, message="pending connections ended")
    good_association(listener.port)
    listener.settle(*baseline)


def test_a_silent_tls_client_delays_nobody(start_scp_sqlite: Callable[..., Running],
                                           pki: Pki) -> None:  # noqa: F811
    """The TLS handshake runs in the connection's thread, not in the accept loop."""
    scp = start_scp_sqlite(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5):  # never says hello
        started = time.monotonic()
        with associate(scp.port, tls_args=_client(pki, with_certificate=False)) as assoc:
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assert time.monotonic() - started < 8


def _raw_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(associate_rq())
    answer = read_answer(sock, 10, until=A_ASSOCIATE_AC)
    assert answer.types == (A_ASSOCIATE_AC,), answer
    return sock


def test_a_pdu_that_stalls_after_association_ends_with_the_network_time_out(
        listener: ListenerProcess, baseline: tuple[int, int]) -> None:
    sock = _raw_association(listener.port)
    with sock:
        sock.sendall(struct.pack(">BBL", P_DATA_TF, 0, 1000) + bytes(10))  # then nothing
        answer = read_answer(sock, NETWORK_TIMEOUT + 10)
    assert answer.closed and answer.seconds < NETWORK_TIMEOUT + 5, answer
    good_association(listener.port)
    listener.settle(*baseline)


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0xFF, 0x5A])
def test_unknown_pdu_type_is_aborted_at_once(listener: ListenerProcess, pdu_type: int) -> None:
    answer = exchange(listener.port, pdu(pdu_type, b"\x00" * 10))  # we do not close
    assert answer.types == (A_ABORT,) and answer.abort() == (0x02, 0x01)  # unrecognised PDU
    assert answer.closed and answer.seconds < 4, answer


def test_unexpected_pdu_before_association_is_aborted(listener: ListenerProcess) -> None:
    answer = exchange(listener.port, p_data(1, b"\x00" * 20))
    assert answer.types == (A_ABORT,) and answer.abort() == (0x02, 0x02)  # unexpected PDU
    assert answer.closed and answer.seconds < 4


def test_unknown_pdu_type_after_association_is_aborted(listener: ListenerProcess) -> None:
    sock = _raw_association(listener.port)
    with sock:
        sock.sendall(pdu(0x0B, b"\x00" * 10))
        answer = read_answer(sock, 10)
    assert A_ABORT in answer.types and answer.closed and answer.seconds < 4


@pytest.mark.parametrize("data", [
    pdu(0xFF, b"\x00" * 10),
    associate_rq(contexts=presentation_context(2, VERIFICATION, IMPLICIT_VR)),
    associate_rq()[:30],
])
def test_peer_close_frees_the_connection_at_once(listener: ListenerProcess,
                                                 baseline: tuple[int, int],
                                                 data: bytes) -> None:
    """PS3.8 AA-1 / AA-5: nothing is held for the ACSE time-out once the peer has gone."""
    started = time.monotonic()
    for _ in range(5):
        exchange(listener.port, data, close_after=True, timeout=NETWORK_TIMEOUT + 5)
    wait_for(lambda: listener.connections() == 0, timeout=NETWORK_TIMEOUT + 5,
             message="connections closed")
    listener.settle(*baseline, timeout=NETWORK_TIMEOUT + 5)
    assert time.monotonic() - started < NETWORK_TIMEOUT - 1


def test_context_without_transfer_syntax_is_answered_and_leaks_nothing(
        listener: ListenerProcess, baseline: tuple[int, int]) -> None:
    contexts = presentation_context(1, CT_IMAGE_STORAGE) \
        + presentation_context(3, VERIFICATION, IMPLICIT_VR)
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
            sock.sendall(associate_rq(contexts=contexts))
            answer = read_answer(sock, 10, until=A_ASSOCIATE_AC)
            assert answer.types == (A_ASSOCIATE_AC,), answer
            results = _context_results(answer.pdus[0][1])
            assert results[1] != 0 and results[3] == 0, results
            sock.sendall(pdu(A_RELEASE_RQ, bytes(4)))
            assert 0x06 in read_answer(sock, 10).types  # A-RELEASE-RP
        # each one's threads gone before the next: checks for a leak every time, and the next
        # is not refused for MAX_ASSOCIATIONS by released ones whose threads are still ending
        # (CI, under load: A-ASSOCIATE-RJ local-limit-exceeded at once after a release)
        listener.settle(*baseline)
    good_association(listener.port)
    listener.settle(*baseline)


def _context_results(ac_body: bytes) -> dict[int, int]:
    """{presentation context ID: result} of an A-ASSOCIATE-AC's variable items."""
    results = {}
    offset = 68
    while offset + 4 <= len(ac_body):
        kind, _, length = struct.unpack(">BBH", ac_body[offset:offset + 4])
        if kind == 0x21:
            results[ac_body[offset + 4]] = ac_body[offset + 6]
        offset += 4 + length
    return results


# --- negotiation (PS3.8 9.3.2, PS3.7 Annex A and D.3.3) --------------------------------------

ABORT_INVALID = ("abort", (0x02, 0x06))


@pytest.mark.parametrize(("name", "request_pdu", "expected"), [
    ("no application context", associate_rq(application_context=None), ABORT_INVALID),
    ("empty application context", associate_rq(application_context=b""), ABORT_INVALID),
    ("wrong application context", associate_rq(application_context=b"1.2.3.4"),
     ("reject", (0x01, 0x01, 0x02))),
    ("no presentation context", associate_rq(contexts=b""), ABORT_INVALID),
    ("no user information", associate_rq(user_info=b""), ABORT_INVALID),
    ("no maximum length", associate_rq(user_info=user_information(None)), ABORT_INVALID),
    ("even context ID", associate_rq(contexts=presentation_context(2, VERIFICATION,
                                                                   IMPLICIT_VR)),
     ABORT_INVALID),
    ("repeated context ID", associate_rq(
        contexts=presentation_context(1, VERIFICATION, IMPLICIT_VR) * 2), ABORT_INVALID),
    ("context without abstract syntax", associate_rq(
        contexts=item(0x20, bytes([1, 0, 0, 0]) + item(0x40, IMPLICIT_VR))), ABORT_INVALID),
    ("item longer than the PDU", pdu(A_ASSOCIATE_RQ, associate_rq()[6:-10]), ABORT_INVALID),
    ("protocol version 2 only", associate_rq(protocol_version=2),
     ("reject", (0x01, 0x02, 0x02))),
    ("calling AE all spaces", associate_rq(calling=b" " * 16), ("reject", (0x01, 0x01, 0x03))),
    ("calling AE with NULs", associate_rq(calling=b"AB\x00\x00CD"),
     ("reject", (0x01, 0x01, 0x03))),
    ("calling AE not ASCII", associate_rq(calling="SCANNÉR".encode("latin-1")),
     ("reject", (0x01, 0x01, 0x03))),
    ("calling AE with backslash", associate_rq(calling=b"CT\\1"),
     ("reject", (0x01, 0x01, 0x03))),
    ("calling AE with control character", associate_rq(calling=b"CT\x1b1"),
     ("reject", (0x01, 0x01, 0x03))),
    ("called AE all spaces", associate_rq(called=b" " * 16), ("reject", (0x01, 0x01, 0x07))),
])
def test_malformed_associate_rq(listener: ListenerProcess, name: str, request_pdu: bytes,
                                expected: tuple[str, tuple[int, ...]]) -> None:
    answer = exchange(listener.port, request_pdu)
    kind, fields = expected
    if kind == "abort":
        assert answer.types == (A_ABORT,), (name, answer)
        assert answer.abort() == fields, name
    else:
        assert answer.types == (A_ASSOCIATE_RJ,), (name, answer)
        assert answer.reject() == fields, name
    assert answer.closed and answer.seconds < 4, (name, answer)


def test_well_formed_associate_rq_built_here_is_accepted(listener: ListenerProcess) -> None:
    """The builder above makes requests the listener accepts (else the refusals prove
    nothing); an unknown item type and extra protocol version bits are ignored (PS3.8 9.3.1)."""
    extra = item(0x55, b"\x01\x02")
    for request_pdu in (associate_rq(),
                        associate_rq(user_info=user_information() + extra),
                        associate_rq(protocol_version=0x0003),
                        associate_rq(calling=b"  PADDED", called=b"CTDX  ")):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
            sock.sendall(request_pdu)
            answer = read_answer(sock, 10, until=A_ASSOCIATE_AC)
            assert answer.types == (A_ASSOCIATE_AC,), answer
            sock.sendall(pdu(A_RELEASE_RQ, bytes(4)))
            assert 0x06 in read_answer(sock, 10).types


# --- generated PDUs --------------------------------------------------------------------------

def _mutate(data: bytes, position: int, value: int) -> bytes:
    index = position % len(data)
    return data[:index] + bytes([value]) + data[index + 1:]


PDUS = st.one_of(
    st.binary(min_size=1, max_size=300),  # random bytes
    st.builds(lambda kind, length, body: pdu(kind, body, declared=length),
              st.integers(0, 255), st.integers(0, 0xFFFF_FFFF), st.binary(max_size=200)),
    st.builds(_mutate, st.just(associate_rq()), st.integers(0, 10_000), st.integers(0, 255)),
    st.builds(lambda cut: associate_rq()[:cut], st.integers(1, 200)),
    st.builds(lambda calling: associate_rq(calling=calling), st.binary(min_size=0, max_size=16)),
    st.builds(lambda ids: associate_rq(contexts=b"".join(
        presentation_context(i, VERIFICATION, IMPLICIT_VR) for i in ids)),
        st.lists(st.integers(0, 255), max_size=4)),
)


@pytest.fixture(scope="module")
def generated_counter() -> list[int]:
    return [0]


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=PDUS)
def test_generated_pdus_are_answered_and_cost_nothing(listener: ListenerProcess,
                                                      baseline: tuple[int, int],
                                                      generated_counter: list[int],
                                                      data: bytes) -> None:
    """Whatever arrives: an answer PS3.8 allows (AC, RJ, A-ABORT) or a close, promptly, once
    the peer has finished sending; a good association keeps working in between, and threads,
    descriptors and memory come back."""
    answer = exchange(listener.port, data, close_after=True, timeout=NETWORK_TIMEOUT + 5)
    assert answer.closed, answer
    assert set(answer.types) <= {A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT}, answer
    assert answer.seconds < 3, answer
    generated_counter[0] += 1
    if generated_counter[0] % 100 == 0:
        listener.assert_alive()
        good_association(listener.port)
        listener.settle(*baseline)
        assert listener.rss_mb < 300


def test_studies_are_stored_between_hostile_connections(listener: ListenerProcess,
                                                        tmp_path: Path) -> None:
    """A study goes through while hostile connections come and go, and resources stay flat."""
    first = phantom(tmp_path, "first", n_slices=3, size=32)
    assert send_files(listener.port, first.paths) == [0x0000] * 3  # pools, threads warm up
    wait_for(lambda: listener.connections() == 0, timeout=15, message="no connections left")
    threads, fds = listener.threads, listener.fds
    second = phantom(tmp_path, "second", n_slices=3, size=32, study_instance_uid="1.2.826.0.1.9")
    for index, path in enumerate(second.paths):
        exchange(listener.port, pdu(0xFF, bytes(index)), close_after=True)
        exchange(listener.port, associate_rq()[:50], close_after=True)
        assert send_files(listener.port, [path]) == [0x0000]
    listener.settle(threads, fds)
    listener.assert_alive()


def test_refusals_before_association_are_logged_at_a_bounded_rate(
        caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of bad connections must not become thousands of log lines."""
    import logging

    from ctdx.scp.acceptor import QuietLog

    quiet = QuietLog(burst=3, window=10.0)
    caplog.set_level(logging.INFO, logger="ctdx.scp.acceptor")
    for number in range(5):
        quiet(logging.WARNING, "refused %d", number)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2"]
    caplog.clear()
    quiet._start -= 10.0  # the window has passed
    quiet(logging.WARNING, "refused %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "2 more connection(s) refused or closed before association in the last 10 s "
        "(not logged one by one)", "refused 5"]
