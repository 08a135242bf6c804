"""Storing one received instance: the C-STORE hot path, below the DIMSE edge.

Order, so that success is only ever answered for what survives a crash:

1. disk-space guard (``CTDX_MIN_FREE_BYTES``) before anything is written;
2. header read and checked (:mod:`scp.instance`); its UIDs name the file;
3. the received file gets its final name by a hard link, which never replaces
   a file already there; it is hashed and fsynced, then its directory;
4. one short transaction: the instance row claims its SOP Instance UID
   (unique) in the study's open version, then COMMIT, then success.

A row therefore always has its durable file. A crash before the commit leaves
at most a complete but unclaimed file under the final name; the sender's resend
finds it there and takes the slow path: claim first, then atomically replace
the file inside the claiming transaction. Duplicates (the claim fails):
identical bytes are a success with nothing written twice; different bytes keep
the first copy and answer 0x0111 (see ``docs/dicom-conformance.md``).
"""

from __future__ import annotations

import errno
import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from db.models import utcnow
from scp import registry
from scp.instance import InstanceHeader, read_instance_header
from scp.receive import take_digest
from scp.spool import Sealed, Spool, relative_path
from scp.status import Rejected, Status

logger = logging.getLogger(__name__)

__all__ = ["AssociationLease", "InstanceStore", "Outcome", "StoreResult"]


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical bytes already stored: success, nothing written


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    header: InstanceHeader
    study_version_id: int


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
        # one factory for the process: the hot path should not build one per instance
        self._sessions = sessionmaker(bind=engine, expire_on_commit=False)
        # SQLite has one writer at a time and makes a waiting connection sleep (1, 2, 5, 10 ms
        # ...) before retrying; queueing this process's writers on a lock hands over at once
        self._write_lock: AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
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
        header = read_instance_header(
            received, transfer_syntax_uid, sop_class_uid, sop_instance_uid
        )
        relative = relative_path(header)
        linked = False
        try:
            linked = self.spool.link_new(received, relative)
            known = None if digest is None else Sealed(digest.size_bytes, digest.sha256)
            sealed = self.spool.seal(received, known)
            if linked:
                self.spool.sync_directory(relative)
        except OSError as exc:
            if linked:
                self.spool.remove_if_same(received, relative)
            raise _storage_failure(exc, "instance could not be written to the spool") from exc
        try:
            with self._write_lock, self.engine.begin() as connection:
                resolved = self._record(connection, header, relative, sealed, lease)
                if not linked:  # a file is there already: replace it only once claimed
                    self.spool.place(received, relative)
        except registry.DuplicateInstance:
            if linked:
                self.spool.remove_if_same(received, relative)
            return self._duplicate(received, header, sealed.sha256)
        except OSError as exc:
            raise _storage_failure(exc, "instance could not be written to the spool") from exc
        except SQLAlchemyError as exc:
            if linked:
                self.spool.remove_if_same(received, relative)
            logger.error(
                "database refused instance %s: %s", sop_instance_uid, type(exc).__name__
            )
            raise Rejected(
                Status.OUT_OF_RESOURCES_STORAGE, "database unavailable; instance not stored"
            ) from exc
        self.cache.remember(header, resolved)
        if resolved.lease_added:
            lease.versions = lease.versions | {resolved.study_version_id}
        return StoreResult(Outcome.STORED, header, resolved.study_version_id)

    def _record(
        self,
        session: Connection,
        header: InstanceHeader,
        relative: str,
        sealed: Sealed,
        lease: AssociationLease,
    ) -> registry.Resolved:
        now = utcnow()
        return registry.record_instance(
            session,
            header,
            relative,
            sealed,
            calling_ae_title=lease.calling_ae_title,
            holder=lease.holder,
            leased_versions=lease.versions,
            lease_expires_at=registry.lease_expiry(now, self.lease_ttl_seconds),
            now=now,
            cache=self.cache,
        )

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

    def _duplicate(self, received: Path, header: InstanceHeader, sha256: str) -> StoreResult:
        with self._sessions.begin() as session:
            existing = registry.stored_instance(session, header.sop_instance_uid)
        if existing is None:  # pragma: no cover - the claim failed, so the row exists
            raise Rejected(Status.OUT_OF_RESOURCES_STORAGE, "instance claim failed; retry")
        if existing.sha256 != sha256:
            raise Rejected(
                Status.DUPLICATE_SOP_INSTANCE,
                "SOP Instance UID already stored with different content; first copy kept",
            )
        if self.spool.digest_of(existing.path) != sha256:
            # the stored file went missing or was damaged behind our back: repair it
            logger.warning("instance %s: stored file missing or damaged, rewritten",
                           header.sop_instance_uid)
            self.spool.place(received, existing.path)
        return StoreResult(Outcome.DUPLICATE, header, existing.study_version_id)


def _storage_failure(exc: OSError, what: str) -> Rejected:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Rejected(Status.OUT_OF_RESOURCES, "disk full")
    logger.error("%s: %s", what, exc.strerror or type(exc).__name__)
    return Rejected(Status.OUT_OF_RESOURCES_STORAGE, what)
