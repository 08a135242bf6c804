"""Reports back to PACS: DICOM SR (highdicom), export outbox, delivery.

Public API:

- :func:`publish_reports` (the worker calls it after an analysis is committed):
  build the report objects, record them in the export outbox, try to deliver.
- :class:`DeliveryLoop` (``ctdx worker``'s main process, or a thread in
  embedded mode) and :func:`deliver_due`: deliver what is due, retrying with
  backoff, dead-lettering after ``CTDX_EXPORT_MAX_ATTEMPTS``.
- :func:`ctdx.worker.report.outbox.list_exports` for tests and tools; operators retry dead
  exports with ``ctdx exports retry`` (``ctdx.db.operations.retry_export``).

docs/sr-content.md describes the SR's content and codes.
"""

from __future__ import annotations

from ctdx.worker.report.delivery import DeliveryLoop, deliver_due
from ctdx.worker.report.errors import AnalysisNotReportable, ReportError, SourceImageMissing
from ctdx.worker.report.publish import publish_reports

__all__ = [
    "AnalysisNotReportable",
    "DeliveryLoop",
    "ReportError",
    "SourceImageMissing",
    "deliver_due",
    "publish_reports",
]
