"""Tables written by the listener (migration 0001): what arrived, and what to queue."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ctdx.db.models.base import Base, UTCDateTime, utcnow


class VersionState(StrEnum):
    """Life of one study version. Strings are stored; the CLI filters on them."""

    RECEIVING = "receiving"  # instances arriving; quiet period not over
    COMPLETE = "complete"  # complete, in the outbox, not yet handed to the broker
    QUEUED = "queued"  # handed to the broker
    PROCESSING = "processing"  # claimed by a worker
    ANALYSED = "analysed"  # results stored
    FAILED = "failed"  # cannot be analysed; reason in analyses.failure_reason


class Study(Base):
    """One Study Instance UID. Patient fields are PHI: only the CLI's --show-phi prints them."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[StudyVersion]] = relationship(back_populates="study")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class StudyVersion(Base):
    """A study as one batch of arrivals. Instances arriving after completion open version n+1."""

    __tablename__ = "study_versions"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=VersionState.RECEIVING, index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completion_reason: Mapped[str | None] = mapped_column(String(16))  # "quiet" | "mpps"
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="versions")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the spool directory."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ReceivingLease(Base):
    """An association that is sending a study version; completion waits while one is live.

    A crashed listener's leases expire on their own (``expires_at``).
    """

    __tablename__ = "receiving_leases"
    __table_args__ = (UniqueConstraint("study_version_id", "holder"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PerformedProcedureStep(Base):
    """MPPS instances received by N-CREATE / N-SET."""

    __tablename__ = "performed_procedure_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))  # IN PROGRESS | COMPLETED | DISCONTINUED
    referenced_sop_instance_uids: Mapped[str] = mapped_column(Text, default="")  # newline-separated
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # set once a COMPLETED step has completed its study versions (or had nothing to complete),
    # so the completion loop stops looking at it
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OutboxEntry(Base):
    """A completed study version waiting to be (or already) handed to the broker."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), unique=True)
    task_name: Mapped[str] = mapped_column(String(64), default="ctdx.process_study")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
