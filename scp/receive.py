"""How pynetdicom hands us received data sets: streamed to a file, not held in memory.

With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each C-STORE data
set, as received, into ``tempfile.NamedTemporaryFile()`` (File Meta first) and
gives the handler its path (``event.dataset_path``); it deletes that name after
the handler returns. We point the temporary file at the spool's ``.incoming``
folder so that giving it its final name is a link on the same file system, and
so leftovers of a crash are ours to sweep. A large instance (an Enhanced CT of
hundreds of frames) therefore never sits whole in the listener's memory.

On Linux, every ``WRITEBACK_BYTES`` written also start their write-back
(``sync_file_range``, asynchronous): the disk works while the rest arrives, so
the fsync that makes it durable before success finds most of it done. Not per
fragment: for a 512 kB slice that was five more system calls (and GIL
hand-offs) per instance and measured 10-20% slower receiving; every 8 MiB (the
earlier setting) never started it for a slice; every 256 kB (once or twice per
slice) received a 300-slice study 10-15% faster than every 8 MiB, in
interleaved runs on the 2-core dev VM (every 128 kB: no faster than 8 MiB).
The fast path (:mod:`ctdx.scp.fastpath`) writes through the same class
(:class:`ReceivedFile`), into files prepared ahead (:mod:`ctdx.scp.prepared`).
Both paths hash their files as they are written (:func:`take_digest`), so the
handler does not read them back to compute their SHA-256. Until the seventh
session the fast path left the hash to the store, on another thread beside the
file's fsync; hashing each fragment as it arrives (0.05 ms per 128 kB with
SHA-NI) overlaps the sender's next write instead, and with prepared files it
received a 300-slice study 10-15% faster in interleaved runs
(``benchmarks/results/scp.md``, seventh session).

A file the store never took (the association ended mid-data-set, or the
command was not decodable) is deleted when its association's connection
closes (:func:`discard_unclaimed`), not left for the periodic sweep.

While streaming is on, pynetdicom's decoder is made to tolerate what our
handlers refuse with a status (:mod:`ctdx.scp.command_check`): a C-STORE command
without Affected SOP Instance UID would otherwise raise in pynetdicom's
receiving thread (or, empty, be ignored without a response) and one longer
than 64 characters would fail its validation; either ended the association.
Such a command reaches the handler, which answers 0xC220 or 0xC221.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pynetdicom import _config, dimse_messages

from ctdx.scp.prepared import TEMP_PREFIX, PreparedFiles, is_unnamed, new_named

logger = logging.getLogger(__name__)

__all__ = [
    "MISSING_UID",
    "TEMP_PREFIX",
    "Digest",
    "ReceivedFile",
    "discard_unclaimed",
    "stop_streaming",
    "stream_received_data_sets_to",
    "take_digest",
]

#: What a received C-STORE command without (or with an empty) Affected SOP Instance UID
#: carries instead, so that pynetdicom delivers it to the handler (it ignores such a
#: request without answering); never a UID (letters), refused by the handler as missing.
MISSING_UID = "missing"
_SYNC_FILE_RANGE_WRITE = 2
#: Start write-back each time this much more has been written to a received file.
WRITEBACK_BYTES = 256 * 1024


def _load_sync_file_range() -> Any:
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


# temporary file name -> its writer; weak, so an aborted transfer's entry goes with its file
_digests: weakref.WeakValueDictionary[str, _WritebackFile] = weakref.WeakValueDictionary()
_digests_lock = threading.Lock()


@dataclass(frozen=True)
class Digest:
    size_bytes: int
    sha256: str


def take_digest(path: Path) -> Digest | None:
    """SHA-256 of everything written to a received file, if it was written only by appending.

    ``None`` when unknown (not one of ours, or written in another way): the
    caller then reads the file back.
    """
    with _digests_lock:
        writer = _digests.pop(str(path), None)
    if writer is None or writer.broken or writer.hash is None:
        return None
    try:
        size = os.fstat(writer.fd).st_size
    except OSError:
        size = os.stat(path).st_size
    if size != writer.size:
        return None
    return Digest(writer.size, writer.hash.hexdigest())


class _WritebackFile:
    """The file object pynetdicom writes to: hashes what is appended, starts write-back."""

    def __init__(self, file: IO[bytes], name: str, hashing: bool = True) -> None:
        self._file = file
        self._fd = file.fileno()
        self.fd = self._fd
        self.name = name
        self.owner = threading.get_ident()  # the association's receiving (DUL) thread
        self.hash = hashlib.sha256() if hashing else None
        self.size = 0
        self._unsynced = 0
        self.broken = False
        with _digests_lock:
            _digests[name] = self

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        if written != len(data):
            self.broken = True
        if self.hash is not None:
            self.hash.update(data)
        self.size += len(data)
        self._unsynced += len(data)
        return written

    def seek(self, *args: Any) -> int:
        self.broken = True  # no longer a plain append: the digest is unknown
        return self._file.seek(*args)

    def close(self) -> None:
        self._file.close()

    def flush(self) -> None:
        self._file.flush()
        if _sync_file_range is not None and self._unsynced >= WRITEBACK_BYTES:
            self._unsynced = 0
            _sync_file_range(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class ReceivedFile:
    """A new file for one data set in the incoming folder, written like pynetdicom's (the fast
    path's).

    Taken from the listener's :class:`~ctdx.scp.prepared.PreparedFiles` (unnamed
    where the file system allows, see :mod:`ctdx.scp.prepared`), or created named
    with the prefix of pynetdicom's files (so a crash's leftover is swept); same
    write-back. Hashed while written when ``hashing`` (see the module's docstring).
    """

    def __init__(self, incoming: Path | PreparedFiles, hashing: bool = False) -> None:
        opened = incoming.take() if isinstance(incoming, PreparedFiles) else new_named(incoming)
        self.path = opened.path
        self._writer = _WritebackFile(opened.file, str(opened.path), hashing)

    @property
    def named(self) -> bool:
        """Whether the file has a name of its own in the folder (not an unnamed one)."""
        return not is_unnamed(self.path)

    def write(self, data: bytes | memoryview) -> None:
        self._writer.write(data)  # type: ignore[arg-type]

    def flush(self) -> None:
        """Hand what was written to the kernel; start write-back every ``WRITEBACK_BYTES``."""
        self._writer.flush()

    def discard(self) -> None:
        """Close it and delete its temporary name (the store has linked what it keeps; an
        unnamed file is gone once closed, unless the store gave it a name)."""
        try:
            self._writer.close()
        finally:
            if self.named:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass


def discard_unclaimed(owner: threading.Thread) -> int:
    """Delete the files ``owner`` (a DUL thread) received that no store took; how many.

    Called when the association's connection closed: a data set still being
    written then will never complete. One the store took (:func:`take_digest`)
    is the store's and pynetdicom's to remove.
    """
    with _digests_lock:
        mine = [(name, writer) for name, writer in _digests.items()
                if writer.owner == owner.ident]
        for name, _ in mine:
            del _digests[name]
    for name, writer in mine:
        try:
            writer.close()
        except OSError:
            pass
        if is_unnamed(Path(name)):
            continue  # closed, so gone
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    if mine:
        logger.info("removed %d unfinished received file(s) of a closed association", len(mine))
    return len(mine)


def _temporary_file_in(incoming: Path) -> Any:
    def factory(**kwargs: Any) -> Any:
        wrapper = tempfile.NamedTemporaryFile(dir=str(incoming), prefix=TEMP_PREFIX, **kwargs)
        wrapper.file = _WritebackFile(wrapper.file, wrapper.name)  # type: ignore[assignment]
        return wrapper

    return factory


def _tolerant_uid(value: Any) -> tuple[bool, str]:
    """pynetdicom's UI validator without its 64-character limit (the handlers check UIDs)."""
    if not isinstance(value, str):
        return False, "must be pydicom.uid.UID"
    return (True, "") if value else (False, "must not be an empty str")


def _tolerant_decode(original: Any) -> Any:
    """pynetdicom's command set decoder, marking a C-STORE's absent instance UID."""
    def decode(*args: Any, **kwargs: Any) -> Any:
        command_set = original(*args, **kwargs)
        if command_set is not None and command_set.get("CommandField") == 0x0001:
            uid = command_set.get("AffectedSOPInstanceUID")
            if isinstance(uid, list | tuple | MultiValue):  # a backslash: no UID (0xC221)
                command_set.AffectedSOPInstanceUID = "multi-valued"
            elif not str(uid or "").strip("\x00 "):
                command_set.AffectedSOPInstanceUID = MISSING_UID
        return command_set

    return decode


def _tolerant_file_meta_writer(original: Any) -> Any:
    def write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
        try:
            original(fp, file_meta, enforce_standard=enforce_standard)
        except (AttributeError, ValueError, UnicodeError):
            # the command's UIDs are missing or not encodable: the handler refuses it before
            # reading the file, which only needs to stay a file
            placeholder = FileMetaDataset()
            placeholder.TransferSyntaxUID = file_meta.get("TransferSyntaxUID")
            original(fp, placeholder, enforce_standard=False)

    return write_file_meta_info


_lock = threading.Lock()
_users = 0
_saved: tuple[bool, Any, Any, Any, Any] | None = None


def stream_received_data_sets_to(incoming: Path) -> None:
    """Make pynetdicom stream every received C-STORE data set into a file in ``incoming``.

    Process-wide (pynetdicom's switch is a module global). Counted: the last
    :func:`stop_streaming` restores pynetdicom's defaults, so other pynetdicom
    receivers in the same process (tests, the demo PACS) are left as they were.
    """
    global _users, _saved
    if not hasattr(dimse_messages, "NamedTemporaryFile"):
        raise RuntimeError("this pynetdicom does not stream data sets to temporary files")
    with _lock:
        if _users == 0:
            writer = getattr(dimse_messages, "write_file_meta_info")  # noqa: B009
            decoder = getattr(dimse_messages, "decode")  # noqa: B009
            _saved = (_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile,
                      writer, _config.VALIDATORS["UI"], decoder)
            setattr(dimse_messages, "write_file_meta_info",  # noqa: B010
                    _tolerant_file_meta_writer(writer))
            setattr(dimse_messages, "decode", _tolerant_decode(decoder))  # noqa: B010
            _config.VALIDATORS["UI"] = _tolerant_uid
        _users += 1
        _config.STORE_RECV_CHUNKED_DATASET = True
        setattr(dimse_messages, "NamedTemporaryFile", _temporary_file_in(incoming))  # noqa: B010


def stop_streaming() -> None:
    """Undo one :func:`stream_received_data_sets_to`."""
    global _users, _saved
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0 and _saved is not None:
            _config.STORE_RECV_CHUNKED_DATASET = _saved[0]
            setattr(dimse_messages, "NamedTemporaryFile", _saved[1])  # noqa: B010
            setattr(dimse_messages, "write_file_meta_info", _saved[2])  # noqa: B010
            _config.VALIDATORS["UI"] = _saved[3]
            setattr(dimse_messages, "decode", _saved[4])  # noqa: B010
            _saved = None
