"""Database writes of the listener: study, version, series, instance and lease rows.

One short transaction per received instance. Functions take the caller's
:class:`~sqlalchemy.orm.Session` or, on the C-STORE hot path, a Core
:class:`~sqlalchemy.engine.Connection` (no ORM unit of work to pay for: these
are Core statements), and never commit. They use ``INSERT ... ON
CONFLICT DO NOTHING`` (SQLite and PostgreSQL) so that a race between two
associations, or two listener processes, never aborts the transaction: the
loser simply reads the winner's row.

Ids resolved in a transaction are handed back as :class:`Resolved`; callers
cache them only after the commit (:class:`RegistryCache`), so a rolled-back
row is never remembered. A cached version id is only a hint: the guarded
``UPDATE ... WHERE state = 'receiving'`` tells whether the version is still
open, and when it is not (completed by the quiet period or MPPS) the instance
opens version n+1.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Table, bindparam, create_engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from ctdx.db.models import (
    Instance,
    ReceivingLease,
    Series,
    Study,
    StudyVersion,
    VersionState,
)
from ctdx.scp.instance import InstanceHeader
from ctdx.scp.spool import Sealed

logger = logging.getLogger(__name__)

__all__ = [
    "DuplicateInstance",
    "Received",
    "RegistryCache",
    "Resolved",
    "StoredInstance",
    "StoredInstanceLookup",
    "delete_leases",
    "record_batch",
    "record_instance",
    "stored_instance",
]

_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_VERSIONS: Table = StudyVersion.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_LEASES: Table = ReceivingLease.__table__  # type: ignore[assignment]


class DuplicateInstance(Exception):
    """The SOP Instance UID is already stored (the transaction must be rolled back)."""


@dataclass(frozen=True)
class Resolved:
    """Row ids an instance was recorded under."""

    study_id: int
    series_id: int
    study_version_id: int
    version: int
    lease_added: bool


@dataclass(frozen=True)
class StoredInstance:
    study_version_id: int
    sha256: str
    path: str


class RegistryCache:
    """Per-process memory of ids, so the common case is one UPDATE and one INSERT."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}
        self._versions: dict[int, tuple[int, int]] = {}  # study id -> (version id, number)

    def study(self, study_instance_uid: str) -> int | None:
        return self._studies.get(study_instance_uid)

    def series(self, series_instance_uid: str) -> int | None:
        return self._series.get(series_instance_uid)

    def version(self, study_id: int) -> tuple[int, int] | None:
        return self._versions.get(study_id)

    def remember(self, header: InstanceHeader, resolved: Resolved) -> None:
        with self._lock:
            self._studies[header.study_instance_uid] = resolved.study_id
            self._series[header.series_instance_uid] = resolved.series_id
            self._versions[resolved.study_id] = (resolved.study_version_id, resolved.version)
            if len(self._series) > 100_000:  # a long-running listener: forget, rows stay
                self._studies.clear()
                self._series.clear()
                self._versions.clear()


Executor = Session | Connection


def _dialect_name(executor: Executor) -> str:
    if isinstance(executor, Connection):
        return executor.dialect.name
    return executor.get_bind().dialect.name


def _connection(executor: Executor) -> Connection:
    return executor if isinstance(executor, Connection) else executor.connection()


_INSERT_IGNORE_CACHE: dict[tuple[str, str, tuple[str, ...]], Any] = {}


def _insert_ignore(
    session: Executor, table: Table, values: dict[str, Any], keys: list[str]
) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING RETURNING id``; the new id or ``None``.

    The statement is built once per table and dialect (values are bound
    parameters), which keeps SQLAlchemy's per-call work small on the hot path.
    """
    dialect = _dialect_name(session)
    cache_key = (dialect, table.name, tuple(keys))
    stmt = _INSERT_IGNORE_CACHE.get(cache_key)
    if stmt is None:
        if dialect == "postgresql":
            stmt = postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
        elif dialect == "sqlite":
            stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
        else:  # pragma: no cover - only the two supported backends
            raise RuntimeError(f"unsupported database backend {dialect}")
        stmt = stmt.returning(table.c.id)
        _INSERT_IGNORE_CACHE[cache_key] = stmt
    return _connection(session).execute(stmt, values).scalar_one_or_none()


def _study_id(session: Executor, header: InstanceHeader) -> int:
    facts = header.study
    new_id = _insert_ignore(
        session,
        _STUDIES,
        {
            "study_instance_uid": header.study_instance_uid,
            "patient_id": facts.patient_id,
            "patient_name": facts.patient_name,
            "accession_number": facts.accession_number,
            "study_date": facts.study_date,
            "study_description": facts.study_description,
        },
        ["study_instance_uid"],
    )
    if new_id is not None:
        return int(new_id)
    return int(
        session.execute(
            select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == header.study_instance_uid)
        ).scalar_one()
    )


def _series_id(session: Executor, study_id: int, header: InstanceHeader) -> int:
    facts = header.series
    new_id = _insert_ignore(
        session,
        _SERIES,
        {
            "study_id": study_id,
            "series_instance_uid": header.series_instance_uid,
            "modality": facts.modality,
            "series_number": facts.series_number,
            "series_description": facts.series_description,
        },
        ["series_instance_uid"],
    )
    if new_id is not None:
        return int(new_id)
    return int(
        session.execute(
            select(_SERIES.c.id).where(
                _SERIES.c.series_instance_uid == header.series_instance_uid
            )
        ).scalar_one()
    )


_BUMP = (
    update(_VERSIONS)
    .where(
        _VERSIONS.c.id == bindparam("version_id"),
        _VERSIONS.c.state == VersionState.RECEIVING.value,
    )
    .values(
        last_received_at=bindparam("now"),
        instance_count=_VERSIONS.c.instance_count + bindparam("count"),
    )
)


def _bump(session: Executor, version_id: int, now: datetime, count: int = 1) -> bool:
    """Count ``count`` more instances in an open version; ``False`` when it no longer receives."""
    result = _connection(session).execute(
        _BUMP, {"version_id": version_id, "now": now, "count": count}
    )
    return bool(result.rowcount)


def _open_version(
    session: Executor,
    study_id: int,
    calling_ae_title: str | None,
    now: datetime,
    count: int = 1,
) -> tuple[int, int]:
    """The study's receiving version (counting this instance), opening n+1 when none is open."""
    for _ in range(5):
        latest = session.execute(
            select(_VERSIONS.c.id, _VERSIONS.c.version, _VERSIONS.c.state)
            .where(_VERSIONS.c.study_id == study_id)
            .order_by(_VERSIONS.c.version.desc())
            .limit(1)
        ).one_or_none()
        if latest is not None and latest.state == VersionState.RECEIVING.value:
            if _bump(session, latest.id, now, count):
                return int(latest.id), int(latest.version)
            continue  # completed between the two statements: look again
        number = 1 if latest is None else int(latest.version) + 1
        new_id = _insert_ignore(
            session,
            _VERSIONS,
            {
                "study_id": study_id,
                "version": number,
                "state": VersionState.RECEIVING.value,
                "calling_ae_title": calling_ae_title,
                "first_received_at": now,
                "last_received_at": now,
                "instance_count": count,
            },
            ["study_id", "version"],
        )
        if new_id is not None:
            if number > 1:
                logger.info(
                    "study id %d: instance after completion opens version %d", study_id, number
                )
            return int(new_id), number
    raise RuntimeError(f"could not open a version of study id {study_id}")  # pragma: no cover


def record_instance(
    session: Executor,
    header: InstanceHeader,
    relative_path: str,
    sealed: Sealed,
    calling_ae_title: str | None,
    holder: str | None,
    leased_versions: frozenset[int],
    lease_expires_at: datetime,
    now: datetime,
    cache: RegistryCache,
) -> Resolved:
    """Record one received instance in its study's open version.

    ``holder`` names the association; a lease row for (version, holder) is
    added unless ``leased_versions`` says this association already holds one
    (``None``: no association, e.g. an instance recorded at start-up).

    Raises
    ------
    DuplicateInstance
        The SOP Instance UID is already recorded; roll the transaction back.
    """
    study_id = cache.study(header.study_instance_uid)
    if study_id is None:
        study_id = _study_id(session, header)
    cached = cache.version(study_id)
    if cached is not None and _bump(session, cached[0], now):
        version_id, number = cached
    else:
        version_id, number = _open_version(session, study_id, calling_ae_title, now)
    series_id = cache.series(header.series_instance_uid)
    if series_id is None:
        series_id = _series_id(session, study_id, header)
    instance_id = _insert_ignore(
        session,
        _INSTANCES,
        {
            "series_id": series_id,
            "study_version_id": version_id,
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "path": relative_path,
            "size_bytes": sealed.size_bytes,
            "sha256": sealed.sha256,
            "calling_ae_title": calling_ae_title,
            "received_at": now,
        },
        ["sop_instance_uid"],
    )
    if instance_id is None:
        raise DuplicateInstance(header.sop_instance_uid)
    lease_added = False
    if holder is not None and version_id not in leased_versions:
        _insert_ignore(
            session,
            _LEASES,
            {"study_version_id": version_id, "holder": holder, "expires_at": lease_expires_at},
            ["study_version_id", "holder"],
        )
        lease_added = True
    return Resolved(study_id, series_id, version_id, number, lease_added)


@dataclass(frozen=True)
class Received:
    """One instance of a batch for :func:`record_batch`."""

    header: InstanceHeader
    relative_path: str
    sealed: Sealed
    calling_ae_title: str | None
    holder: str | None
    leased_versions: frozenset[int]
    received_at: datetime


_PLAIN_INSERT: dict[str, Any] = {}


def record_batch(
    connection: Connection,
    batch: list[Received],
    lease_expires_at: datetime,
    cache: RegistryCache,
) -> list[Resolved]:
    """Record several instances in one transaction: what :func:`record_instance` does for
    each, with one version update per study and one multi-row INSERT of the instances.

    Raises
    ------
    sqlalchemy.exc.IntegrityError
        One of them is already recorded: roll back and record them one by one.
    """
    by_study: dict[str, list[int]] = {}
    for index, item in enumerate(batch):
        by_study.setdefault(item.header.study_instance_uid, []).append(index)
    resolved: list[Resolved | None] = [None] * len(batch)
    rows: list[dict[str, Any]] = []
    leases: dict[tuple[int, str], None] = {}
    for indexes in by_study.values():
        first = batch[indexes[0]]
        study_id = cache.study(first.header.study_instance_uid)
        if study_id is None:
            study_id = _study_id(connection, first.header)
        latest = max(batch[i].received_at for i in indexes)
        cached = cache.version(study_id)
        if cached is not None and _bump(connection, cached[0], latest, len(indexes)):
            version_id, number = cached
        else:
            version_id, number = _open_version(
                connection, study_id, first.calling_ae_title, latest, len(indexes)
            )
        for i in indexes:
            item = batch[i]
            series_id = cache.series(item.header.series_instance_uid)
            if series_id is None:
                series_id = _series_id(connection, study_id, item.header)
            rows.append({
                "series_id": series_id,
                "study_version_id": version_id,
                "sop_instance_uid": item.header.sop_instance_uid,
                "sop_class_uid": item.header.sop_class_uid,
                "transfer_syntax_uid": item.header.transfer_syntax_uid,
                "path": item.relative_path,
                "size_bytes": item.sealed.size_bytes,
                "sha256": item.sealed.sha256,
                "calling_ae_title": item.calling_ae_title,
                "received_at": item.received_at,
            })
            lease_added = False
            if item.holder is not None and version_id not in item.leased_versions:
                leases[(version_id, item.holder)] = None
                lease_added = True
            resolved[i] = Resolved(study_id, series_id, version_id, number, lease_added)
    insert = _PLAIN_INSERT.get("instances")
    if insert is None:
        insert = _PLAIN_INSERT.setdefault("instances", _INSTANCES.insert())
    connection.execute(insert, rows)
    for version_id, holder in leases:
        _insert_ignore(
            connection,
            _LEASES,
            {"study_version_id": version_id, "holder": holder, "expires_at": lease_expires_at},
            ["study_version_id", "holder"],
        )
    return [r for r in resolved if r is not None]


def stored_instance(session: Executor, sop_instance_uid: str) -> StoredInstance | None:
    """What is already stored under a SOP Instance UID."""
    row = session.execute(
        select(_INSTANCES.c.study_version_id, _INSTANCES.c.sha256, _INSTANCES.c.path).where(
            _INSTANCES.c.sop_instance_uid == sop_instance_uid
        )
    ).one_or_none()
    if row is None:
        return None
    return StoredInstance(int(row.study_version_id), str(row.sha256), str(row.path))


class StoredInstanceLookup:
    """:func:`stored_instance` for the C-STORE hot path: one compiled statement run on a
    pooled DB-API connection, without SQLAlchemy's per-call connection and result objects
    (a third of the look-up's cost, measured with four senders).

    On a database server (PostgreSQL) the look-up has a small pool of its own, in
    autocommit and without a ping at each checkout: the main engine's pool pings every
    connection it hands out and wraps the query in BEGIN and ROLLBACK, four round trips
    where one will do (idle, on the seventh session's VM: 0.30 ms per look-up that way,
    0.09 ms on the own pool; under a sender's load the old way took 0.47 ms, SQLite's
    look-up 0.06 ms). What the ping was for is kept: a
    look-up that fails (the server restarted and dropped its connections, or is down)
    drops the pool's connections and tries once more at once, so the first instance after
    an outage is answered from a new connection (``tests/scp/test_database_outage.py``).
    """

    def __init__(self, engine: Engine) -> None:
        self._own = engine.dialect.name != "sqlite"
        # as many connections as the main pool (one per association at most, on demand)
        size = engine.pool.size() if isinstance(engine.pool, QueuePool) else 5
        self.engine = (
            create_engine(engine.url, pool_pre_ping=False, isolation_level="AUTOCOMMIT",
                          pool_size=size, max_overflow=8)
            if self._own else engine
        )
        statement = select(
            _INSTANCES.c.study_version_id, _INSTANCES.c.sha256, _INSTANCES.c.path
        ).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
        compiled = statement.compile(dialect=engine.dialect)
        self._sql = str(compiled)
        self._positional = bool(compiled.positional)
        self._key = next(iter(compiled.params))
        self.driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    def __call__(self, sop_instance_uid: str) -> StoredInstance | None:
        params: Any = (
            (sop_instance_uid,) if self._positional else {self._key: sop_instance_uid}
        )
        try:
            row = self._fetch(params)
        except self.driver_error:
            if not self._own:
                raise
            self.engine.dispose()  # connections of a server that went away: new ones
            row = self._fetch(params)
        if row is None:
            return None
        return StoredInstance(int(row[0]), str(row[1]), str(row[2]))

    def close(self) -> None:
        """Close the look-up's own connections (the listener stops)."""
        if self._own:
            self.engine.dispose()

    def _fetch(self, params: Any) -> Any:
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self._sql, params)
                return cursor.fetchone()
            finally:
                cursor.close()
        finally:
            connection.close()  # back to the pool (which rolls back what is open)


def renew_leases(session: Executor, holders: list[str], expires_at: datetime) -> None:
    """Keep the leases of live associations from expiring (called by each process's heartbeat)."""
    if holders:
        session.execute(
            update(_LEASES).where(_LEASES.c.holder.in_(holders)).values(expires_at=expires_at)
        )


def delete_leases(session: Executor, holder: str) -> None:
    """An association ended: it no longer holds its versions open."""
    session.execute(delete(_LEASES).where(_LEASES.c.holder == holder))


def lease_expiry(now: datetime, ttl_seconds: float) -> datetime:
    return now + timedelta(seconds=ttl_seconds)
