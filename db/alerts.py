"""Alerts: signed JSON webhooks, through an outbox in the database.

An event (a study called COVID-19, a study failed, an export dead, the
installation's status changed) becomes one ``alerts`` row per receiver URL in
``CTDX_ALERT_WEBHOOK_URLS`` (:func:`emit`), in its own small transaction and
never raising: an alert can neither block nor break an analysis or a delivery.
A delivery loop (:class:`AlertLoop`, in ``ctdx worker``'s main process)
claims due rows like the export outbox does and POSTs them with bounded
time-outs; a failure is retried with doubling backoff, then dead-lettered.
The ``(dedup_key, url)`` pair is unique, so an event seen twice (a redelivered
task) alerts once.

The payload schema is documented in docs/alerts.md. It carries no PHI unless
``CTDX_ALERT_INCLUDE_PHI`` is set: study UID, accession number and the decision
are enough to act. Self-test studies (:mod:`ctdx.db.selftest_studies`) never alert.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Alert,
    AlertState,
    Analysis,
    Export,
    SelftestStudy,
    Study,
    StudyVersion,
    utcnow,
)
from ctdx.db.selftest_studies import SELFTEST_PATIENT_ID
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings

logger = logging.getLogger(__name__)

SCHEMA = "ctdx.alert/1"
EVENT_COVID19 = "study.covid19"
EVENT_FAILED = "study.failed"
EVENT_EXPORT_DEAD = "export.dead"
EVENT_STATUS = "status.changed"
EVENTS = (EVENT_COVID19, EVENT_FAILED, EVENT_EXPORT_DEAD, EVENT_STATUS)

SIGNATURE_HEADER = "X-Ctdx-Signature"
EVENT_HEADER = "X-Ctdx-Event"
DELIVERY_HEADER = "X-Ctdx-Delivery"
CLAIM_BATCH = 16
BACKOFF_MAX_SECONDS = 3600.0


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


# --- what an alert says ------------------------------------------------------------------


def _study_fields(session: Session, study_version_id: int, settings: Settings
                  ) -> dict[str, Any] | None:
    """The study part of a payload; None for a self-test study (test studies never alert)."""
    row = session.execute(
        select(Study, StudyVersion.version)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .where(StudyVersion.id == study_version_id)
    ).one_or_none()
    if row is None:
        return None
    study, version = row
    registered = session.scalar(
        select(SelftestStudy.id).where(
            SelftestStudy.study_instance_uid == study.study_instance_uid)
    )
    if study.patient_id == SELFTEST_PATIENT_ID or registered is not None:
        return None
    fields: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "version": version,
    }
    if settings.alert_include_phi:
        fields["patient_id"] = study.patient_id
        fields["patient_name"] = study.patient_name
    return fields


def _analysis_alert(session: Session, settings: Settings, analysis_id: int
                    ) -> tuple[str, dict[str, Any]] | None:
    analysis = session.get(Analysis, analysis_id)
    if analysis is None:
        return None
    study = _study_fields(session, analysis.study_version_id, settings)
    if study is None:
        return None
    if analysis.state == "failed":
        event = EVENT_FAILED
    elif analysis.decision == "covid19":
        event = EVENT_COVID19
    else:
        return None
    return event, {
        "study": study,
        "analysis": {
            "id": analysis.id,
            "state": analysis.state,
            "decision": analysis.decision,
            "fraction_covid19": analysis.fraction_covid19,
            "threshold": analysis.threshold,
            "model_name": analysis.model_name,
            "model_version": analysis.model_version,
            "finished_at": _iso(analysis.finished_at),
            "failure_reason": analysis.failure_reason,
        },
    }


def _export_alert(session: Session, settings: Settings, export_id: int
                  ) -> tuple[str, dict[str, Any]] | None:
    export = session.get(Export, export_id)
    if export is None:
        return None
    analysis = session.get(Analysis, export.analysis_id)
    study = _study_fields(session, analysis.study_version_id, settings) if analysis else None
    if study is None:
        return None
    return EVENT_EXPORT_DEAD, {
        "study": study,
        "export": {
            "id": export.id,
            "kind": export.kind,
            "destination": export.destination,
            "sop_instance_uid": export.sop_instance_uid,
            "attempts": export.attempts,
            "last_error": export.last_error,
            "last_status": export.last_status,
        },
    }


# --- writing the outbox ------------------------------------------------------------------


def enqueue(engine: Engine, settings: Settings, event: str, dedup_key: str,
            body: Mapping[str, Any], now: datetime | None = None) -> list[int]:
    """One pending row per receiver URL (nothing when the event is not configured)."""
    if event not in settings.alert_events or not settings.alert_webhook_urls:
        return []
    now = now or utcnow()
    payload = {"schema": SCHEMA, "event": event, "id": dedup_key, "occurred_at": _iso(now),
               "source": socket.gethostname(), **body}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    ids: list[int] = []
    for url in settings.alert_webhook_urls:
        try:
            with session_scope(engine) as session:
                row = Alert(event=event, dedup_key=dedup_key[:128], url=url, payload=text,
                            state=AlertState.PENDING, attempts=0, created_at=now,
                            next_attempt_at=now)
                session.add(row)
                session.flush()
                ids.append(row.id)
        except IntegrityError:  # the same event was alerted before (a redelivered task)
            continue
    logger.info("alert %s (%s) queued for %d receiver(s)", event, dedup_key, len(ids))
    return ids


def emit(engine: Engine, settings: Settings, kind: str, subject_id: int,
         occurrence: int | None = None) -> list[int]:
    """Queue the alert for ``kind`` (``analysis`` or ``export``) of ``subject_id``; never raises.

    Call sites: after an analysis is stored or failed (``analysis``), after an
    export is dead-lettered (``export``, ``occurrence`` = its attempts, so an
    export retried by an operator that dies again alerts again).
    """
    if not settings.alert_webhook_urls:
        return []
    try:
        with session_scope(engine) as session:
            found = (_analysis_alert if kind == "analysis" else _export_alert)(
                session, settings, subject_id)
        if found is None:
            return []
        event, body = found
        key = f"{event}:{kind}:{subject_id}" + (f":{occurrence}" if occurrence else "")
        return enqueue(engine, settings, event, key, body)
    except Exception:  # an alert must never break the analysis or delivery that raised it
        logger.exception("could not queue the alert for %s %d", kind, subject_id)
        return []


def status_changed(engine: Engine, settings: Settings, previous: str | None, current: str,
                   problems: list[str] | None = None, now: datetime | None = None) -> list[int]:
    """For ``ctdx status``: alert that the installation went from ``previous`` to ``current``.

    ``current`` is ``ok``, ``degraded`` or ``down``; ``problems`` are one-line
    reasons (no PHI). Never raises.
    """
    now = now or utcnow()
    body = {"status": {"previous": previous, "current": current, "problems": problems or []}}
    try:
        return enqueue(engine, settings, EVENT_STATUS,
                       f"{EVENT_STATUS}:{current}:{_iso(now)}", body, now)
    except Exception:
        logger.exception("could not queue the status alert (%s -> %s)", previous, current)
        return []


# --- delivering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedAlert:
    id: int
    event: str
    url: str
    payload: str
    attempts: int
    token: str


class DeliveryFailed(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: following it would re-send a signed body elsewhere, as a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, event: str, delivery_id: int, secret: str | None,
         timeout: float) -> int:
    """POST one alert; its HTTP status when 2xx, else :class:`DeliveryFailed`."""
    headers = {"Content-Type": "application/json", "User-Agent": "ctdx-alerts",
               EVENT_HEADER: event, DELIVERY_HEADER: str(delivery_id)}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            response.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"HTTP {exc.code}", exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryFailed(f"cannot POST: {reason}") from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"HTTP {status}", status)
    return status


def backoff_seconds(attempts: int, settings: Settings) -> float:
    base = settings.alert_backoff_seconds * 2.0 ** max(attempts - 1, 0)
    return min(base, BACKOFF_MAX_SECONDS) * random.uniform(0.9, 1.1)


def claim_lease(settings: Settings) -> timedelta:
    return timedelta(seconds=2 * settings.alert_timeout_seconds + 30)


def claim_due(engine: Engine, settings: Settings, now: datetime) -> list[ClaimedAlert]:
    token = f"{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:12]}"
    due = (
        select(Alert.id)
        .where(Alert.state == AlertState.PENDING, Alert.next_attempt_at <= now)
        .order_by(Alert.next_attempt_at, Alert.id)
        .limit(CLAIM_BATCH)
    )
    if engine.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    statement = (
        update(Alert)
        .where(Alert.id.in_(due.scalar_subquery()))
        .values(claimed_by=token, attempts=Alert.attempts + 1,
                next_attempt_at=now + claim_lease(settings))
        .returning(Alert.id, Alert.event, Alert.url, Alert.payload, Alert.attempts)
        .execution_options(synchronize_session=False)
    )
    with session_scope(engine) as session:
        rows = session.execute(statement).all()
    return [ClaimedAlert(r.id, r.event, r.url, r.payload, r.attempts, token) for r in rows]


def _record(engine: Engine, claimed: ClaimedAlert, **values: Any) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(Alert)
            .where(Alert.id == claimed.id, Alert.claimed_by == claimed.token)
            .values(claimed_by=None, **values)
            .execution_options(synchronize_session=False)
        )


def deliver_due(engine: Engine, settings: Settings, now: datetime | None = None) -> int:
    """Claim the due alerts and POST them; how many were attempted."""
    claimed = claim_due(engine, settings, now or utcnow())
    for alert in claimed:
        try:
            status = post(alert.url, alert.payload.encode(), alert.event, alert.id,
                          settings.alert_secret, settings.alert_timeout_seconds)
        except DeliveryFailed as exc:
            dead = alert.attempts >= settings.alert_max_attempts
            retry_at = utcnow() + timedelta(seconds=backoff_seconds(alert.attempts, settings))
            _record(engine, alert, state=AlertState.DEAD if dead else AlertState.PENDING,
                    last_error=str(exc)[:2000], last_status=exc.status,
                    next_attempt_at=utcnow() if dead else retry_at)
            log = logger.error if dead else logger.warning
            log("alert %d (%s) attempt %d failed: %s%s", alert.id, alert.event, alert.attempts,
                exc, "; dead-lettered" if dead else "")
            continue
        _record(engine, alert, state=AlertState.DELIVERED, last_status=status, last_error=None,
                delivered_at=utcnow())
        logger.info("alert %d (%s) delivered, HTTP %d", alert.id, alert.event, status)
    return len(claimed)


class AlertLoop:
    """Delivers due alerts until stopped; any number may run against one database."""

    def __init__(self, engine: Engine, settings: Settings, interval: float = 2.0) -> None:
        self.engine = engine
        self.settings = settings
        self.interval = interval

    def run_once(self) -> int:
        try:
            return deliver_due(self.engine, self.settings)
        except (SQLAlchemyError, OSError):
            logger.exception("alert delivery round failed; trying again in %.1f s", self.interval)
            return 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.run_once() < CLAIM_BATCH:
                stop.wait(self.interval)

    def start(self) -> tuple[threading.Thread, threading.Event] | None:
        """Run in a daemon thread; None when no receiver is configured."""
        if not self.settings.alert_webhook_urls:
            return None
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="ctdx-alerts", daemon=True)
        thread.start()
        return thread, stop
