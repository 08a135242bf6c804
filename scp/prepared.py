"""Files for received data sets, created ahead of time and nameless until stored.

Creating a file in the incoming folder was the slowest step of receiving a
slice on the sixth and seventh sessions' VMs: 0.4-0.9 ms of about 2 ms per
512 kB instance. A new inode and directory entry wait behind the journal
commit that the previous instance's fsyncs started (ext4), and the sender
waits meanwhile. :class:`PreparedFiles` keeps a few files open and ready, and
a thread of its own replaces each one taken, while the receiving thread reads
the network. Measured in ``benchmarks/results/scp.md`` (seventh session).

Where the file system offers ``O_TMPFILE`` (Linux: ext4, XFS, btrfs, tmpfs),
the files are unnamed: nothing is in the incoming folder for a sweep to take
(or for an operator to wonder about), and nothing is left after a crash: the
kernel frees an unnamed file when its last descriptor closes, and the file
system on its next mount after a power cut. Such a file is reached through
``/proc/self/fd/<n>`` while it is open; :func:`hard_link` gives it its names
in the spool. Elsewhere (NFS, which has no ``O_TMPFILE``, or not Linux) each
file is named and created when a transfer starts, as before.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

__all__ = ["TEMP_PREFIX", "OpenFile", "PreparedFiles", "hard_link", "is_unnamed", "new_named"]

TEMP_PREFIX = "rx-"
#: Files kept ready: enough for a few associations that finish an instance at once.
DEPTH = 4
_FD_LINKS = "/proc/self/fd"


@dataclass(frozen=True)
class OpenFile:
    """A new, empty file opened for writing, and the path that reaches it while it is open."""

    path: Path
    file: IO[bytes]


def is_unnamed(path: Path) -> bool:
    """Whether ``path`` reaches an unnamed (``O_TMPFILE``) file through ``/proc/self/fd``."""
    return str(path).startswith(_FD_LINKS + "/")


def hard_link(source: Path, target: Path) -> None:
    """``link(2)`` that also names an unnamed file reached through ``/proc/self/fd``.

    That needs ``linkat`` with ``AT_SYMLINK_FOLLOW``; Python's ``os.link`` calls
    plain ``link`` unless a directory descriptor is given, so one is. Raises
    ``FileExistsError`` when ``target`` exists, like ``os.link``.
    """
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(source, target.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def new_named(folder: Path) -> OpenFile:
    """A new file ``rx-<random>.dcm`` in ``folder``, private to this user (as ``tempfile``'s)."""
    while True:
        path = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}.dcm"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        return OpenFile(path, os.fdopen(fd, "wb"))


def _new_unnamed(folder: Path) -> OpenFile:
    fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
    return OpenFile(Path(f"{_FD_LINKS}/{fd}"), os.fdopen(fd, "wb"))


def unnamed_supported(folder: Path) -> bool:
    """Whether unnamed files can be made in ``folder`` and then linked into it."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir(_FD_LINKS):
        return False
    probe = folder / f".probe-{secrets.token_hex(8)}"
    try:
        opened = _new_unnamed(folder)
    except OSError:
        return False
    try:
        hard_link(opened.path, probe)
        probe.unlink()
        return True
    except OSError:
        return False
    finally:
        opened.file.close()


class PreparedFiles:
    """Open files for one folder, kept ready by a thread (thread-safe; :meth:`close` ends it).

    Without ``O_TMPFILE`` there is no thread: :meth:`take` creates a named file.
    """

    def __init__(self, folder: Path, depth: int = DEPTH) -> None:
        self.folder = folder
        self.unnamed = unnamed_supported(folder)
        self._ready: queue.Queue[OpenFile] = queue.Queue()
        self._depth = depth
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.unnamed:
            try:
                self._fill()
            except OSError as exc:  # e.g. disk full at start: take() tries again each time
                logger.warning("could not prepare files for receiving in %s: %s", folder,
                               exc.strerror or type(exc).__name__)
            self._thread = threading.Thread(target=self._run, name="ctdx-prepared-files",
                                            daemon=True)
            self._thread.start()
        else:
            logger.info("%s has no unnamed files (O_TMPFILE): received files are named there",
                        folder)

    def take(self) -> OpenFile:
        """A file to receive into (a ready one if any); raises ``OSError``."""
        if not self.unnamed:
            return new_named(self.folder)
        try:
            opened = self._ready.get_nowait()
        except queue.Empty:
            opened = _new_unnamed(self.folder)
        self._wanted.set()
        return opened

    def close(self) -> None:
        """Stop the thread and close the files not taken (unnamed: nothing is left)."""
        self._closed = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        while True:
            try:
                self._ready.get_nowait().file.close()
            except queue.Empty:
                return

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            try:
                self._fill()
            except OSError as exc:  # disk full and the like: take() creates (and reports) it
                logger.warning("could not prepare a file for receiving: %s",
                               exc.strerror or type(exc).__name__)

    def _fill(self) -> None:
        while self._ready.qsize() < self._depth and not self._closed:
            self._ready.put(_new_unnamed(self.folder))
