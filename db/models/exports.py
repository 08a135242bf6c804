"""Export outbox (migration 0003): one row per report object and destination.

A row is created only after its file is durably on disk (``path``, relative to
the data dir). Delivery claims a row by moving ``next_attempt_at`` forward by a
lease and writing ``claimed_by`` in one compare-and-set ``UPDATE``; only the
claimant's outcome is recorded (``WHERE claimed_by = :token``). See
``worker/report/outbox.py``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ctdx.db.models.base import Base, UTCDateTime, utcnow


class ExportState(StrEnum):
    PENDING = "pending"  # to be sent at next_attempt_at
    DELIVERED = "delivered"  # PACS answered 0x0000 (or a documented warning)
    DEAD = "dead"  # retries exhausted; an operator may `ctdx exports retry`


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # "sr" | "sc" | "ko"
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    replaces_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to the data dir
    state: Mapped[str] = mapped_column(String(16), default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last C-STORE
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # host:pid/token while sending
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
