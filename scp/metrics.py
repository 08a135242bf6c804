"""The listener's Prometheus metrics (``CTDX_METRICS_PORT``, default 9108; 0 = off).

Counted in every listener process (multiprocess mode, see :mod:`ctdx.db.metrics`)
and served by the primary: instances received by C-STORE status, bytes,
open associations, refusals by reason, studies handed to the broker and
published again, whether the broker answered. Read from the database at
scrape time: outbox depth and age, study versions by state, studies
completed.

The receive path calls :func:`observe_store` once per C-STORE and binds
:func:`event_bindings` next to its own handlers: cheap, and without effect on
the DICOM answer if metrics fail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ctdx.db.models import utcnow
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.scp.status import Status

logger = logging.getLogger(__name__)

__all__ = [
    "ListenerMetrics",
    "event_bindings",
    "listener_metrics",
    "observe_store",
    "process_exited",
    "start",
]

_lock = threading.Lock()
_metrics: ListenerMetrics | None = None


@dataclass(frozen=True)
class ListenerMetrics:
    instances: Any  # Counter, label status ("0x0000", "0xA700", ...)
    received_bytes: Any  # Counter
    open_associations: Any  # Gauge (livesum)
    refusals: Any  # Counter, label reason
    dispatched: Any  # Counter: outbox rows handed to the broker
    republished: Any  # Counter, label reason ("unclaimed", "stale claim")
    broker_up: Any  # Gauge (livemax): the dispatcher's last contact worked


def listener_metrics() -> ListenerMetrics:
    """This process's metric objects, created on first use (after :func:`db.metrics.prepare`)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge

            _metrics = ListenerMetrics(
                instances=Counter(
                    "ctdx_instances_received", "C-STORE requests answered, by DIMSE status.",
                    ["status"], registry=None,
                ),
                received_bytes=Counter(
                    "ctdx_received_bytes", "Bytes of received data sets (stored or refused).",
                    registry=None,
                ),
                open_associations=Gauge(
                    "ctdx_open_associations", "Associations open now (all listener processes).",
                    registry=None, multiprocess_mode="livesum",
                ),
                refusals=Counter(
                    "ctdx_refusals", "Refused associations and C-STOREs, by reason.",
                    ["reason"], registry=None,
                ),
                dispatched=Counter(
                    "ctdx_outbox_dispatched", "Study versions handed to the broker.",
                    registry=None,
                ),
                republished=Counter(
                    "ctdx_republished",
                    "Study versions published again by reconciliation (the broker lost them).",
                    ["reason"], registry=None,
                ),
                broker_up=Gauge(
                    "ctdx_broker_up", "1 when the listener's last contact with the broker worked.",
                    registry=None, multiprocess_mode="livemax",
                ),
            )
        return _metrics


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def observe_store(status: int, size: int) -> None:
    """One C-STORE answered with ``status`` for a data set of ``size`` bytes; never raises."""
    try:
        m = listener_metrics()
        m.instances.labels(status=f"0x{status:04X}").inc()
        m.received_bytes.inc(max(size, 0))
        if status != 0:
            try:
                name = Status(status).name.lower()
            except ValueError:
                name = f"0x{status:04X}"
            m.refusals.labels(reason=f"c-store {name}").inc()
    except Exception:  # metrics must never change a DICOM answer
        logger.debug("metrics: C-STORE not counted", exc_info=True)


_accepted: set[int] = set()  # id() of this process's accepted associations


def _on_accepted(event: Any) -> None:
    try:
        with _lock:
            _accepted.add(id(event.assoc))
        listener_metrics().open_associations.inc()
    except Exception:
        logger.debug("metrics: association not counted", exc_info=True)


def _on_closed(event: Any) -> None:
    try:
        with _lock:
            if id(event.assoc) not in _accepted:
                return
            _accepted.discard(id(event.assoc))
        listener_metrics().open_associations.dec()
    except Exception:
        logger.debug("metrics: association not counted", exc_info=True)


def _on_rejected(event: Any) -> None:
    try:
        from ctdx.scp.rejections import reject_reason

        listener_metrics().refusals.labels(reason=f"association {reject_reason(event)}").inc()
    except Exception:
        logger.debug("metrics: refusal not counted", exc_info=True)


def event_bindings() -> list[tuple[Any, ...]]:
    """Notification handlers that count associations (bound next to the listener's own)."""
    from pynetdicom import evt

    return [
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_CONN_CLOSE, _on_closed),
    ]


def _database_families(settings: Settings) -> Any:
    def families(engine: Engine) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ctdx.db import health

        now = utcnow()
        with session_scope(engine) as session:
            n = health.pipeline_numbers(session, settings, now)
        yield GaugeMetricFamily("ctdx_outbox_depth",
                                "Completed study versions not yet handed to the broker.",
                                value=n.outbox_waiting)
        yield GaugeMetricFamily("ctdx_outbox_oldest_age_seconds",
                                "Age of the oldest study version waiting in the outbox (0: none).",
                                value=n.outbox_oldest_seconds or 0.0)
        states = GaugeMetricFamily("ctdx_study_versions", "Study versions by state.",
                                   labels=["state"])
        for state, count in sorted(n.versions_by_state.items()):
            states.add_metric([state], count)
        yield states
        yield CounterMetricFamily("ctdx_studies_completed",
                                  "Study versions completed (quiet period or MPPS), ever.",
                                  value=n.studies_completed)
        yield GaugeMetricFamily("ctdx_stale_claims",
                                "Analyses whose worker heartbeat is older than CTDX_CLAIM_TIMEOUT.",
                                value=n.stale_claims)

    return families


def process_exited(pid: int | None) -> None:
    """A listener process ended: forget its live gauges (open associations)."""
    if pid is not None:
        from ctdx.db.metrics import process_exited as forget

        forget(pid)


def start(settings: Settings) -> Any | None:
    """In the primary listener process, before secondaries start: the metrics endpoint."""
    if settings.metrics_port == 0:
        return None
    from ctdx.db import metrics
    from ctdx.db.session import make_engine

    metrics.prepare("listener")
    listener_metrics()
    engine = make_engine(settings.resolved_database_url, poolclass=_null_pool())
    return metrics.serve(
        settings.metrics_port, [metrics.DatabaseCollector(engine, _database_families(settings))]
    )


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool
