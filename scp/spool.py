"""The spool: received instances on disk, durable before the listener answers success.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
built from validated UIDs only (:mod:`ctdx.scp.uids`). pynetdicom streams each
received data set into a temporary file in this process's own folder under
``<spool>/.incoming`` (same file system, see :mod:`ctdx.scp.receive`; the fast
path's files there are unnamed until linked, see :mod:`ctdx.scp.prepared`).
:meth:`Spool.link_new` gives it its final name atomically (never replacing
another file), :meth:`Spool.seal` hashes and fsyncs it,
:meth:`Spool.sync_directory` makes the name durable; a crash leaves
either the whole instance or nothing under its final name. :meth:`Spool.place`
(atomic replace) is the slow path when a file is already there.
The bytes are written as they came: no decode, no re-encode.

Several listener processes may share one spool (the processes of one
listener, ``CTDX_LISTENER_PROCESSES``; or listeners on several hosts over a
shared file system): each process receives into its own folder
``.incoming/<host>.<pid>.<random>/`` and holds an exclusive ``flock`` on the
lock file ``.incoming/<same name>.lock`` while it lives. Clean-up
(:meth:`Spool.clear_incoming`, at start-up and periodically) deletes the
folders whose lock it can take (their owner is gone), and in folders of live
owners only files untouched for longer than a transfer may stay idle; so a
second listener started on the same data directory by mistake never deletes
the first one's transfers in flight.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctdx.scp.instance import InstanceHeader
from ctdx.scp.prepared import hard_link, is_unnamed

logger = logging.getLogger(__name__)

__all__ = ["CONFLICTS_DIR", "INCOMING_DIR", "UNINDEXED_DIR", "Sealed", "Spool", "relative_path"]

INCOMING_DIR = ".incoming"
UNINDEXED_DIR = ".unindexed"  # acknowledged instances whose row is not written yet
CONFLICTS_DIR = ".conflicts"  # acknowledged copies that lost a concurrent duplicate race
_CHUNK = 1 << 20
#: Threads that fsync directories and hash while a receiving thread fsyncs its file:
#: two jobs per instance, so enough for a few associations storing at the same moment.
_SYNC_THREADS = 6
_LOCK_SUFFIX = ".lock"
#: A folder under .incoming without its lock file is being created or removed by someone;
#: one this old is a leftover.
_ORPHAN_FOLDER_SECONDS = 600.0


@dataclass(frozen=True)
class Sealed:
    """A received file whose bytes are on stable storage."""

    size_bytes: int
    sha256: str


def relative_path(header: InstanceHeader) -> str:
    """Spool-relative path of an instance (POSIX separators, as stored in ``instances.path``)."""
    return (
        f"{header.study_instance_uid}/{header.series_instance_uid}/{header.sop_instance_uid}.dcm"
    )


def _same_file(a: Path, b: Path) -> bool:
    """Both names exist and are links to one file."""
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _digest_of_path(path: Path) -> Sealed:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Sealed(size_bytes=size, sha256=digest.hexdigest())


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files under ``root``; one per process, shared by every association thread."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.incoming_root = self.root / INCOMING_DIR
        self.unindexed = self.root / UNINDEXED_DIR
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._incoming: Path | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def incoming(self) -> Path:
        """This process's folder for data sets being received (created and locked on first use)."""
        with self._lock:
            if self._incoming is None:
                self._incoming = self._own_incoming()
            return self._incoming

    def _own_incoming(self) -> Path:
        self.incoming_root.mkdir(parents=True, exist_ok=True)
        while True:
            name = f"{_host()}.{os.getpid()}.{secrets.token_hex(4)}"
            lock_path = self.incoming_root / f"{name}{_LOCK_SUFFIX}"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_inode(fd, lock_path):  # not swept in the instant before we locked it
                break
            os.close(fd)
        folder = self.incoming_root / name
        folder.mkdir()
        fsync_directory(self.incoming_root)
        weakref.finalize(self, os.close, fd)  # the lock lasts as long as this spool
        return folder

    def prepare(self) -> None:
        """Create the spool and its incoming folder (idempotent)."""
        for path in (self.root, self.incoming_root, self.unindexed):
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                fsync_directory(path.parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def seal(self, path: Path, known: Sealed | None = None) -> Sealed:
        """Flush a received file (data and metadata) to stable storage; hash it if not ``known``.

        ``known`` is the digest taken while the file was written
        (:func:`ctdx.scp.receive.take_digest`), which spares reading it back.
        """
        if known is None:
            known = _digest_of_path(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return known

    def seal_new(self, received: Path, relative: str, known: Sealed | None = None) -> Sealed:
        """Make a new instance durable under both its names: :meth:`seal` plus
        :meth:`sync_marked`, the three fsyncs (and the hash when not ``known``) at once.

        The file's fsync runs on the calling thread, the two directories' and the
        hash on the spool's small pool. The calling thread is the association's
        receiving thread and its sender waits for the response meanwhile, so the
        other core would otherwise sit idle: one after another, these were most of
        the time a 512 kB slice took (measured in ``benchmarks/results/scp.md``).
        Returns once all are done; raises the first ``OSError``.
        """
        pool = self._sync_pool()
        jobs = [pool.submit(fsync_directory, self.path_of(relative).parent),
                pool.submit(fsync_directory, self.unindexed)]
        hashing = pool.submit(_digest_of_path, received) if known is None else None
        error: OSError | None = None
        try:
            fd = os.open(received, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            error = exc
        waiting: list[Future[Any]] = [*jobs]
        if hashing is not None:
            waiting.append(hashing)
        for job in waiting:
            try:
                job.result()
            except OSError as exc:
                error = error or exc
        if error is not None:
            raise error
        if hashing is not None:
            return hashing.result()
        assert known is not None
        return known

    def _sync_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="ctdx-sync")
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    def digest_of(self, relative: str) -> str | None:
        """SHA-256 of a stored file, or ``None`` when it is absent."""
        try:
            return _digest_of_path(self.path_of(relative)).sha256
        except FileNotFoundError:
            return None

    def link_new(self, received: Path, relative: str) -> bool:
        """Give the received file its final name, unless that name exists (then ``False``).

        A hard link: atomic, never replaces, and the received name stays for
        pynetdicom to delete. Not yet durable: :meth:`seal` then
        :meth:`sync_directory`.
        """
        final = self.path_of(relative)
        self._ensure_directory(final.parent)
        try:
            hard_link(received, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            return self._copy_into(received, final, replace=False)
        return True

    def sync_directory(self, relative: str) -> None:
        fsync_directory(self.path_of(relative).parent)

    # --- the .unindexed links: acknowledged, row not yet written (see scp.recorder) ----------

    def mark(self, received: Path, sop_instance_uid: str) -> bool:
        """Link the received file as ``.unindexed/<SOP Instance UID>``; ``False`` if one is there.

        Exclusive across threads and processes: while the link exists, the
        instance is being recorded by whoever made it.
        """
        try:
            hard_link(received, self.unindexed / sop_instance_uid)
        except FileExistsError:
            return False
        return True

    def is_marked(self, sop_instance_uid: str) -> bool:
        return (self.unindexed / sop_instance_uid).exists()

    def unmark(self, sop_instance_uid: str) -> None:
        """The row is committed (or the instance refused): drop the link (no fsync needed:
        a link that comes back after a crash is recorded again as a duplicate, harmlessly)."""
        (self.unindexed / sop_instance_uid).unlink(missing_ok=True)

    def unmark_if_same(self, received: Path, sop_instance_uid: str) -> None:
        """Undo :meth:`mark` when the link still points at the received file."""
        marker = self.unindexed / sop_instance_uid
        try:
            if os.path.samefile(received, marker):
                marker.unlink()
        except FileNotFoundError:
            pass

    def marked(self) -> list[tuple[str, Path]]:
        """(SOP Instance UID, link) of every acknowledged instance without a row."""
        try:
            return [(entry.name, Path(entry.path)) for entry in os.scandir(self.unindexed)
                    if entry.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def unlink_if_marked(self, sop_instance_uid: str, relative: str | None) -> None:
        """Remove the final name ``relative`` when it is the same file as the instance's link."""
        if relative is not None:
            self.remove_if_same(self.unindexed / sop_instance_uid, relative)

    def keep_conflict(self, sop_instance_uid: str, relative: str, sha256: str) -> Path | None:
        """Move an acknowledged copy that lost a duplicate race out of the spool, durably.

        It was answered 0x0000, so it is never deleted: it goes to
        ``.conflicts/<SOP Instance UID>.<sha256 prefix>.dcm`` for an operator.
        """
        marker = self.unindexed / sop_instance_uid
        final = self.path_of(relative)
        kept = self.root / CONFLICTS_DIR / f"{sop_instance_uid}.{sha256[:16]}.dcm"
        if not _same_file(marker, final):
            return None
        self._link_into(marker, kept)  # already there: kept by an earlier attempt
        fsync_directory(kept.parent)
        final.unlink()
        fsync_directory(final.parent)
        return kept

    def sync_marked(self, relative: str) -> None:
        """Make both names of a new instance durable: its directory and ``.unindexed``."""
        fsync_directory(self.path_of(relative).parent)
        fsync_directory(self.unindexed)

    def restore_final(self, marker: Path, relative: str) -> None:
        """Start-up: give a recovered instance its final name if the crash came first."""
        final = self.path_of(relative)
        if final.exists():
            return
        if self._link_into(marker, final):
            fsync_directory(final.parent)

    def place(self, sealed_path: Path, relative: str) -> None:
        """Atomically replace the file under ``relative`` by a sealed file, durably.

        Only for what the database let the caller claim: a file already there
        without a claim is a leftover of a crash before its commit, never
        acknowledged to the sender.
        """
        final = self.path_of(relative)
        directory = final.parent
        self._ensure_directory(directory)
        try:
            if is_unnamed(sealed_path):
                _replace_by_link(sealed_path, final)
            else:
                os.replace(sealed_path, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_into(sealed_path, final, replace=True)
        fsync_directory(directory)

    def remove_if_same(self, received: Path, relative: str) -> None:
        """Undo :meth:`link_new` when the final name still points at the received file."""
        final = self.path_of(relative)
        if _same_file(received, final):
            final.unlink(missing_ok=True)

    def _copy_into(self, source: Path, final: Path, replace: bool) -> bool:
        """Fallback when the received file is on another file system (never in production)."""
        part = _part_name(final)
        try:
            shutil.copyfile(source, part)
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(part, final)
                return True
            try:
                os.link(part, final)
            except FileExistsError:
                return False
            return True
        finally:
            part.unlink(missing_ok=True)

    def _link_into(self, source: Path, target: Path) -> bool:
        """Hard-link ``source`` as ``target``, creating its folder; ``False`` if it exists."""
        self._ensure_directory(target.parent)
        try:
            os.link(source, target)
        except FileExistsError:
            return False
        return True

    def _ensure_directory(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._lock:
            missing: list[Path] = []
            probe = directory
            while probe != self.root and not probe.is_dir():
                missing.append(probe)
                probe = probe.parent
            for path in reversed(missing):
                try:
                    path.mkdir()
                except FileExistsError:
                    pass
                fsync_directory(path.parent)  # the new entry itself must survive a crash
            self._known_dirs.add(directory)

    def clear_incoming(self, older_than_seconds: float = 0.0) -> int:
        """Delete temporary files left by interrupted transfers; returns how many.

        Folders of processes that are gone (their lock is free) go whole. In
        folders of live processes (this one's included) only files untouched for
        longer than ``older_than_seconds`` go, and none when it is 0 (start-up:
        another listener on the same spool may be receiving). Files directly in
        ``.incoming`` (left by an older version) go when older than the cut-off.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        try:
            entries = list(os.scandir(self.incoming_root))
        except FileNotFoundError:
            return 0
        names = {entry.name for entry in entries}
        for entry in entries:
            try:
                if entry.name.endswith(_LOCK_SUFFIX):
                    removed += self._clear_owned(Path(entry.path), older_than_seconds, cutoff)
                elif entry.is_dir(follow_symlinks=False):
                    if (entry.name + _LOCK_SUFFIX not in names
                            and entry.stat().st_mtime <= time.time() - _ORPHAN_FOLDER_SECONDS):
                        removed += _remove_folder(Path(entry.path))
                elif entry.is_file() and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            logger.info("removed %d interrupted transfer file(s) from %s", removed,
                        self.incoming_root)
        return removed

    def other_live_receivers(self) -> int:
        """How many other processes (of any listener on this spool) are receiving now."""
        mine = f"{_host()}.{os.getpid()}."  # this process's folders are not another's
        live = 0
        try:
            entries = [e for e in os.scandir(self.incoming_root)
                       if e.name.endswith(_LOCK_SUFFIX) and not e.name.startswith(mine)]
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1
            finally:
                os.close(fd)  # closing drops a lock we took: the folder stays for the sweep
        return live

    def _clear_owned(self, lock_path: Path, older_than_seconds: float, cutoff: float) -> int:
        folder = lock_path.with_name(lock_path.name[: -len(_LOCK_SUFFIX)])
        fd = os.open(lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its owner lives: only files idle for too long
                if older_than_seconds <= 0:
                    return 0
                return _remove_files(folder, cutoff)
            if not _same_inode(fd, lock_path):
                return 0  # removed by another sweeper meanwhile
            removed = _remove_folder(folder)
            lock_path.unlink(missing_ok=True)
            return removed
        finally:
            os.close(fd)


def _part_name(final: Path) -> Path:
    """A name beside ``final`` that no other thread or process uses."""
    return final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.part")


def _replace_by_link(unnamed: Path, final: Path) -> None:
    """``os.replace`` for an unnamed file (it has no name to rename): named beside, renamed."""
    part = _part_name(final)
    hard_link(unnamed, part)
    try:
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)


def _host() -> str:
    """The host name as it appears in receive folder names (no dots)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())


def _same_inode(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_files(folder: Path, cutoff: float) -> int:
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _remove_folder(folder: Path) -> int:
    removed = _remove_files(folder, float("inf"))
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:  # something that is no file of ours in it: leave it for a person
        logger.warning("could not remove %s (%s)", folder, exc.strerror)
    return removed
