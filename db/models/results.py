"""Tables written by the worker (migrations 0002, 0005): one analysis per study version and model.

A slice is identified by its SOP Instance UID **and** ``frame_number`` (1-based,
NULL for a single-frame instance): an Enhanced CT instance holds many slices.
Within an analysis a slice is unique by ``slice_index`` (its place in position
order), never by SOP Instance UID.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ctdx.db.models.base import Base, UTCDateTime, utcnow

#: The study calls the worker stores in ``Analysis.decision`` (the recognition classes of
#: ``ctdx.model_train.method.classes``, in its order; tests/test_structure.py holds them equal).
STUDY_DECISIONS: Final[tuple[str, ...]] = ("covid19", "other_pneumonia", "normal")


class AnalysisState(StrEnum):
    RUNNING = "running"  # claimed by a worker
    ANALYSED = "analysed"
    FAILED = "failed"  # permanent: failure_reason says why; kept for an operator


class Analysis(Base):
    """Result of one model on one study version; unique so a redelivered task does nothing."""

    __tablename__ = "analyses"
    __table_args__ = (UniqueConstraint("study_version_id", "model_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=AnalysisState.RUNNING, index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_uid: Mapped[str] = mapped_column(String(64))
    manifestation_model_uid: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(128))  # hostname:pid
    device: Mapped[str | None] = mapped_column(String(128))  # e.g. "cuda:0 (NVIDIA H100), bf16 ..."
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_selection: Mapped[str | None] = mapped_column(Text)  # why this series was chosen
    slices_total: Mapped[int | None] = mapped_column(Integer)
    slices_analysed: Mapped[int | None] = mapped_column(Integer)
    slices_skipped: Mapped[int | None] = mapped_column(Integer)
    fraction_covid19: Mapped[float | None] = mapped_column(Float)
    fraction_other_pneumonia: Mapped[float | None] = mapped_column(Float)
    fraction_normal: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(32), index=True)
    threshold: Mapped[float | None] = mapped_column(Float)
    # operating_points.id of the site's adopted operating point the threshold came from
    # (migration 0008; no foreign key, see there); NULL: the configured threshold
    operating_point_id: Mapped[int | None] = mapped_column(Integer)
    manifestation_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # seconds per stage
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # report objects that failed the checks before the export outbox and were not sent
    # (migration 0006): one line per object, "<kind> <SOP Instance UID>: <problems>"
    report_problems: Mapped[str | None] = mapped_column(Text)

    slices: Mapped[list[SliceResult]] = relationship(back_populates="analysis")


class SliceResult(Base):
    __tablename__ = "slice_results"
    __table_args__ = (UniqueConstraint("analysis_id", "slice_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    frame_number: Mapped[int | None] = mapped_column(Integer)  # 1-based; NULL: single-frame
    slice_index: Mapped[int] = mapped_column(Integer)  # 0 = first in position order
    position_z: Mapped[float | None] = mapped_column(Float)
    lung_area_mm2: Mapped[float | None] = mapped_column(Float)
    lung_fraction: Mapped[float] = mapped_column(Float)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    p_covid19: Mapped[float | None] = mapped_column(Float)
    p_other_pneumonia: Mapped[float | None] = mapped_column(Float)
    p_normal: Mapped[float | None] = mapped_column(Float)
    predicted_class: Mapped[str | None] = mapped_column(String(32))
    p_ground_glass_opacity: Mapped[float | None] = mapped_column(Float)
    p_consolidation: Mapped[float | None] = mapped_column(Float)
    p_fibrotic_streaks: Mapped[float | None] = mapped_column(Float)
    manifestation: Mapped[str | None] = mapped_column(String(32))

    analysis: Mapped[Analysis] = relationship(back_populates="slices")
