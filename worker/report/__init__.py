"""Reports back to PACS: DICOM SR (highdicom), export outbox, delivery."""

from __future__ import annotations

from sqlalchemy import Engine

from db.settings import Settings


def publish_reports(engine: Engine, analysis_id: int, settings: Settings) -> None:
    """Build the report objects of an analysed study and try to deliver them at once.

    Called by the worker after the analysis is committed. Must not raise for
    delivery problems (they are retried from the export outbox).
    """
