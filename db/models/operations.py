"""Operations (migration 0007): which ctdx services are alive, as they say themselves.

Each listener (primary process) and each worker (main process) writes one row
and refreshes ``seen_at`` while it runs; ``ctdx status`` reports a kind of
service that has not been seen recently. A row is per process (``name`` is
``kind:host:pid``), so a restarted service adds a row; rows not seen for a day
are deleted by the services themselves.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from ctdx.db.models.base import Base, UTCDateTime, utcnow


class ServiceKind(StrEnum):
    LISTENER = "listener"
    WORKER = "worker"


class ServiceHeartbeat(Base):
    __tablename__ = "service_heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(192), unique=True)  # kind:host:pid
    kind: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # e.g. the worker's queues
