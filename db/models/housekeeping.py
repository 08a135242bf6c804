"""Running for months (migration 0009): pruned spool records, the alert outbox, test studies.

``spool_prunes``: one row per study version whose source instances were (or are
being) deleted from the spool by :mod:`db.retention`. The row is the claim: it
is inserted (unique per version) *before* any file is deleted, so several
listener and worker processes on several hosts never prune the same version
twice, and ``ctdx studies requeue`` refuses a version that has one.

``alerts``: one row per webhook event and receiver URL, delivered by
:mod:`ctdx.db.alerts` with retries; claimed like the export outbox
(``claimed_by`` + lease in ``next_attempt_at``).

``report_prunes``: report objects ctdx wrote (SR, SC, KO under the data dir)
deleted after ``CTDX_REPORT_RETENTION_DAYS``; the row (unique per path) is
inserted before the file is deleted.

``selftest_studies``: studies sent by ``ctdx selftest``; ``destination`` is
where the worker sends their reports (``AE@host:port``), NULL = the configured
PACS (``--to-pacs``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ctdx.db.models.base import Base, UTCDateTime, utcnow


class PruneState(StrEnum):
    PRUNING = "pruning"  # claimed; files being deleted (a stale claim is taken over)
    PRUNED = "pruned"  # every source instance of the version is gone from the spool


class SpoolPrune(Base):
    __tablename__ = "spool_prunes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), unique=True)
    reason: Mapped[str] = mapped_column(String(16))  # "retention" | "emergency"
    state: Mapped[str] = mapped_column(String(16), default=PruneState.PRUNING)
    claimed_by: Mapped[str] = mapped_column(String(128))  # host:pid/token
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    pruned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    files_removed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_freed: Mapped[int] = mapped_column(BigInteger, default=0)


class ReportPrune(Base):
    __tablename__ = "report_prunes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(512), unique=True)  # relative to the data dir
    pruned_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    bytes_freed: Mapped[int] = mapped_column(BigInteger, default=0)


class AlertState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("dedup_key", "url"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    dedup_key: Mapped[str] = mapped_column(String(128))  # one alert per event and subject
    url: Mapped[str] = mapped_column(String(512))
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, signed as it is
    state: Mapped[str] = mapped_column(String(16), default=AlertState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)  # HTTP status of the last try
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SelftestStudy(Base):
    __tablename__ = "selftest_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    destination: Mapped[str | None] = mapped_column(String(128))  # AE@host:port; NULL = PACS
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
