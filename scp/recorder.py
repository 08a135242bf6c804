"""The database rows of received instances, written off the C-STORE hot path in batches.

When the listener answers 0x0000 the instance is durable **on disk**: its
bytes are fsynced under their final name, and a second hard link to the same
file, ``<spool>/.unindexed/<SOP Instance UID>``, is durable too (both
directories fsynced). That link is the instance's record until its database
row exists. A :class:`Recorder` thread per listener process takes what the
handlers hand it, writes the rows of every instance waiting (from all
associations) in one transaction, commits, and only then removes their
``.unindexed`` links. One commit (one fsync of SQLite's WAL, or one
PostgreSQL round trip with its WAL flush) serves a whole batch.

The rows follow within milliseconds; what must see them waits for them:

- an association's release is answered only once every instance it sent is in
  the database (:meth:`Recorder.flush` from the A-RELEASE handler), and so is
  an MPPS N-SET before it looks for its referenced instances;
- a crash between success and the commit leaves ``.unindexed`` links:
  :func:`reindex_unindexed` records them (reading the file, as the handler did)
  at start-up before the listener accepts anything, and the primary process
  sweeps links older than :data:`ORPHAN_SECONDS` (a dead secondary's);
- while the database refuses writes, :attr:`Recorder.healthy` is false and new
  C-STORE requests are answered 0xA701 before anything is written; what was
  already acknowledged stays on disk and is written when the database returns.
  A new C-STORE does not wait for the next scheduled retry (up to 5 s away):
  :meth:`Recorder.ready` has the recorder try again at once and waits for that
  attempt, so the first instance after the database is back is accepted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pydicom.filereader import read_file_meta_info
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ctdx.db.models import utcnow
from ctdx.scp import registry
from ctdx.scp.instance import InstanceHeader, read_instance_header
from ctdx.scp.spool import Sealed, Spool, relative_path
from ctdx.scp.status import Rejected

logger = logging.getLogger(__name__)

__all__ = ["ORPHAN_SECONDS", "Pending", "Recorder", "reindex_unindexed"]

ORPHAN_SECONDS = 120.0  # an .unindexed link this old belongs to no live recorder
_MAX_BATCH = 256
#: How long the recorder lets rows gather after the first one arrives (nobody waits on
#: them: success is already answered; a release or N-SET that needs them cuts it short).
BATCH_WINDOW_SECONDS = 0.02
_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class LeaseHolder(Protocol):
    """What the recorder needs of an association: its lease name and the versions it holds."""

    holder: str
    calling_ae_title: str
    versions: frozenset[int]


@dataclass(frozen=True)
class Pending:
    """An acknowledged instance whose row is not written yet."""

    header: InstanceHeader
    relative: str
    sealed: Sealed
    lease: LeaseHolder
    received_at: datetime


class Recorder:
    """The writer thread of one listener process (``start``/``stop``; thread-safe ``submit``)."""

    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        cache: registry.RegistryCache,
        lease_ttl_seconds: float,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.cache = cache
        self.lease_ttl_seconds = lease_ttl_seconds
        self._cond = threading.Condition()
        self._queue: list[Pending] = []
        self._submitted = 0
        self._done = 0  # every submission up to this number is committed
        self._flushing = 0  # callers waiting in flush(): write at once
        self._stopping = False
        self._healthy = True
        self._retry_now = False  # a C-STORE waits on the next attempt: make it now
        self._attempts = 0  # attempts that failed, for ready() to see one end
        self._thread: threading.Thread | None = None
        self._paused = False  # tests: hold rows back to look at what a crash would leave

    @property
    def healthy(self) -> bool:
        """False while the database refuses the recorder's writes."""
        return self._healthy

    def ready(self, timeout: float) -> bool:
        """Whether the database takes writes; when it did not, try again now and wait.

        Waits for one attempt of the recorder (at most ``timeout``), so a request
        that arrives just after the database came back is not refused.
        """
        if self._healthy:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = self._attempts
            self._retry_now = True
            self._cond.notify_all()
            while not self._healthy and self._attempts == seen:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    break
                self._cond.wait(left)
        return self._healthy

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ctdx-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is waiting (within ``timeout``), then end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def submit(self, item: Pending) -> None:
        with self._cond:
            self._queue.append(item)
            self._submitted += 1
            # wake the thread only to start a batch or to write a full one: waking it for
            # every row while it gathers costs a cross-CPU wake-up per instance
            if len(self._queue) == 1 or len(self._queue) >= _MAX_BATCH:
                self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is in the database; ``False`` on time-out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._done < target:
                    left = deadline - time.monotonic()
                    if (left <= 0 or self._paused or not self._healthy
                            or self._thread is None or not self._thread.is_alive()):
                        return False  # database down: the rows follow when it is back
                    self._cond.wait(left)
                return True
            finally:
                self._flushing -= 1

    def pause(self, paused: bool) -> None:
        """Hold rows back (tests only: what a crash after success leaves on disk).

        A paused recorder writes nothing, not even when stopped, as if killed.
        """
        with self._cond:
            self._paused = paused
            self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while (not self._queue or self._paused) and not self._stopping:
                    self._cond.wait()
                if not self._queue or self._paused:  # paused: end as a crash would
                    return
                gather_until = time.monotonic() + BATCH_WINDOW_SECONDS
                while (len(self._queue) < _MAX_BATCH and not self._flushing
                       and not self._stopping):
                    left = gather_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._queue[:_MAX_BATCH]
            try:
                self._write(batch)
            except SQLAlchemyError as exc:
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                logger.error("database refused %d instance row(s) (%s); retrying in %.1f s",
                             len(batch), type(exc).__name__, delay)
                with self._cond:
                    self._healthy = False
                    self._attempts += 1
                    self._cond.notify_all()
                    if self._stopping:
                        return
                    retry_at = time.monotonic() + delay
                    while not self._retry_now and not self._stopping:
                        left = retry_at - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    self._retry_now = False
                continue
            except Exception:  # never lose the thread: the rows wait for the next start-up
                logger.exception("recording %d instance(s) failed; they stay in .unindexed",
                                 len(batch))
            failures = 0
            with self._cond:
                self._healthy = True
                self._retry_now = False
                del self._queue[: len(batch)]
                self._done += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[Pending]) -> None:
        """One transaction for the batch; if a row turns out to exist, one by one."""
        expires = registry.lease_expiry(utcnow(), self.lease_ttl_seconds)
        received = [
            registry.Received(
                item.header, item.relative, item.sealed, item.lease.calling_ae_title,
                item.lease.holder, item.lease.versions, item.received_at,
            )
            for item in batch
        ]
        try:
            with self.engine.begin() as connection:
                resolved = registry.record_batch(connection, received, expires, self.cache)
        except IntegrityError:
            # rare (a row under one of these SOP Instance UIDs appeared after the handler
            # looked): each in its own transaction, so one duplicate spoils nothing else
            for item in batch:
                self._write_one(item, expires)
            return
        for item, result in zip(batch, resolved, strict=True):
            self._committed(item, result)

    def _write_one(self, item: Pending, expires: datetime) -> None:
        try:
            with self.engine.begin() as connection:
                result = self._record(connection, item, expires)
        except registry.DuplicateInstance:
            self._settle_duplicate(item)
            return
        self._committed(item, result)

    def _record(self, connection: object, item: Pending, expires: datetime) -> registry.Resolved:
        return registry.record_instance(
            connection,  # type: ignore[arg-type]
            item.header,
            item.relative,
            item.sealed,
            calling_ae_title=item.lease.calling_ae_title,
            holder=item.lease.holder,
            leased_versions=item.lease.versions,
            lease_expires_at=expires,
            now=item.received_at,
            cache=self.cache,
        )

    def _committed(self, item: Pending, resolved: registry.Resolved) -> None:
        self.cache.remember(item.header, resolved)
        if resolved.lease_added:
            item.lease.versions = item.lease.versions | {resolved.study_version_id}
        self.spool.unmark(item.header.sop_instance_uid)

    def _settle_duplicate(self, item: Pending) -> None:
        with self.engine.connect() as connection:
            existing = registry.stored_instance(connection, item.header.sop_instance_uid)
        if existing is not None and existing.sha256 == item.sealed.sha256:
            if existing.path != item.relative:
                self.spool.unlink_if_marked(item.header.sop_instance_uid, item.relative)
        else:
            # acknowledged, but the first copy under this UID (another path, recorded in
            # the instant between the handler's look-up and now) differs: the first stays the
            # instance; this one was answered 0x0000, so it is kept aside, never deleted
            kept = self.spool.keep_conflict(item.header.sop_instance_uid, item.relative,
                                            item.sealed.sha256)
            logger.error(
                "instance %s: a different copy was recorded concurrently; the first is the "
                "instance, this one is kept in %s for an operator",
                item.header.sop_instance_uid, kept,
            )
        self.spool.unmark(item.header.sop_instance_uid)


def reindex_unindexed(
    spool: Spool,
    engine: Engine,
    cache: registry.RegistryCache,
    older_than_seconds: float = 0.0,
) -> int:
    """Record instances acknowledged but not yet in the database (their ``.unindexed`` links).

    At start-up every link is such a leftover (``older_than_seconds=0``); the
    primary's sweep only takes links old enough to belong to no live process.
    Returns how many rows it wrote. A link whose file does not read as a whole
    instance was never acknowledged (the crash came before its fsync): deleted.
    """
    written = 0
    if older_than_seconds <= 0 and spool.other_live_receivers():
        # another listener is running on this spool: its recorder writes its own links
        logger.warning("another listener process is receiving into this spool; only "
                       "unrecorded instances older than %.0f s are recorded now", ORPHAN_SECONDS)
        older_than_seconds = ORPHAN_SECONDS
    cutoff = time.time() - older_than_seconds
    for sop_instance_uid, marker in spool.marked():
        try:
            if marker.stat().st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        try:
            meta = read_file_meta_info(marker)
            header = read_instance_header(
                marker, str(meta.TransferSyntaxUID), str(meta.MediaStorageSOPClassUID),
                sop_instance_uid,
            )
        except (Rejected, OSError, ValueError, AttributeError, EOFError) as exc:
            logger.warning("unrecorded file of %s is not a whole instance (%s); removed",
                           sop_instance_uid, type(exc).__name__)
            spool.unlink_if_marked(sop_instance_uid, None)
            spool.unmark(sop_instance_uid)
            continue
        relative = relative_path(header)
        sealed = spool.seal(marker)
        spool.restore_final(marker, relative)
        received_at = datetime.fromtimestamp(marker.stat().st_mtime, UTC)
        try:
            with engine.begin() as connection:
                resolved = registry.record_instance(
                    connection, header, relative, sealed, calling_ae_title=None, holder=None,
                    leased_versions=frozenset(), lease_expires_at=received_at,
                    now=received_at, cache=cache,
                )
        except registry.DuplicateInstance:
            spool.unmark(sop_instance_uid)
            continue
        cache.remember(header, resolved)
        spool.unmark(sop_instance_uid)
        written += 1
    if written:
        logger.info("recorded %d acknowledged instance(s) that had no database row yet",
                    written)
    return written
