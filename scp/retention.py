"""Spool retention: delete the source instances of finished studies, and clean in an emergency.

What may go (a *finished* study): every version of the study is ``analysed``
or ``failed``, no analysis of it is running, and no report object of it is
still ``pending`` (each is ``delivered`` or ``dead``). A study is the unit
because a version is analysed together with the instances of the earlier
versions (:mod:`ctdx.worker.study`). What stays: the database rows (results,
instances, audit), ctdx's own report objects, and every file of a study that
is not finished.

- **Retention**: finished studies whose newest instance arrived more than
  ``CTDX_RETENTION_DAYS`` ago.
- **Emergency cleaning**: while the free space under the spool (read by
  :meth:`ctdx.scp.spool.Spool.free_bytes`, the function of the listener's disk
  guard) is below ``CTDX_EMERGENCY_FREE_BYTES``, finished studies regardless of
  age, oldest first.

Safe with several processes and hosts on one spool (NFS): a version is claimed
by inserting its ``spool_prunes`` row (unique per version) *before* any file is
deleted; whoever fails the insert leaves the study alone. Deleting a file that
is already gone counts as done, so a claim whose holder died mid-way is taken
over (:data:`STALE_CLAIM`) and finished. The row, stamped ``pruned`` with the
count and size of the removed files, is the record of the deletion;
``ctdx results show`` prints it and ``ctdx studies requeue`` refuses such a study.

Report objects ctdx wrote are a separate matter: kept, unless
``CTDX_REPORT_RETENTION_DAYS`` is set; then an object made longer ago than that
whose every export is ``delivered`` is deleted (a ``dead`` one is kept for
``ctdx exports retry``), recorded in ``report_prunes`` (inserted first, unique
per path, so two processes never both count it).

Folders are left in place, even empty: a listener may be about to write a
late instance of the same study into its folder.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, Select, and_, case, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Export,
    ExportState,
    Instance,
    PruneState,
    ReportPrune,
    SpoolPrune,
    Study,
    StudyVersion,
    VersionState,
    utcnow,
)
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.scp.spool import Spool

logger = logging.getLogger(__name__)

__all__ = [
    "PruneLoop",
    "PruneResult",
    "PrunedStudy",
    "finished_studies",
    "free_bytes",
    "prune",
]

FINISHED = (VersionState.ANALYSED.value, VersionState.FAILED.value)
#: A ``pruning`` claim older than this is taken to be abandoned (its holder died).
STALE_CLAIM = timedelta(minutes=10)
REASON_RETENTION = "retention"
REASON_EMERGENCY = "emergency"

FreeBytes = Callable[[], int]


@dataclass(frozen=True)
class Candidate:
    study_id: int
    study_instance_uid: str
    last_received_at: datetime


@dataclass(frozen=True)
class PrunedStudy:
    """One study whose source instances were removed (or would be, in a dry run)."""

    study_instance_uid: str
    versions: tuple[int, ...]
    reason: str  # "retention" | "emergency"
    last_received_at: datetime
    files_removed: int
    bytes_freed: int


@dataclass(frozen=True)
class PruneResult:
    dry_run: bool
    older_than_days: float
    cutoff: datetime
    free_bytes_before: int
    free_bytes_after: int
    emergency_free_bytes: int
    studies: tuple[PrunedStudy, ...] = field(default=())
    reports_removed: int = 0
    report_bytes_freed: int = 0

    @property
    def files_removed(self) -> int:
        return sum(s.files_removed for s in self.studies)

    @property
    def bytes_freed(self) -> int:
        return sum(s.bytes_freed for s in self.studies)


def free_bytes(spool_dir: Path) -> int:
    """Free space under the spool, read exactly as the listener's disk guard reads it."""
    return Spool(spool_dir).free_bytes()


def claim_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:12]}"


# --- which studies may go -----------------------------------------------------------------


def _blocked_study_ids() -> list[Select[int]]:
    """Sub-queries of studies that must keep their files (not finished, report on its way)."""
    unfinished = select(StudyVersion.study_id).where(StudyVersion.state.not_in(FINISHED))
    running = (
        select(StudyVersion.study_id)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(Analysis.state == AnalysisState.RUNNING)
    )
    undelivered = (
        select(StudyVersion.study_id)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .join(Export, Export.analysis_id == Analysis.id)
        .where(Export.state == ExportState.PENDING)
    )
    return [unfinished, running, undelivered]


def finished_studies(
    session: Session, cutoff: datetime | None, limit: int | None = None
) -> list[Candidate]:
    """Finished studies with files to remove, oldest newest-arrival first.

    ``cutoff``: only studies whose newest instance arrived before it (None: any age).
    """
    already = select(SpoolPrune.study_version_id)
    to_prune = func.sum(case((StudyVersion.id.not_in(already), 1), else_=0))
    latest = func.max(StudyVersion.last_received_at)
    stmt = (
        select(StudyVersion.study_id, Study.study_instance_uid, latest.label("latest"))
        .join(Study, Study.id == StudyVersion.study_id)
        .where(*[StudyVersion.study_id.not_in(q) for q in _blocked_study_ids()])
        .group_by(StudyVersion.study_id, Study.study_instance_uid)
        .having(to_prune > 0)
        .order_by(latest, StudyVersion.study_id)
    )
    if cutoff is not None:
        stmt = stmt.having(and_(to_prune > 0, latest < cutoff))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [Candidate(row.study_id, row.study_instance_uid, row.latest)
            for row in session.execute(stmt)]


def _instance_paths(session: Session, version_ids: Sequence[int]) -> list[str]:
    return list(
        session.scalars(
            select(Instance.path)
            .where(Instance.study_version_id.in_(list(version_ids)))
            .order_by(Instance.id)
        )
    )


# --- claiming and deleting ----------------------------------------------------------------


def _claim(engine: Engine, candidate: Candidate, reason: str, token: str,
           now: datetime) -> list[tuple[int, int]]:
    """Claim the study's finished, unpruned versions; [(version id, version)] or [] if lost.

    The study's versions are locked (PostgreSQL) and checked again inside the
    claiming transaction, so a concurrent requeue either comes first (the study
    is no longer finished: nothing is claimed) or finds the claim and refuses.
    """
    try:
        with session_scope(engine) as session:
            locked = select(StudyVersion.id, StudyVersion.version, StudyVersion.state).where(
                StudyVersion.study_id == candidate.study_id
            )
            if engine.dialect.name == "postgresql":
                locked = locked.with_for_update()
            versions = session.execute(locked).all()
            if any(v.state not in FINISHED for v in versions):
                return []
            blocked = any(
                session.execute(q.where(StudyVersion.study_id == candidate.study_id).limit(1))
                .first() is not None
                for q in _blocked_study_ids()[1:]  # running analysis, report not delivered
            )
            if blocked:
                return []
            done = set(session.scalars(select(SpoolPrune.study_version_id).where(
                SpoolPrune.study_version_id.in_([v.id for v in versions]))))
            claimed = [(v.id, v.version) for v in versions if v.id not in done]
            session.add_all(
                SpoolPrune(study_version_id=vid, reason=reason, state=PruneState.PRUNING,
                           claimed_by=token, claimed_at=now, files_removed=0, bytes_freed=0)
                for vid, _ in claimed
            )
            session.flush()
    except IntegrityError:  # another process claimed a version of it first
        logger.info("study %s is being pruned by another process", candidate.study_instance_uid)
        return []
    return claimed


def _delete(spool_dir: Path, paths: Sequence[str]) -> tuple[int, int]:
    """Remove the files; (files removed, bytes freed). Files already gone are no error."""
    removed = freed = 0
    for relative in paths:
        path = spool_dir / relative
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        freed += size
    return removed, freed


def _finish(engine: Engine, version_ids: Sequence[int], token: str, removed: int, freed: int,
            now: datetime) -> None:
    """Stamp the claimed rows pruned; the study's counts go on its first version's row."""
    with session_scope(engine) as session:
        for index, vid in enumerate(sorted(version_ids)):
            session.execute(
                update(SpoolPrune)
                .where(SpoolPrune.study_version_id == vid, SpoolPrune.claimed_by == token)
                .values(state=PruneState.PRUNED, pruned_at=now,
                        files_removed=removed if index == 0 else 0,
                        bytes_freed=freed if index == 0 else 0)
                .execution_options(synchronize_session=False)
            )


def _prune_study(engine: Engine, settings: Settings, candidate: Candidate, reason: str,
                 now: datetime) -> PrunedStudy | None:
    token = claim_token()
    claimed = _claim(engine, candidate, reason, token, now)
    if not claimed:
        return None
    with session_scope(engine) as session:
        paths = _instance_paths(session, [vid for vid, _ in claimed])
    removed, freed = _delete(settings.spool_dir, paths)
    _finish(engine, [vid for vid, _ in claimed], token, removed, freed, utcnow())
    logger.info("pruned study %s versions %s (%s): %d files, %d bytes",
                candidate.study_instance_uid, [v for _, v in claimed], reason, removed, freed)
    return PrunedStudy(candidate.study_instance_uid, tuple(sorted(v for _, v in claimed)), reason,
                       candidate.last_received_at, removed, freed)


def _dry_run_study(session: Session, settings: Settings, candidate: Candidate) -> PrunedStudy:
    already = select(SpoolPrune.study_version_id)
    versions = session.execute(
        select(StudyVersion.id, StudyVersion.version).where(
            StudyVersion.study_id == candidate.study_id, StudyVersion.id.not_in(already))
    ).all()
    files = sizes = 0
    for relative in _instance_paths(session, [v.id for v in versions]):
        try:
            sizes += (settings.spool_dir / relative).lstat().st_size
            files += 1
        except FileNotFoundError:
            continue
    return PrunedStudy(candidate.study_instance_uid, tuple(sorted(v.version for v in versions)),
                       REASON_RETENTION, candidate.last_received_at, files, sizes)


def _take_over_stale(engine: Engine, settings: Settings, now: datetime) -> list[PrunedStudy]:
    """Finish prunes whose holder died mid-way (claimed long ago, never stamped)."""
    with session_scope(engine) as session:
        stale = session.execute(
            select(SpoolPrune.id, SpoolPrune.study_version_id, SpoolPrune.claimed_by,
                   SpoolPrune.reason, StudyVersion.version, StudyVersion.last_received_at,
                   Study.study_instance_uid)
            .join(StudyVersion, StudyVersion.id == SpoolPrune.study_version_id)
            .join(Study, Study.id == StudyVersion.study_id)
            .where(SpoolPrune.state == PruneState.PRUNING,
                   SpoolPrune.claimed_at < now - STALE_CLAIM)
        ).all()
    done: list[PrunedStudy] = []
    for row in stale:
        token = claim_token()
        with session_scope(engine) as session:
            won = session.execute(
                update(SpoolPrune)
                .where(SpoolPrune.id == row.id, SpoolPrune.claimed_by == row.claimed_by,
                       SpoolPrune.state == PruneState.PRUNING)
                .values(claimed_by=token, claimed_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount == 1  # type: ignore[attr-defined]
            paths = _instance_paths(session, [row.study_version_id]) if won else []
        if not won:
            continue
        removed, freed = _delete(settings.spool_dir, paths)
        _finish(engine, [row.study_version_id], token, removed, freed, utcnow())
        logger.warning("finished the abandoned prune of study %s version %d",
                       row.study_instance_uid, row.version)
        done.append(PrunedStudy(row.study_instance_uid, (row.version,), row.reason,
                                row.last_received_at, removed, freed))
    return done


# --- the entry points ---------------------------------------------------------------------


def prune(
    engine: Engine,
    settings: Settings,
    *,
    older_than_days: float | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    free: FreeBytes | None = None,
) -> PruneResult:
    """Remove the source instances of finished studies past retention, then clean if short.

    ``older_than_days`` overrides ``CTDX_RETENTION_DAYS``. A dry run claims
    and deletes nothing and reports what retention would remove (emergency
    cleaning depends on what the deletions free, so it is not simulated).
    ``free`` reads the free bytes (default: :func:`free_bytes` of the spool).
    """
    now = now or utcnow()
    days = settings.retention_days if older_than_days is None else older_than_days
    cutoff = now - timedelta(days=days)
    read_free = free or (lambda: free_bytes(settings.spool_dir))
    before = read_free()
    pruned: list[PrunedStudy] = []
    if dry_run:
        with session_scope(engine) as session:
            pruned = [_dry_run_study(session, settings, c)
                      for c in finished_studies(session, cutoff)]
        return PruneResult(True, days, cutoff, before, before, settings.emergency_free_bytes,
                           tuple(pruned))
    pruned.extend(_take_over_stale(engine, settings, now))
    while True:
        with session_scope(engine) as session:
            batch = finished_studies(session, cutoff, limit=50)
        progressed = False
        for candidate in batch:
            done = _prune_study(engine, settings, candidate, REASON_RETENTION, now)
            if done is not None:
                pruned.append(done)
                progressed = True
        if len(batch) < 50 or not progressed:
            break
    pruned.extend(_emergency(engine, settings, read_free, now))
    reports, report_bytes = _prune_reports(engine, settings, now)
    return PruneResult(False, days, cutoff, before, read_free(), settings.emergency_free_bytes,
                       tuple(pruned), reports, report_bytes)


def _prune_reports(engine: Engine, settings: Settings, now: datetime) -> tuple[int, int]:
    """Delete report objects past ``CTDX_REPORT_RETENTION_DAYS`` whose exports all delivered."""
    if settings.report_retention_days is None:
        return 0, 0
    cutoff = now - timedelta(days=settings.report_retention_days)
    delivered = func.sum(case((Export.state == ExportState.DELIVERED, 1), else_=0))
    with session_scope(engine) as session:
        paths = list(session.scalars(
            select(Export.path)
            .where(Export.path.not_in(select(ReportPrune.path)))
            .group_by(Export.path)
            .having(func.max(Export.created_at) < cutoff, delivered == func.count(Export.id))
        ))
    removed = freed = 0
    for relative in paths:
        try:
            with session_scope(engine) as session:  # the claim: one row per path
                row = ReportPrune(path=relative, pruned_at=now, bytes_freed=0)
                session.add(row)
                session.flush()
                row_id = row.id
        except IntegrityError:
            continue  # another process has it
        done, size = _delete(settings.data_dir, [relative])
        with session_scope(engine) as session:
            session.execute(update(ReportPrune).where(ReportPrune.id == row_id)
                            .values(bytes_freed=size, pruned_at=utcnow())
                            .execution_options(synchronize_session=False))
        removed += done
        freed += size
    if removed:
        logger.info("pruned %d delivered report objects (%d bytes)", removed, freed)
    return removed, freed


def _emergency(engine: Engine, settings: Settings, read_free: FreeBytes,
               now: datetime) -> list[PrunedStudy]:
    """Oldest finished studies first, until the free space is back above the high-water mark."""
    mark = settings.emergency_free_bytes
    if mark <= 0 or read_free() >= mark:
        return []
    logger.warning("free space under the spool is below %d bytes: pruning the oldest finished "
                   "studies before their retention is over", mark)
    pruned: list[PrunedStudy] = []
    skipped: set[int] = set()
    while read_free() < mark:
        with session_scope(engine) as session:
            batch = [c for c in finished_studies(session, None, limit=len(skipped) + 1)
                     if c.study_id not in skipped]
        if not batch:
            logger.error("free space is still below %d bytes and no finished study is left to "
                         "prune (the rest is not analysed or not delivered yet)", mark)
            break
        done = _prune_study(engine, settings, batch[0], REASON_EMERGENCY, now)
        if done is None:
            skipped.add(batch[0].study_id)
        else:
            pruned.append(done)
    return pruned


class PruneLoop:
    """Runs :func:`prune` every ``CTDX_PRUNE_INTERVAL_SECONDS`` (``ctdx worker``'s main process).

    Any number of loops may run against one database and spool: the claims
    keep them from deleting the same study twice.
    """

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def run_once(self) -> PruneResult | None:
        try:
            result = prune(self.engine, self.settings)
        except (SQLAlchemyError, OSError):
            logger.exception("spool pruning failed; trying again in %.0f s",
                             self.settings.prune_interval_seconds)
            return None
        if result.studies:
            logger.info("spool pruning: %d studies, %d files, %d bytes freed",
                        len(result.studies), result.files_removed, result.bytes_freed)
        return result

    def run(self, stop: threading.Event) -> None:
        interval = self.settings.prune_interval_seconds
        logger.info("spool pruning loop started (every %.0f s, retention %.1f days)",
                    interval, self.settings.retention_days)
        while not stop.is_set():
            self.run_once()
            stop.wait(interval)

    def start(self) -> tuple[threading.Thread, threading.Event] | None:
        """Run in a daemon thread; None when pruning is turned off (interval 0)."""
        if self.settings.prune_interval_seconds <= 0:
            return None
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="ctdx-prune", daemon=True)
        thread.start()
        return thread, stop
