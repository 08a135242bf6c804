"""What ``ctdx worker``'s main process runs beside the export delivery for months unattended.

Two daemon threads, each with its own engine: spool pruning
(:class:`ctdx.scp.retention.PruneLoop`, every ``CTDX_PRUNE_INTERVAL_SECONDS``;
retention and emergency cleaning) and alert delivery (:class:`ctdx.db.alerts.AlertLoop`,
when ``CTDX_ALERT_WEBHOOK_URLS`` is set). Every worker host may run them: claims
in the database keep them from doing the same work twice.
"""

from __future__ import annotations

import logging
import threading

from ctdx.db.alerts import AlertLoop
from ctdx.db.session import make_engine
from ctdx.db.settings import Settings
from ctdx.scp.retention import PruneLoop

logger = logging.getLogger(__name__)


def start(settings: Settings) -> list[threading.Event]:
    """Start the loops that are turned on; set the returned events to stop them."""
    stops: list[threading.Event] = []
    for loop in (PruneLoop(make_engine(settings.resolved_database_url), settings),
                 AlertLoop(make_engine(settings.resolved_database_url), settings)):
        started = loop.start()
        if started is not None:
            stops.append(started[1])
    return stops
