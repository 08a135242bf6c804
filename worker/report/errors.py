"""The report package's domain exceptions.

- :class:`ReportError`: a report cannot be built for an analysis (it is not
  analysed, its source images are gone from the spool). Raised by
  :func:`ctdx.worker.report.publish_reports`; the worker decides what to do with it.
- :class:`DeliveryError`: one C-STORE did not end in a success status. Never
  leaves the package: :mod:`ctdx.worker.report.outbox` turns it into a retry with
  backoff, or a dead letter once the attempts are used up.

Messages name UIDs and surrogate keys only, never patient data.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class ReportError(Exception):
    """A report cannot be built for this analysis."""


class AnalysisNotReportable(ReportError):
    """The analysis does not exist or holds no result (running, failed)."""


class SourceImageMissing(ReportError):
    """An image the report copies from or references is not readable in the spool."""


class DeliveryError(Exception):
    """A C-STORE that did not succeed; ``status`` is the DIMSE status when the PACS answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
