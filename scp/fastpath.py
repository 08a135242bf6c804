"""The C-STORE fast path: storage requests read, stored and answered on the DUL thread.

pynetdicom turns each received P-DATA-TF PDU into a PDU object, a P-DATA
primitive, a state-machine event and a DIMSE message, hands the complete
message to the association thread, which calls our handler, then hands the
response back to the DUL thread to encode and send: two thread hand-offs and
several copies of every 128 kB fragment per instance. On a 2-core machine that
was most of the listener's CPU (measured: a pynetdicom handler that does
nothing receives less than half of what dcmtk's storescp does; this path is
1.6-1.7x pynetdicom's receive path, see ``benchmarks/results/scp.md``).

Here the DUL thread reads each P-DATA-TF PDU into one reused buffer and, for a
C-STORE request on an accepted storage context, writes the data set fragments
straight from that buffer into a file of the same folder (prepared ahead and
unnamed where the file system allows, :mod:`ctdx.scp.prepared`; same File Meta,
same digest while writing as pynetdicom's), calls the
listener's store function, and sends the C-STORE response PDU itself. State
Sta6 stays Sta6, as pynetdicom's DT-1 and DT-2 actions would leave it.

A C-STORE whose command the listener refuses (its SOP class is not the
context's, its Affected SOP Instance UID missing or invalid: see
:mod:`ctdx.scp.command_check`) is read to its end without writing anything and
answered with that status; the association goes on.

Everything else goes to pynetdicom unchanged, PDU by PDU: other commands
(C-ECHO, MPPS N-CREATE/N-SET), a command set split over several fragments, a
command with elements this parser does not know, a context that is not a
storage context, any PDU while pynetdicom is assembling a message, and every
association that has a handler bound to pynetdicom's PDU-, data- or DIMSE-level
notification events (debug logging): those would miss events here. A PDV that
breaks the protocol mid-message (a command fragment, another context) is an
invalid PDU (Evt19): pynetdicom aborts the association. A data set the spool
cannot take (disk full, I/O error) is read to its end and answered with the
failure. Either way, and when the association ends mid-data-set, the partial
file is deleted.

The response (a status, at most an Error Comment) is encoded here; anything
else, or a response longer than the peer's maximum PDU, is built by
pynetdicom's own classes. ``tests/scp/test_fastpath.py`` holds both to
pynetdicom's bytes, and checks the fallbacks.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.service_class import StorageServiceClass

from ctdx.scp.command_check import check_store_command
from ctdx.scp.command_set import command_set, value_bytes
from ctdx.scp.prepared import PreparedFiles
from ctdx.scp.receive import ReceivedFile
from ctdx.scp.status import Rejected, Status, status_dataset
from ctdx.scp.uids import is_valid_uid

logger = logging.getLogger(__name__)

__all__ = [
    "FastStoreConfig",
    "FastStoreReceiver",
    "ProtocolError",
    "StoreCommand",
    "StoreFunction",
    "Tally",
    "encode_file_meta",
    "fast_path_allowed",
    "parse_store_command",
    "response_pdus",
]

#: The listener's store: (association, received file, transfer syntax, SOP Class UID,
#: SOP Instance UID) -> status (an int or a status dataset), as an EVT_C_STORE handler.
StoreFunction = Callable[[Association, Path, str, str, str], "int | Dataset"]

_PDV = struct.Struct(">LBB")  # item length, presentation context ID, message control header
_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")

_STATUS_TAG = 0x00000900
_ERROR_COMMENT_TAG = 0x00000902
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
# (0000,eeee) elements a C-STORE-RQ may carry (PS3.7 table 9.1-1)
_STORE_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030,
                             0x1031})

#: Notification events whose handlers the fast path would not call: with any of these
#: bound (pynetdicom's standard debug logging binds several), pynetdicom receives everything.
LOW_LEVEL_EVENTS = (
    evt.EVT_DATA_RECV, evt.EVT_DATA_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT,
    evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT,
)


class Tally:
    """A thread-safe count (instances answered on the fast path, for tests and logs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self) -> None:
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        return self._value


@dataclass(frozen=True)
class FastStoreConfig:
    """What the listener gives the fast path: its store, the SOP classes, and the files it
    prepares in its incoming folder."""

    store: StoreFunction
    sop_classes: frozenset[str]
    incoming: PreparedFiles
    answered: Tally = field(default_factory=Tally)


class ProtocolError(Exception):
    """A P-DATA-TF PDU that breaks PS3.8 in a way pynetdicom answers with an A-ABORT."""


@dataclass(frozen=True)
class StoreCommand:
    """What the fast path needs of a C-STORE-RQ command set."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str | None  # None: absent; not ASCII: decoded as Latin-1 (refused)


def _uid_for_log(value: str | None) -> str:
    return value if value is not None and is_valid_uid(value) else "(invalid UID)"


def _text(value: memoryview) -> str | None:
    """An ASCII value without its padding; ``None`` when not ASCII (pynetdicom decodes it)."""
    raw = bytes(value)
    return raw.decode("ascii").rstrip("\x00 ") if raw.isascii() else None


def parse_store_command(raw: memoryview) -> StoreCommand | None:
    """A C-STORE-RQ command set that announces a data set; ``None`` for anything else.

    Only the elements a C-STORE-RQ may hold are accepted, each with a sane length;
    whatever this does not recognise is left to pynetdicom's general decoder. The
    Affected SOP Instance UID may be absent or invalid: the caller refuses it.
    """
    values: dict[int, memoryview] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        offset += 8
        if group != 0 or element not in _STORE_ELEMENTS or offset + length > end:
            return None
        values[element] = raw[offset:offset + length]
        offset += length
    try:
        field = values[0x0100]
        message_id = values[0x0110]
        data_set_type = values[0x0800]
        sop_class = values[0x0002]
    except KeyError:
        return None
    if len(field) != 2 or len(message_id) != 2 or len(data_set_type) != 2:
        return None
    if _US.unpack(field)[0] != _C_STORE_RQ or _US.unpack(data_set_type)[0] == _NO_DATA_SET:
        return None
    if not 0 < len(sop_class) <= 64:
        return None
    sop_class_uid = _text(sop_class)
    if sop_class_uid is None:
        return None
    sop_instance = values.get(0x1000)
    sop_instance_uid = (None if sop_instance is None
                        else bytes(sop_instance).decode("latin-1").rstrip("\x00 "))
    return StoreCommand(_US.unpack(message_id)[0], sop_class_uid, sop_instance_uid)


def fast_path_allowed(assoc: Association) -> bool:
    """Whether no handler is bound to an event the fast path would not trigger."""
    return not any(assoc.get_handlers(event) for event in LOW_LEVEL_EVENTS)


def _explicit(group_element: int, vr: str, value: str) -> bytes:
    """One File Meta element, explicit VR little endian, short length form."""
    encoded = value_bytes(vr, value)
    if encoded is None:
        raise ValueError(f"VR {vr} not handled")
    return (struct.pack("<HH", 0x0002, group_element) + vr.encode("ascii")
            + struct.pack("<H", len(encoded)) + encoded)


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta group pynetdicom writes before a streamed data set.

    The bytes of pydicom's ``write_file_meta_info`` for pynetdicom's ``create_file_meta``
    (a test holds them equal), without building a dataset for each instance.
    """
    body = (
        struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<L", 2) + b"\x00\x01"
        + _explicit(0x0002, "UI", sop_class_uid)
        + _explicit(0x0003, "UI", sop_instance_uid)
        + _explicit(0x0010, "UI", transfer_syntax_uid)
        + _explicit(0x0012, "UI", str(PYNETDICOM_IMPLEMENTATION_UID))
        + _explicit(0x0013, "SH", PYNETDICOM_IMPLEMENTATION_VERSION)
    )
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _Incoming:
    """One C-STORE data set being written to its temporary file.

    A write that fails (disk full, I/O error) does not break the association:
    the rest of the data set is read and dropped, and the request is answered
    with the failure (:attr:`failure`) instead of calling the store.
    """

    def __init__(self, command: StoreCommand, context_id: int, transfer_syntax: str,
                 incoming: PreparedFiles, refused: Rejected | None = None) -> None:
        self.command = command
        self.context_id = context_id
        self.transfer_syntax = transfer_syntax
        self.failure: Dataset | None = None
        self.file: ReceivedFile | None = None
        if refused is not None:  # read to its end, written nowhere
            self.failure = status_dataset(refused.status, refused.reason)
            return
        assert command.sop_instance_uid is not None
        try:
            self.file = ReceivedFile(incoming, hashing=True)
            self.file.write(encode_file_meta(
                command.sop_class_uid, command.sop_instance_uid, transfer_syntax))
        except OSError as exc:
            self._failed(exc)

    @property
    def path(self) -> Path:
        assert self.file is not None
        return self.file.path

    def write(self, fragment: memoryview) -> None:
        if self.file is None:
            return
        try:
            self.file.write(fragment)
            self.file.flush()  # as pynetdicom does for each fragment: starts write-back
        except OSError as exc:
            self._failed(exc)

    def discard(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            file.discard()

    def _failed(self, exc: OSError) -> None:
        self.discard()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.failure = status_dataset(Status.OUT_OF_RESOURCES, "disk full")
        else:
            self.failure = status_dataset(Status.OUT_OF_RESOURCES_STORAGE,
                                          "instance could not be written to the spool")
        logger.error("C-STORE of %s: received data set not written (%s); answering 0x%04X",
                     _uid_for_log(self.command.sop_instance_uid),
                     exc.strerror or type(exc).__name__, int(self.failure.Status))


class FastStoreReceiver:
    """The fast path of one association; used only from its DUL thread."""

    def __init__(self, assoc: Association, config: FastStoreConfig) -> None:
        self._assoc = assoc
        self._store = config.store
        self._sop_classes = config.sop_classes
        self._incoming_dir = config.incoming
        self._answered = config.answered
        self._incoming: _Incoming | None = None

    def take(self, body: memoryview, send: Callable[[bytes], None]) -> bool:
        """Process one P-DATA-TF PDU's body (what follows its 6-byte header).

        ``True``: consumed (and answered when it completed a C-STORE); ``False``:
        untouched, for pynetdicom. Raises :class:`ProtocolError`.
        """
        if self._incoming is None:
            first = self._begin(body)
            if first is None:
                return False
            offset = first
        else:
            offset = 0
        end = len(body)
        while offset < end:
            if offset + 6 > end:
                raise ProtocolError("truncated PDV item")
            length, context_id, control = _PDV.unpack_from(body, offset)
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError(f"PDV item length {length} does not fit the PDU")
            incoming = self._incoming
            if incoming is None:  # data after the last fragment, in the same PDU
                raise ProtocolError("data set fragment after the last one")
            if control & 1 or context_id != incoming.context_id:
                raise ProtocolError("command fragment or other context inside a data set")
            incoming.write(body[offset + 6:offset + 4 + length])
            offset += 4 + length
            if control & 2:
                self._incoming = None
                self._finish(incoming, send)
        return True

    def close(self) -> None:
        """The association ended: delete a partly received data set."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.discard()

    def _begin(self, body: memoryview) -> int | None:
        """Start a C-STORE if ``body`` opens with its whole command set; the data offset."""
        assoc = self._assoc
        if assoc.dimse.message is not None or len(body) < 6:
            return None  # pynetdicom is assembling a message: it gets the rest too
        length, context_id, control = _PDV.unpack_from(body, 0)
        if control & 3 != 3 or length < 2 or 4 + length > len(body):
            return None
        command = parse_store_command(body[6:4 + length])
        if command is None:
            return None
        context = assoc._accepted_cx.get(context_id)
        if context is None or context.abstract_syntax not in self._sop_classes:
            return None
        if not context.transfer_syntax:
            return None
        refused = check_store_command(str(context.abstract_syntax), command.sop_class_uid,
                                      command.sop_instance_uid)
        if refused is not None:
            logger.warning(
                "C-STORE from %s refused with 0x%04X: %s (SOP Instance UID %s)",
                str(assoc.requestor.ae_title or "").strip(), int(refused.status),
                refused.reason, _uid_for_log(command.sop_instance_uid),
            )
        self._incoming = _Incoming(command, context_id, str(context.transfer_syntax[0]),
                                   self._incoming_dir, refused)
        return int(4 + length)

    def _finish(self, incoming: _Incoming, send: Callable[[bytes], None]) -> None:
        command = incoming.command
        status: int | Dataset
        try:
            if incoming.failure is not None:
                status = incoming.failure
            elif command.sop_instance_uid is None:  # refused in _begin: never here
                status = Status.CANNOT_PARSE
            else:
                status = self._store(self._assoc, incoming.path, incoming.transfer_syntax,
                                     command.sop_class_uid, command.sop_instance_uid)
        except Exception as exc:  # as pynetdicom answers a failing EVT_C_STORE handler
            logger.error("Exception in the C-STORE handler (SOP Instance UID %s)",
                         _uid_for_log(command.sop_instance_uid))
            logger.exception(exc)
            status = 0xC211
        finally:
            incoming.discard()
        for pdu in response_pdus(self._assoc, command, incoming.context_id, status):
            send(pdu)
        self._answered.add()


def response_pdus(assoc: Association, command: StoreCommand, context_id: int,
                  status: int | Dataset) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of a C-STORE response, as pynetdicom would send them."""
    fast = _encode_response(command, context_id, status, assoc.dimse.maximum_pdu_size)
    if fast is not None:
        return [fast]
    return _pynetdicom_response_pdus(assoc, command, context_id, status)


def _encode_response(command: StoreCommand, context_id: int, status: int | Dataset,
                     max_pdu: int) -> bytes | None:
    """One P-DATA-TF PDU of the response for a status with at most an Error Comment."""
    comment: str | None = None
    if isinstance(status, Dataset):
        if set(status.keys()) - {_STATUS_TAG, _ERROR_COMMENT_TAG} or "Status" not in status:
            return None
        comment = status.get("ErrorComment")
        status = status.Status
    if not isinstance(status, int) or not 0 <= status <= 0xFFFF:
        return None
    if comment is not None and not isinstance(comment, str):
        return None
    elements: list[tuple[int, str, Any]] = [
        (0x0002, "UI", command.sop_class_uid),
        (0x0100, "US", 0x8001),
        (0x0120, "US", command.message_id),
        (0x0800, "US", _NO_DATA_SET),
        (0x0900, "US", status),
    ]
    if comment:
        elements.append((0x0902, "LO", comment))
    if _echoed(command.sop_instance_uid):
        elements.append((0x1000, "UI", command.sop_instance_uid))
    encoded = command_set(elements)  # None: text that is not ASCII
    if encoded is None:
        return None
    pdv_length = 2 + len(encoded)
    if max_pdu and 4 + pdv_length > max_pdu:
        return None  # pynetdicom fragments it
    return (struct.pack(">BBL", 0x04, 0x00, 4 + pdv_length)
            + _PDV.pack(pdv_length, context_id, 0x03) + encoded)


def _echoed(sop_instance_uid: str | None) -> bool:
    """Whether the response repeats the Affected SOP Instance UID (optional in a C-STORE-RSP,
    PS3.7 table 9.1-1): only a valid one, so the response itself is always valid."""
    return sop_instance_uid is not None and is_valid_uid(sop_instance_uid)


def _pynetdicom_response_pdus(assoc: Association, command: StoreCommand, context_id: int,
                              status: int | Dataset) -> list[bytes]:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = command.message_id
    rsp.AffectedSOPClassUID = command.sop_class_uid
    if _echoed(command.sop_instance_uid):
        rsp.AffectedSOPInstanceUID = command.sop_instance_uid
    rsp = StorageServiceClass(assoc).validate_status(status, rsp)
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    pdus = []
    for primitive in message.encode_msg(context_id, assoc.dimse.maximum_pdu_size):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus
