"""The site's adopted operating points (migration 0008): which threshold a model runs at, and why.

Written by ``ctdx validate adopt`` (:mod:`db.operating_points`) from a local
validation (``ctdx validate run``), with an audit row in the same transaction.
The worker uses the newest row for its model's UID; an analysis made at that
point names it in ``analyses.operating_point_id`` so its report can state the
validation it rests on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ctdx.db.models.base import Base, UTCDateTime, utcnow


class OperatingPoint(Base):
    __tablename__ = "operating_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adopted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    adopted_by: Mapped[str] = mapped_column(String(128))  # OS user@host
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_uid: Mapped[str] = mapped_column(String(64), index=True)
    threshold: Mapped[float] = mapped_column(Float)  # share of analysed slices, 0..1
    choice: Mapped[str] = mapped_column(String(32))  # "target_sensitivity" or "paper"
    target_sensitivity: Mapped[float | None] = mapped_column(Float)
    validated_at: Mapped[datetime] = mapped_column(UTCDateTime)  # when `validate run` ran
    n_studies: Mapped[int] = mapped_column(Integer)
    n_positive: Mapped[int] = mapped_column(Integer)
    n_negative: Mapped[int] = mapped_column(Integer)
    sensitivity: Mapped[float] = mapped_column(Float)
    sensitivity_low: Mapped[float] = mapped_column(Float)  # Wilson 95% interval
    sensitivity_high: Mapped[float] = mapped_column(Float)
    specificity: Mapped[float] = mapped_column(Float)
    specificity_low: Mapped[float] = mapped_column(Float)
    specificity_high: Mapped[float] = mapped_column(Float)
    positive_rate: Mapped[float] = mapped_column(Float)  # share called COVID-19 (drift baseline)
    auc: Mapped[float | None] = mapped_column(Float)
    source_dir: Mapped[str | None] = mapped_column(Text)  # the validation's output folder
    truth_sha256: Mapped[str] = mapped_column(String(64))  # of the TRUTH.csv used
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the validation's metrics
