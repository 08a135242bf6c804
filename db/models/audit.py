"""Operator actions (migration 0004): who did what, when.

Written by :mod:`ctdx.db.operations` in the same transaction as the action itself.
``detail`` is a JSON object with the state before the action (e.g. an export's
attempts and last error, which the retry resets).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ctdx.db.models.base import Base, UTCDateTime, utcnow


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # OS user@host
    action: Mapped[str] = mapped_column(String(64))  # e.g. "studies.requeue"
    target: Mapped[str] = mapped_column(String(128), index=True)  # study UID or export id
    detail: Mapped[str | None] = mapped_column(Text)  # JSON object
