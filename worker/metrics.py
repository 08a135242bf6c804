"""A worker's Prometheus metrics (``CTDX_WORKER_METRICS_PORT``, default 9109; 0 = off).

Counted in the pool processes (multiprocess mode, see :mod:`ctdx.db.metrics`) and
served by the worker's main process: analyses by outcome, stage durations,
the wait from a study's completion to its claim, the model and precision in
use, versions published again by reconciliation. Read from the database at
scrape time: exports by state, the age of the oldest undelivered report,
overdue exports, stale claims.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from ctdx.db.models import utcnow
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings

if TYPE_CHECKING:
    from ctdx.worker.runtime import Models

logger = logging.getLogger(__name__)

__all__ = [
    "WorkerMetrics",
    "observe_analysis",
    "observe_model",
    "observe_queue_wait",
    "observe_stages",
    "start",
    "worker_metrics",
]

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

_lock = threading.Lock()
_metrics: WorkerMetrics | None = None


@dataclass(frozen=True)
class WorkerMetrics:
    analyses: Any  # Counter, label outcome (worker.service.Outcome)
    stage_seconds: Any  # Histogram, label stage
    queue_wait: Any  # Histogram: completion -> claim
    model_info: Any  # Gauge (livemax), labels model_name, model_version, model_uid, device
    republished: Any  # Counter, label reason
    reports_recovered: Any  # Counter: analyses whose missing reports reconciliation published


def worker_metrics() -> WorkerMetrics:
    """This process's metric objects, created on first use (after :func:`db.metrics.prepare`)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            _metrics = WorkerMetrics(
                analyses=Counter("ctdx_analyses", "Study analyses by outcome.", ["outcome"],
                                 registry=None),
                stage_seconds=Histogram(
                    "ctdx_stage_seconds", "Seconds per analysis stage (one study).", ["stage"],
                    buckets=STAGE_BUCKETS, registry=None,
                ),
                queue_wait=Histogram(
                    "ctdx_queue_wait_seconds",
                    "Seconds from a study's completion to a worker's claim on it.",
                    buckets=WAIT_BUCKETS, registry=None,
                ),
                model_info=Gauge(
                    "ctdx_model_info", "The recognition model and precision in use (value 1).",
                    ["model_name", "model_version", "model_uid", "device"], registry=None,
                    multiprocess_mode="livemax",
                ),
                republished=Counter(
                    "ctdx_republished",
                    "Study versions published again by reconciliation (the broker lost them).",
                    ["reason"], registry=None,
                ),
                reports_recovered=Counter(
                    "ctdx_reports_recovered",
                    "Analysed studies without recorded reports whose reports were published by "
                    "reconciliation.", registry=None,
                ),
            )
        return _metrics


def observe_model(models: Models) -> None:
    try:
        identity = models.identity
        worker_metrics().model_info.labels(
            model_name=identity.model_name, model_version=identity.model_version,
            model_uid=identity.model_uid, device=models.device,
        ).set(1)
    except Exception:
        logger.debug("metrics: model not recorded", exc_info=True)


def observe_analysis(outcome: str) -> None:
    try:
        worker_metrics().analyses.labels(outcome=outcome).inc()
    except Exception:
        logger.debug("metrics: analysis not counted", exc_info=True)


def observe_stages(timings: Mapping[str, float]) -> None:
    try:
        m = worker_metrics()
        for stage, seconds in timings.items():
            if isinstance(seconds, int | float):
                m.stage_seconds.labels(stage=stage).observe(float(seconds))
    except Exception:
        logger.debug("metrics: stages not recorded", exc_info=True)


def observe_queue_wait(seconds: float) -> None:
    try:
        worker_metrics().queue_wait.observe(max(0.0, seconds))
    except Exception:
        logger.debug("metrics: queue wait not recorded", exc_info=True)


def _database_families(settings: Settings) -> Any:
    def families(engine: Engine) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from ctdx.db import health

        with session_scope(engine) as session:
            n = health.pipeline_numbers(session, settings, utcnow())
        exports = GaugeMetricFamily("ctdx_exports", "Report exports by state.", labels=["state"])
        for state in ("pending", "delivered", "dead"):
            exports.add_metric([state], n.exports_by_state.get(state, 0))
        yield exports
        yield GaugeMetricFamily(
            "ctdx_oldest_undelivered_report_age_seconds",
            "Age of the oldest pending report export (0: none).",
            value=n.oldest_undelivered_seconds or 0.0,
        )
        yield GaugeMetricFamily("ctdx_exports_overdue",
                                "Pending exports whose next attempt is long past.",
                                value=n.exports_overdue)
        yield GaugeMetricFamily("ctdx_stale_claims",
                                "Analyses whose worker heartbeat is older than CTDX_CLAIM_TIMEOUT.",
                                value=n.stale_claims)
        yield GaugeMetricFamily("ctdx_queued_unclaimed_overdue",
                                "Study versions queued longer than CTDX_QUEUED_TIMEOUT, unclaimed.",
                                value=n.queued_unclaimed_overdue)

    return families


def start(settings: Settings) -> Any | None:
    """Worker main process, before the pool starts: the metrics endpoint."""
    if settings.worker_metrics_port == 0:
        return None
    from sqlalchemy.pool import NullPool

    from ctdx.db import metrics
    from ctdx.db.session import make_engine

    metrics.prepare("worker")
    engine = make_engine(settings.resolved_database_url, poolclass=NullPool)
    return metrics.serve(
        settings.worker_metrics_port,
        [metrics.DatabaseCollector(engine, _database_families(settings))],
    )
