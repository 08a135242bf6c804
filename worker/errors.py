"""The worker's domain exceptions.

Two families, translated only at the task edge (``ctdx.worker.tasks``):

- :class:`AnalysisError`: the study itself cannot be analysed (no usable CT
  series, undecodable pixel data). Permanent: the study version is marked
  ``failed`` with ``str(exc)`` as the reason, kept for an operator, and the
  task is not retried. Messages are read by people: they name the series or
  SOP Instance UID and never carry patient data.
- :data:`TRANSIENT_ERRORS`: the database or broker hiccuped; retried.
- :class:`WorkerNotReady`: this worker cannot analyse anything (no model
  configured, checkpoint unreadable). Not the study's fault, so the study is
  not failed; the task is retried later.
"""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError as BrokerOperationalError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

logger = logging.getLogger(__name__)

#: Errors that say nothing about the study: the database or broker was briefly unreachable.
#: The task retries them with backoff (``ctdx.worker.tasks``).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,  # includes SQLite "database is locked" and PostgreSQL disconnects
    InterfaceError,
    DisconnectionError,
    PoolTimeoutError,
    BrokerOperationalError,
)


class AnalysisError(Exception):
    """A study version that cannot be analysed; the message is the operator's reason."""


class NoUsableSeries(AnalysisError):
    """No series of the study passes the series-selection filters."""


class UndecodablePixelData(AnalysisError):
    """An instance whose pixel data (or header) cannot be decoded."""

    def __init__(self, sop_instance_uid: str, detail: str) -> None:
        super().__init__(f"cannot decode pixel data of SOP Instance {sop_instance_uid}: {detail}")
        self.sop_instance_uid = sop_instance_uid


class InconsistentSeries(AnalysisError):
    """The chosen series cannot be stacked (missing positions, differing image sizes)."""


class WorkerNotReady(RuntimeError):
    """The worker lacks what every analysis needs (model, database schema)."""
