"""The C-STORE fast path (scp/fastpath.py): same bytes as pynetdicom, clean fallbacks and failures.

Raw PDUs are written on a real association's socket where a test needs a
framing that pynetdicom's requestor would never produce (a command split over
fragments, a command and its data in one PDU, a broken data set).
"""

from __future__ import annotations

import hashlib
import resource
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from ctdx.db import migrate
from ctdx.db.models import Instance
from ctdx.db.session import session_scope
from ctdx.scp.fastpath import (
    StoreCommand,
    _encode_response,
    _pynetdicom_response_pdus,
    encode_file_meta,
    fast_path_allowed,
    parse_store_command,
    response_pdus,
)
from ctdx.scp.status import Status, status_dataset
from tests.conftest import wait_for
from tests.scp.conftest import (
    Running,
    associate,
    chunked_send,
    phantom,
    send_files,
    status_of,
)

CT = str(CTImageStorage)
UID_ODD = "1.2.826.0.1.3680043.8.498.1055868216598829884275730475571"  # 57 characters
UID_EVEN = "1.2.826.0.1.3680043.8.498.10558682165988298842757304755712"  # 58


# --- units -------------------------------------------------------------------------------------

def _store_command_set(sop_instance_uid: str = UID_ODD, message_id: int = 7,
                       with_data: bool = True, move: bool = False) -> bytes:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.Priority = 2
    if move:
        request.MoveOriginatorApplicationEntityTitle = "MOVER"
        request.MoveOriginatorMessageID = 3
    if with_data:
        request.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    if not with_data:
        message.command_set.CommandDataSetType = 0x0101
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return bytes(encoded)


def test_parse_store_command_reads_what_pynetdicom_encodes() -> None:
    for uid in (UID_ODD, UID_EVEN):
        for move in (False, True):
            command = parse_store_command(memoryview(_store_command_set(uid, 513, move=move)))
            assert command == StoreCommand(513, CT, uid)


def test_parse_store_command_leaves_everything_else_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo_message = C_ECHO_RQ()
    echo_message.primitive_to_message(echo)
    echo_bytes = bytes(encode(echo_message.command_set, True, True) or b"")
    full = _store_command_set()
    unknown = full + struct.pack("<HHL", 0x0000, 0x5010, 2) + b"AB"  # not a C-STORE-RQ element
    for raw in (echo_bytes, _store_command_set(with_data=False), full[:-3], unknown,
                struct.pack("<HHL", 0x0008, 0x0016, 0)):
        assert parse_store_command(memoryview(raw)) is None


def test_parse_store_command_keeps_an_invalid_instance_uid_for_its_refusal() -> None:
    not_ascii = _store_command_set().replace(UID_ODD.encode(), b"1.2.\xe9" + UID_ODD.encode()[5:])
    command = parse_store_command(memoryview(not_ascii))
    assert command is not None and command.sop_instance_uid == "1.2.\xe9" + UID_ODD[5:]


def test_file_meta_is_the_bytes_pynetdicom_writes() -> None:
    for sop_instance in (UID_ODD, UID_EVEN):
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.70"):
            expected = BytesIO()
            expected.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(expected, create_file_meta(  # type: ignore[arg-type]
                sop_class_uid=pydicom.uid.UID(CT),
                sop_instance_uid=pydicom.uid.UID(sop_instance),
                transfer_syntax=pydicom.uid.UID(syntax),
            ))
            assert encode_file_meta(CT, sop_instance, syntax) == expected.getvalue()


def _acceptor() -> Association:
    assoc = Association(AE(), "acceptor")
    assoc.requestor.maximum_length = 16382
    return assoc


def test_responses_are_the_bytes_pynetdicom_sends() -> None:
    assoc = _acceptor()
    statuses: list[int | Dataset] = [
        0x0000, 0xA700, status_dataset(Status.SUCCESS),
        status_dataset(Status.PIXEL_DATA_INCONSISTENT, "Pixel Data length 9, header implies 10"),
        status_dataset(Status.DUPLICATE_SOP_INSTANCE, "odd length comment"),
    ]
    for uid in (UID_ODD, UID_EVEN):
        for status in statuses:
            command = StoreCommand(65535, CT, uid)
            fast = _encode_response(command, 3, status, assoc.dimse.maximum_pdu_size)
            assert fast is not None
            assert [fast] == _pynetdicom_response_pdus(assoc, command, 3, status)


def test_unusual_statuses_and_small_peer_pdus_are_built_by_pynetdicom() -> None:
    assoc = _acceptor()
    command = StoreCommand(1, CT, UID_ODD)
    offending = status_dataset(Status.CANNOT_PARSE, "bad")
    offending.OffendingElement = [0x00080016]
    assert _encode_response(command, 1, offending, 16382) is None
    assert response_pdus(assoc, command, 1, offending) == _pynetdicom_response_pdus(
        assoc, command, 1, offending)
    assert _encode_response(command, 1, 0, 64) is None  # pynetdicom fragments the command set
    assoc.requestor.maximum_length = 64
    assert len(response_pdus(assoc, command, 1, 0)) > 1


def test_a_bound_low_level_handler_turns_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")  # pynetdicom's debug logging
    assert not fast_path_allowed(_acceptor())
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the listener sets it
    assoc = _acceptor()
    assert fast_path_allowed(assoc)
    assoc.bind(evt.EVT_PDU_RECV, lambda event: None)
    assert not fast_path_allowed(assoc)


# --- real listener ----------------------------------------------------------------------------

def _stored(running: Running) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (spool path, SHA-256 in the database)."""
    with session_scope(running.engine) as s:
        return {i.sop_instance_uid: (i.path, i.sha256) for i in s.scalars(select(Instance))}


def test_fast_path_and_pynetdicom_store_identical_files(
    tmp_path: Path, start_scp_sqlite: Callable[..., Running]
) -> None:
    series = phantom(tmp_path, n_slices=4, size=64)
    plain_url = f"sqlite:///{tmp_path / 'plain.db'}"
    migrate.upgrade(plain_url)
    fast = start_scp_sqlite(fast_receive=True, data_dir=tmp_path / "fast")
    plain = start_scp_sqlite(fast_receive=False, data_dir=tmp_path / "plain",
                             database_url=plain_url)
    assert send_files(fast.port, series.paths) == [0] * 4
    assert send_files(plain.port, series.paths) == [0] * 4
    wait_for(lambda: fast.instance_count() == plain.instance_count() == 4, timeout=20,
             message="rows on both")
    assert fast.service.listener.fast_path_answers == 4
    assert plain.service.listener.fast_path_answers == 0
    fast_rows, plain_rows = _stored(fast), _stored(plain)
    assert fast_rows == plain_rows and len(fast_rows) == 4
    for relative, sha256 in fast_rows.values():
        data = (fast.spool / relative).read_bytes()
        assert data == (plain.spool / relative).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256
    assert fast.incoming_files() == [] and plain.incoming_files() == []


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, fragment) PDVs."""
    items = b"".join(struct.pack(">LBB", len(data) + 2, cid, control) + data
                     for cid, control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0x00, len(items)) + items


def _data_set_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file, without preamble and File Meta (explicit VR LE meta)."""
    raw = path.read_bytes()
    group_length = struct.unpack_from("<L", raw, 140)[0]
    return raw[144 + group_length:]


@contextmanager
def _raw_association(running: Running) -> Iterator[tuple[Association, int, list[int]]]:
    """An association to write raw PDUs on; the statuses of the C-STORE responses it gets."""
    statuses: list[int] = []

    def on_message(event: evt.Event) -> None:
        command_set = event.message.command_set
        if command_set.CommandField == 0x8001:  # C-STORE-RSP
            statuses.append(int(command_set.Status))

    with associate(running.port, [ExplicitVRLittleEndian],
                   evt_handlers=[(evt.EVT_DIMSE_RECV, on_message)]) as assoc:
        assert assoc.is_established
        context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT)
        yield assoc, int(context.context_id or 0), statuses


@pytest.mark.parametrize("framing", ["command split over two fragments",
                                     "command and data in one PDU"])
def test_unusual_framings_are_stored(
    tmp_path: Path, scp_sqlite: Running, framing: str
) -> None:
    series = phantom(tmp_path, n_slices=1, size=64)
    uid = series.sop_instance_uids[0]
    command = _store_command_set(uid, message_id=1)
    data = _data_set_bytes(series.paths[0])
    with _raw_association(scp_sqlite) as (assoc, cid, statuses):
        send = assoc.dul.socket.send  # type: ignore[union-attr]
        if framing == "command split over two fragments":  # pynetdicom assembles it
            send(_pdu((cid, 0x01, command[:20])))
            send(_pdu((cid, 0x03, command[20:])))
            send(_pdu((cid, 0x00, data[:1000]), (cid, 0x02, data[1000:])))
            expected_fast = 0
        else:
            send(_pdu((cid, 0x03, command), (cid, 0x00, data[:1000]), (cid, 0x02, data[1000:])))
            expected_fast = 1
        assert wait_for(lambda: statuses, timeout=10, message="response") == [0x0000]
    assert scp_sqlite.service.listener.fast_path_answers == expected_fast
    wait_for(lambda: scp_sqlite.instance_count() == 1, timeout=20, message="row")
    (relative, _), = _stored(scp_sqlite).values()
    stored = pydicom.dcmread(scp_sqlite.spool / relative)
    original = pydicom.dcmread(series.paths[0])
    assert stored.SOPInstanceUID == uid and stored.PixelData == original.PixelData
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize("ending", ["command fragment inside the data set", "A-ABORT"])
def test_a_data_set_cut_short_leaves_nothing_and_the_listener_serves_on(
    tmp_path: Path, scp_sqlite: Running, ending: str
) -> None:
    series = phantom(tmp_path, n_slices=1, size=64)
    command = _store_command_set(series.sop_instance_uids[0], message_id=1)
    data = _data_set_bytes(series.paths[0])
    with _raw_association(scp_sqlite) as (assoc, cid, statuses):
        send = assoc.dul.socket.send  # type: ignore[union-attr]
        send(_pdu((cid, 0x03, command)))
        send(_pdu((cid, 0x00, data[:1000])))
        wait_for(lambda: scp_sqlite.incoming_files(), timeout=10, message="partial file")
        if ending == "A-ABORT":
            assoc.abort()
        else:
            send(_pdu((cid, 0x03, command)))
            wait_for(lambda: assoc.is_aborted, timeout=10, message="abort by the listener")
    assert statuses == []
    wait_for(lambda: scp_sqlite.incoming_files() == [], timeout=10, message="partial file gone")
    assert scp_sqlite.instance_count() == 0 and scp_sqlite.spool_files() == []
    assert send_files(scp_sqlite.port, series.paths) == [0]
    with associate(scp_sqlite.port) as assoc:
        assert status_of(assoc.send_c_echo()) == 0x0000


def test_a_write_failure_mid_data_set_is_answered_and_the_association_goes_on(
    tmp_path: Path, scp_sqlite: Running
) -> None:
    """A data set the spool cannot take (here: over the process's file size limit) gets 0xA701
    with its reason; nothing is left behind and the same association stores the next one."""
    big = phantom(tmp_path, "big", n_slices=1, size=512)  # ~525 kB
    small = phantom(tmp_path, "small", n_slices=1, size=64)
    syntax = ExplicitVRLittleEndian
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with chunked_send(), associate(scp_sqlite.port, [syntax]) as assoc:
            resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
            try:
                refused = assoc.send_c_store(big.paths[0])
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            assert status_of(refused) == Status.OUT_OF_RESOURCES_STORAGE
            assert refused.ErrorComment == "instance could not be written to the spool"
            assert status_of(assoc.send_c_store(small.paths[0])) == 0x0000
    finally:
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert scp_sqlite.service.listener.fast_path_answers == 2
    wait_for(lambda: scp_sqlite.instance_count() == 1, timeout=20, message="row")
    assert list(_stored(scp_sqlite)) == [small.sop_instance_uids[0]]
    assert scp_sqlite.incoming_files() == []


def test_received_files_start_write_back_per_256_kib_not_per_fragment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctdx.scp import receive

    calls: list[int] = []
    monkeypatch.setattr(receive, "_sync_file_range", lambda fd, *args: calls.append(fd))
    received = receive.ReceivedFile(tmp_path)
    fragment = memoryview(bytes(65_536))
    received.write(fragment)
    received.flush()
    assert calls == []  # not per fragment
    for _ in range(7):  # a 512 kB slice in 64 kB fragments: twice, after 256 and 512 kB
        received.write(fragment)
        received.flush()
    assert len(calls) == 2
    # a file not hashed while written has no digest: the store hashes it beside its fsync
    assert receive.take_digest(received.path) is None
    received.discard()
    assert list(tmp_path.iterdir()) == []
    hashed = receive.ReceivedFile(tmp_path, hashing=True)  # as pynetdicom's files are
    for _ in range(3):
        hashed.write(fragment)
        hashed.flush()
    digest = receive.take_digest(hashed.path)
    assert digest is not None and digest.size_bytes == 3 * 65_536
    assert digest.sha256 == hashlib.sha256(bytes(3 * 65_536)).hexdigest()
    hashed.discard()
    assert list(tmp_path.iterdir()) == []
