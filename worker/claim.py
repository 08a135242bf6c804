"""Claiming a study version in the database: what makes ``ctdx.process_study`` idempotent.

One ``analyses`` row per (study version, recognition model UID) is the claim
and, later, the result. A task

- finds no row: inserts one (``INSERT ... ON CONFLICT DO NOTHING``; of two
  racing workers exactly one gets the row) and analyses;
- finds a finished row (``analysed`` or ``failed``): does nothing;
- finds a ``running`` row held by a live worker: does nothing now
  (:attr:`ClaimStatus.BUSY`; the task re-checks later, see ``ctdx.worker.tasks``);
- finds a ``running`` row whose holder is gone takes it over with a
  compare-and-swap ``UPDATE ... WHERE worker = :old AND attempts = :n``: the
  row changes hands exactly once however many workers try at the same time,
  on SQLite and PostgreSQL alike (no ``SELECT ... FOR UPDATE`` needed).

A holder is gone when its heartbeat is older than ``settings.claim_timeout``
(the holder's :class:`ClaimKeeper` refreshes it while it works), or at once
when it ran on this host and its process no longer exists: the redelivery that
``task_reject_on_worker_lost`` sends after a SIGKILL then needs no waiting.
Clocks of different hosts are compared, so the timeout must dwarf their skew.

A study that keeps killing its workers (out of memory, a crashing decoder) is
failed after :data:`MAX_ATTEMPTS` takeovers instead of looping forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ctdx.db.models import Analysis, AnalysisState, StudyVersion, VersionState, utcnow
from ctdx.db.session import session_scope

logger = logging.getLogger(__name__)

#: Takeovers after which a study is failed instead of being tried again.
MAX_ATTEMPTS = 3


class ClaimStatus(StrEnum):
    CLAIMED = "claimed"  # this worker owns the analysis: go ahead
    DONE = "done"  # already analysed or failed with this model: nothing to do
    BUSY = "busy"  # a live worker holds it: nothing to do now


@dataclass(frozen=True)
class ModelIdentity:
    """What the ``analyses`` row records about the models (the claim is per ``model_uid``)."""

    model_name: str
    model_version: str
    model_uid: str
    manifestation_model_uid: str | None = None


@dataclass(frozen=True)
class Claim:
    status: ClaimStatus
    analysis_id: int | None
    attempts: int = 0
    worker: str | None = None  # our identity when CLAIMED, the holder's otherwise
    taken_over_from: str | None = None


def new_worker_identity() -> str:
    """``host:pid/token``; a fresh token per task execution, so no two executions share a claim."""
    return f"{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:12]}"


def holder_is_dead(holder: str | None) -> bool:
    """True only when ``holder`` ran on this host and its process is gone (or a zombie).

    Holders on other hosts are never declared dead here: their heartbeat decides.
    """
    if not holder:
        return False
    host, _, rest = holder.rpartition(":")
    pid_text = rest.split("/", 1)[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        # state is the field after the parenthesised command name
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _insert_claim(
    session: Session, study_version_id: int, model: ModelIdentity, worker: str, now: datetime
) -> int | None:
    values = {
        "study_version_id": study_version_id,
        "state": AnalysisState.RUNNING.value,
        "model_name": model.model_name,
        "model_version": model.model_version,
        "model_uid": model.model_uid,
        "manifestation_model_uid": model.manifestation_model_uid,
        "worker": worker,
        "attempts": 1,
        "claimed_at": now,
        "heartbeat_at": now,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(Analysis)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["study_version_id", "model_uid"])
        .returning(Analysis.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def _set_version_state(session: Session, study_version_id: int, state: VersionState) -> None:
    session.execute(
        update(StudyVersion).where(StudyVersion.id == study_version_id).values(state=state.value)
    )


def claim(
    engine: Engine,
    study_version_id: int,
    model: ModelIdentity,
    worker: str,
    claim_timeout: float,
    now: datetime | None = None,
) -> Claim:
    """Try to become the one worker analysing ``study_version_id`` with ``model``."""
    now = now or utcnow()
    with session_scope(engine) as session:
        new_id = _insert_claim(session, study_version_id, model, worker, now)
        if new_id is not None:
            _set_version_state(session, study_version_id, VersionState.PROCESSING)
            logger.info("study version %d: claimed (analysis %d)", study_version_id, new_id)
            return Claim(ClaimStatus.CLAIMED, new_id, 1, worker)

    with session_scope(engine) as session:
        row = session.execute(
            select(Analysis.id, Analysis.state, Analysis.worker, Analysis.heartbeat_at,
                   Analysis.attempts).where(
                Analysis.study_version_id == study_version_id,
                Analysis.model_uid == model.model_uid,
            )
        ).one()
        if row.state != AnalysisState.RUNNING:
            logger.info("study version %d: already %s (analysis %d), nothing to do",
                        study_version_id, row.state, row.id)
            # a requeued or redelivered version must not stay "queued": it is done
            done = (VersionState.ANALYSED if row.state == AnalysisState.ANALYSED
                    else VersionState.FAILED)
            _set_version_state(session, study_version_id, done)
            return Claim(ClaimStatus.DONE, row.id, row.attempts, row.worker)
        stale = row.heartbeat_at < now - timedelta(seconds=claim_timeout)
        if not (stale or holder_is_dead(row.worker)):
            logger.info("study version %d: held by live worker %s (analysis %d)",
                        study_version_id, row.worker, row.id)
            return Claim(ClaimStatus.BUSY, row.id, row.attempts, row.worker)
        taken = session.execute(
            update(Analysis)
            .where(
                Analysis.id == row.id,
                Analysis.state == AnalysisState.RUNNING.value,
                Analysis.worker == row.worker,
                Analysis.attempts == row.attempts,
            )
            .values(worker=worker, attempts=row.attempts + 1, claimed_at=now, heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            logger.info("study version %d: another worker took it over first", study_version_id)
            return Claim(ClaimStatus.BUSY, row.id, row.attempts, None)
        attempts = row.attempts + 1
        if attempts > MAX_ATTEMPTS:
            reason = (
                f"analysis interrupted {row.attempts} times (worker killed, out of memory "
                "or time limit); not tried again"
            )
            _fail(session, row.id, study_version_id, reason, now)
            logger.error("study version %d: %s", study_version_id, reason)
            return Claim(ClaimStatus.DONE, row.id, attempts, worker)
        _set_version_state(session, study_version_id, VersionState.PROCESSING)
        logger.warning(
            "study version %d: took over analysis %d from %s (%s), attempt %d",
            study_version_id, row.id, row.worker, "stale heartbeat" if stale else "process gone",
            attempts,
        )
        return Claim(ClaimStatus.CLAIMED, row.id, attempts, worker, taken_over_from=row.worker)


def _fail(session: Session, analysis_id: int, study_version_id: int, reason: str,
          now: datetime) -> None:
    session.execute(
        update(Analysis)
        .where(Analysis.id == analysis_id)
        .values(state=AnalysisState.FAILED.value, failure_reason=reason, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    _set_version_state(session, study_version_id, VersionState.FAILED)


def heartbeat(engine: Engine, analysis_id: int, worker: str) -> bool:
    """Refresh our claim; False when it is no longer ours (taken over or finished)."""
    with session_scope(engine) as session:
        result = session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.worker == worker,
                   Analysis.state == AnalysisState.RUNNING.value)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release(engine: Engine, analysis_id: int, worker: str) -> None:
    """Give a claim up after a transient error, so the retry can take it over at once."""
    with session_scope(engine) as session:
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.worker == worker,
                   Analysis.state == AnalysisState.RUNNING.value)
            .values(heartbeat_at=datetime(1970, 1, 1, tzinfo=utcnow().tzinfo))
            .execution_options(synchronize_session=False)
        )


class ClaimKeeper:
    """Heartbeats a claim from a daemon thread while the study is analysed.

    ``lost`` is set when the claim was taken over (we looked dead: a long
    database outage); the results of this attempt must then be discarded.
    """

    def __init__(self, engine: Engine, analysis_id: int, worker: str, interval: float) -> None:
        self._engine = engine
        self._analysis_id = analysis_id
        self._worker = worker
        self._interval = interval
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"claim-heartbeat-{analysis_id}", daemon=True
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not heartbeat(self._engine, self._analysis_id, self._worker):
                    logger.error("analysis %d: claim lost to another worker", self._analysis_id)
                    self.lost.set()
                    return
            except Exception:  # a database hiccup: the next beat may succeed
                logger.warning("analysis %d: heartbeat failed", self._analysis_id, exc_info=True)

    def __enter__(self) -> ClaimKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
