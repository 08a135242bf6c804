"""Where an analysis's report objects go: the configured PACS, or a self-test's stand-in.

A study sent by ``ctdx selftest`` (:mod:`ctdx.db.selftest_studies`) carries its own
destination, recorded before it was sent: the stand-in PACS the command
started, or the configured PACS when it ran with ``--to-pacs``. A study marked
as a test (Patient ID ``CTDX-SELFTEST``) that ``ctdx selftest`` did not record
is sent nowhere: test images never reach the PACS by accident.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from ctdx.db.selftest_studies import routing_of
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.worker.report.outbox import Destination, destination_from

logger = logging.getLogger(__name__)


def destination_for(engine: Engine, analysis_id: int, settings: Settings) -> Destination | None:
    """The destination of the analysis's reports; None = built, not sent."""
    with session_scope(engine) as session:
        routing = routing_of(session, analysis_id)
    if not routing.is_test:
        return destination_from(settings)
    if not routing.registered:
        logger.warning("analysis %d is of a study marked as a self-test but not sent by "
                       "`ctdx selftest`: its reports are not sent", analysis_id)
        return None
    if routing.destination is None:
        return destination_from(settings)
    try:
        return Destination.parse(routing.destination)
    except ValueError:
        logger.error("analysis %d: self-test destination %r is not AE@host:port; reports not sent",
                     analysis_id, routing.destination)
        return None
