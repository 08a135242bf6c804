"""Storing one received instance: the C-STORE hot path, below the DIMSE edge.

Order, so that success is only ever answered for what survives a crash:

1. disk-space guard (``CTDX_MIN_FREE_BYTES``) and database health before
   anything is written;
2. header read and checked (:mod:`ctdx.scp.instance`); its UIDs name the file;
3. a committed row under the SOP Instance UID makes this a duplicate (below);
4. the received file is linked as ``.unindexed/<SOP Instance UID>`` (exclusive:
   the claim while its row is pending) and under its final name (a hard link,
   which never replaces a file already there); it and both directories are
   fsynced (at once, :meth:`~ctdx.scp.spool.Spool.seal_new`);
5. success. Its row is written by the process's :class:`~scp.recorder.Recorder`
   (batched with other associations', one commit), which then removes the
   ``.unindexed`` link; start-up recovery records any link a crash left.

So when 0x0000 is sent, the bytes and both names are on stable storage, and the
database row follows within milliseconds (before the association's release is
answered). A crash after the links but before success leaves a complete file
that start-up records; the sender's resend is then an identical duplicate.
A file already under the final name with no row and no claim (a crash before
its record under the old protocol) is atomically replaced once claimed.
Duplicates: identical bytes are a success with nothing written twice; different
bytes keep the first copy and answer 0x0111 (see ``docs/dicom-conformance.md``).
A resend that finds the instance claimed but not yet recorded waits for the row.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ctdx.db.models import utcnow
from ctdx.scp import registry
from ctdx.scp.instance import InstanceHeader, read_instance_header
from ctdx.scp.receive import take_digest
from ctdx.scp.recorder import Pending, Recorder
from ctdx.scp.spool import Sealed, Spool, relative_path
from ctdx.scp.status import Rejected, Status

logger = logging.getLogger(__name__)

__all__ = ["AssociationLease", "InstanceStore", "Outcome", "StoreResult"]


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical bytes already stored: success, nothing written


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    header: InstanceHeader


_CLAIM_WAIT_SECONDS = 10.0  # a resend waiting for a claimed instance's row
#: Longest a C-STORE waits for the recorder's immediate retry while the database was down.
_DATABASE_RETRY_WAIT_SECONDS = 5.0


class AssociationLease:
    """The lease name of one association and the versions it holds open."""

    def __init__(self, holder: str, calling_ae_title: str) -> None:
        self.holder = holder
        self.calling_ae_title = calling_ae_title
        self.versions: frozenset[int] = frozenset()


class InstanceStore:
    """Spool plus database for one listener process (thread-safe; one per process)."""

    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        min_free_bytes: int,
        lease_ttl_seconds: float,
    ) -> None:
        self.spool = spool
        self.engine = engine
        self.min_free_bytes = min_free_bytes
        self.lease_ttl_seconds = lease_ttl_seconds
        self.cache = registry.RegistryCache()
        self.recorder = Recorder(engine, spool, self.cache, lease_ttl_seconds)
        self._lookup = registry.StoredInstanceLookup(engine)
        self._lookup_errors: tuple[type[Exception], ...] = (
            SQLAlchemyError, self._lookup.driver_error
        )

    def store(
        self,
        received: Path,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        lease: AssociationLease,
    ) -> StoreResult:
        """Store the file pynetdicom received at ``received``; raises :class:`Rejected`."""
        digest = take_digest(received)  # taken while it was written; always collect it
        self._check_space()
        if not self.recorder.ready(_DATABASE_RETRY_WAIT_SECONDS):
            raise Rejected(
                Status.OUT_OF_RESOURCES_STORAGE, "database unavailable; instance not stored"
            )
        try:
            header = read_instance_header(
                received, transfer_syntax_uid, sop_class_uid, sop_instance_uid,
                scratch=self.spool.incoming,
            )
        except OSError as exc:  # e.g. its connection closed and took the file with it
            raise _storage_failure(exc, "received data set could not be read") from exc
        known = None if digest is None else Sealed(digest.size_bytes, digest.sha256)
        deadline = time.monotonic() + _CLAIM_WAIT_SECONDS
        while True:
            existing = self._stored(header.sop_instance_uid)
            if existing is not None:
                return self._duplicate(received, header, existing, known)
            if self._claim(received, header.sop_instance_uid):
                break
            # another association (or process) is recording this SOP Instance UID: its row
            # comes within milliseconds, then this is a duplicate like any other
            if time.monotonic() > deadline:
                raise Rejected(Status.OUT_OF_RESOURCES_STORAGE,
                               "same instance is being stored by another association; retry")
            time.sleep(0.002)
        relative = relative_path(header)
        uid = header.sop_instance_uid
        linked = False
        try:
            linked = self.spool.link_new(received, relative)
            if not linked:
                existing = self._stored(uid)  # recorded since we looked: a duplicate
                if existing is not None:
                    self.spool.unmark_if_same(received, uid)
                    return self._duplicate(received, header, existing, known)
            if linked:  # the usual case: fsyncs (and hash) at once
                sealed = self.spool.seal_new(received, relative, known)
            else:
                # a file without row or claim: a crash's leftover, never acknowledged
                sealed = self.spool.seal(received, known)
                self.spool.place(received, relative)
                self.spool.sync_marked(relative)
        except Rejected:
            self.spool.unmark_if_same(received, uid)
            raise
        except OSError as exc:
            if linked:
                self.spool.remove_if_same(received, relative)
            self.spool.unmark_if_same(received, uid)
            raise _storage_failure(exc, "instance could not be written to the spool") from exc
        self.recorder.submit(Pending(header, relative, sealed, lease, utcnow()))
        return StoreResult(Outcome.STORED, header)

    def close(self) -> None:
        """Close the look-up's own database connections (the recorder is stopped apart)."""
        self._lookup.close()

    def _claim(self, received: Path, sop_instance_uid: str) -> bool:
        try:
            return self.spool.mark(received, sop_instance_uid)
        except OSError as exc:
            raise _storage_failure(exc, "instance could not be written to the spool") from exc

    def _stored(self, sop_instance_uid: str) -> registry.StoredInstance | None:
        try:
            return self._lookup(sop_instance_uid)
        except self._lookup_errors as exc:
            logger.error("database refused instance %s: %s", sop_instance_uid,
                         type(exc).__name__)
            raise Rejected(
                Status.OUT_OF_RESOURCES_STORAGE, "database unavailable; instance not stored"
            ) from exc

    def _check_space(self) -> None:
        try:
            free = self.spool.free_bytes()
        except OSError as exc:
            raise _storage_failure(exc, "spool not accessible") from exc
        if free < self.min_free_bytes:
            raise Rejected(
                Status.OUT_OF_RESOURCES,
                f"free disk space {free // 1_000_000} MB below the "
                f"{self.min_free_bytes // 1_000_000} MB guard",
            )

    def _duplicate(
        self,
        received: Path,
        header: InstanceHeader,
        existing: registry.StoredInstance,
        known: Sealed | None,
    ) -> StoreResult:
        sha256 = known.sha256 if known is not None else self.spool.seal(received).sha256
        if existing.sha256 != sha256:
            raise Rejected(
                Status.DUPLICATE_SOP_INSTANCE,
                "SOP Instance UID already stored with different content; first copy kept",
            )
        if self.spool.digest_of(existing.path) != sha256:
            # the stored file went missing or was damaged behind our back: repair it
            logger.warning("instance %s: stored file missing or damaged, rewritten",
                           header.sop_instance_uid)
            try:
                self.spool.seal(received, known)
                self.spool.place(received, existing.path)
            except OSError as exc:
                raise _storage_failure(exc, "instance could not be written to the spool") from exc
        return StoreResult(Outcome.DUPLICATE, header)


def _storage_failure(exc: OSError, what: str) -> Rejected:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Rejected(Status.OUT_OF_RESOURCES, "disk full")
    logger.error("%s: %s", what, exc.strerror or type(exc).__name__)
    return Rejected(Status.OUT_OF_RESOURCES_STORAGE, what)
