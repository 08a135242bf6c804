"""C-STORE of report objects to the PACS, and the loop that delivers due exports.

Only a success status counts as delivered: ``0x0000``, or one of the C-STORE
warnings of PS3.4 Table B.2-1, with which the SCP has stored the object
(:data:`STORED_WITH_WARNING`). Everything else - no association, an abort, a
timeout, any failure status (``0xA7xx`` out of resources, ``0xA9xx`` data set
does not match SOP class, ``0xCxxx`` cannot understand, ``0x0122`` SOP class
not supported, ...) - is a :class:`~worker.report.errors.DeliveryError` and
becomes a retry with backoff in the outbox, then a dead letter. Failure
statuses are retried too: a PACS that is out of disk or misconfigured gets
fixed by people, and the retries span hours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ctdx.db import alerts
from ctdx.db.models import ExportState, utcnow
from ctdx.db.settings import Settings
from ctdx.worker.report import outbox
from ctdx.worker.report.errors import DeliveryError
from ctdx.worker.report.outbox import ClaimedExport, Destination

logger = logging.getLogger(__name__)

# Identifier datasets are PHI: never log them.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

SUCCESS = 0x0000
#: C-STORE warnings (PS3.4 Table B.2-1): the SCP stored the object, so it is delivered.
STORED_WITH_WARNING: dict[int, str] = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


def describe_status(status: int) -> str:
    """A short category for a DIMSE status, for ``exports.last_error`` and logs."""
    if status in STORED_WITH_WARNING:
        return f"warning: {STORED_WITH_WARNING[status]}"
    if 0xA700 <= status <= 0xA7FF:
        return "refused: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "error: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "error: cannot understand"
    known = {
        0x0122: "refused: SOP class not supported",
        0x0124: "refused: not authorized",
        0x0210: "duplicate invocation",
        0x0211: "unrecognized operation",
        0x0212: "mistyped argument",
        0x0117: "invalid SOP instance",
    }
    return known.get(status, "failure")


def store(path: Path, destination: Destination, calling_ae_title: str, timeout: float) -> int:
    """Send one file by C-STORE; the status when it counts as delivered, else DeliveryError.

    When the PACS accepts the file's own transfer syntax the file's bytes are
    sent as they are (no decoding and re-encoding); otherwise pynetdicom
    re-encodes the data set in the syntax the PACS accepted.
    """
    try:
        header = dcmread(path, stop_before_pixels=True)
        file_syntax = str(header.file_meta.TransferSyntaxUID)
        sop_class_uid = str(header.SOPClassUID)
    except (OSError, InvalidDicomError, AttributeError) as exc:
        raise DeliveryError(f"cannot read {path.name}: {exc}") from exc
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    syntaxes = list(dict.fromkeys([file_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ae.add_requested_context(sop_class_uid, syntaxes)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise DeliveryError(f"association with {destination} {how}")
    try:
        as_is = any(
            cx.abstract_syntax == sop_class_uid and cx.transfer_syntax[0] == file_syntax
            for cx in assoc.accepted_contexts
        )
        response = assoc.send_c_store(path if as_is else dcmread(path))
    except (ValueError, RuntimeError, OSError, InvalidDicomError) as exc:
        # e.g. the PACS accepted no presentation context for this SOP class
        raise DeliveryError(f"C-STORE to {destination} not possible: {exc}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        raise DeliveryError(f"no C-STORE response from {destination} (aborted or timed out)")
    status = int(response.Status)
    if status == SUCCESS:
        return status
    if status in STORED_WITH_WARNING:
        logger.warning(
            "%s stored %s with warning 0x%04X (%s)",
            destination,
            header.SOPInstanceUID,
            status,
            STORED_WITH_WARNING[status],
        )
        return status
    raise DeliveryError(
        f"C-STORE to {destination} answered 0x{status:04X} ({describe_status(status)})",
        status=status,
    )


def deliver(engine: Engine, settings: Settings, claimed: ClaimedExport, now: datetime) -> bool:
    """Send one claimed export and record the outcome; ``True`` when delivered.

    ``now`` is when the send starts; the outcome is stamped that clock plus
    the time the send took, so a backoff counts from the end of a slow attempt.
    """
    started = time.monotonic()
    try:
        destination = Destination.parse(claimed.destination)
        status = store(
            settings.data_dir / claimed.path,
            destination,
            settings.ae_title,
            timeout=settings.network_timeout,
        )
    except (DeliveryError, ValueError) as exc:
        status_code = exc.status if isinstance(exc, DeliveryError) else None
        finished = now + timedelta(seconds=time.monotonic() - started)
        state = outbox.record_failure(engine, settings, claimed, str(exc), status_code, finished)
        if state is ExportState.DEAD:
            alerts.emit(engine, settings, "export", claimed.id, occurrence=claimed.attempts)
        return False
    outbox.record_delivered(
        engine, claimed, status, now + timedelta(seconds=time.monotonic() - started)
    )
    logger.info(
        "delivered %s %s to %s (export %d, attempt %d)",
        claimed.kind,
        claimed.sop_instance_uid,
        claimed.destination,
        claimed.id,
        claimed.attempts,
    )
    return True


def deliver_due(
    engine: Engine,
    settings: Settings,
    now: datetime | None = None,
    ids: Sequence[int] | None = None,
) -> int:
    """Claim the exports due at ``now`` (only ``ids`` if given) and send them.

    Returns how many exports were attempted (delivered or not); one batch of
    at most :data:`~worker.report.outbox.CLAIM_BATCH` per call.
    """
    moment = now or utcnow()
    started = time.monotonic()
    claimed = outbox.claim_due(engine, settings, moment, ids=ids)
    for item in claimed:
        deliver(engine, settings, item, moment + timedelta(seconds=time.monotonic() - started))
    return len(claimed)


class DeliveryLoop:
    """Delivers due exports until stopped; runs in ``ctdx worker``'s main process or embedded.

    Several loops (several hosts) may run against one database: claims keep
    them from sending the same export twice at once.
    """

    def __init__(self, engine: Engine, settings: Settings, interval: float | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.interval = (
            interval if interval is not None else min(5.0, settings.export_backoff_seconds)
        )

    def run_once(self) -> int:
        """One round; database and file errors are logged and the loop goes on."""
        try:
            return deliver_due(self.engine, self.settings)
        except (SQLAlchemyError, OSError):
            logger.exception("export delivery round failed; trying again in %.1f s", self.interval)
            return 0

    def run(self, stop: threading.Event) -> None:
        logger.info("export delivery loop started (every %.1f s)", self.interval)
        while not stop.is_set():
            if self.run_once() == 0:  # a full batch: go on at once, the rest may be due too
                stop.wait(self.interval)
        logger.info("export delivery loop stopped")

    def start(self) -> tuple[threading.Thread, threading.Event]:
        """Run in a daemon thread (embedded mode); set the event to stop it."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="ctdx-export", daemon=True)
        thread.start()
        return thread, stop
