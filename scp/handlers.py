"""pynetdicom event handlers: plain functions bound as data, dependencies passed in.

This is the DIMSE edge: domain errors (:class:`~scp.status.Rejected`) become a
status dataset with an Error Comment here and nowhere else, and every refusal
is logged with its reason, the calling AE title and the SOP Instance UID, never
with patient data. :func:`event_handlers` lists the bindings.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_RELEASE
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ctdx.db.models import utcnow
from ctdx.db.session import session_scope
from ctdx.scp import completion, mpps, registry
from ctdx.scp import metrics as scp_metrics
from ctdx.scp.command_check import check_context, check_store_command
from ctdx.scp.receive import MISSING_UID, discard_unclaimed
from ctdx.scp.rejections import reject_reason
from ctdx.scp.status import Rejected, Status, status_dataset
from ctdx.scp.store import AssociationLease, InstanceStore, Outcome
from ctdx.scp.uids import is_valid_uid

logger = logging.getLogger(__name__)

__all__ = ["Associations", "ListenerContext", "event_handlers", "store_received"]



class Associations:
    """Live associations of this process and the lease name each one uses."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"{socket.gethostname()}:{os.getpid()}"
        self._serial = count(1)
        self._lock = threading.Lock()
        self._live: dict[Association, AssociationLease] = {}

    def lease_for(self, assoc: Association) -> AssociationLease:
        with self._lock:
            lease = self._live.get(assoc)
            if lease is None:
                holder = f"{self.prefix}:{next(self._serial)}"
                lease = AssociationLease(holder, _calling_ae(assoc))
                self._live[assoc] = lease
            return lease

    def end(self, assoc: Association) -> AssociationLease | None:
        with self._lock:
            return self._live.pop(assoc, None)

    def holders(self) -> list[str]:
        """Lease names of live associations that hold at least one version open."""
        with self._lock:
            return [lease.holder for lease in self._live.values() if lease.versions]


@dataclass
class ListenerContext:
    """What the handlers of one listener process share."""

    store: InstanceStore
    engine: Engine
    associations: Associations
    on_completed: Callable[[], None] = lambda: None  # wake the outbox dispatcher
    flush_seconds: float = 60.0  # longest a release waits for its instances' rows

    def flush(self) -> None:
        """Wait until every instance acknowledged so far has its database row."""
        if not self.store.recorder.flush(self.flush_seconds):
            logger.warning("instance rows not written within %.0f s; they follow when the "
                           "database accepts them", self.flush_seconds)


def _calling_ae(assoc: Association) -> str:
    return str(assoc.requestor.ae_title or "").strip()


def _uid_for_log(value: object) -> str:
    text = str(value or "").rstrip("\x00 ")
    return text if is_valid_uid(text) else "(invalid UID)"


def handle_echo(event: Event) -> int | Dataset:
    """C-ECHO: the association was accepted, so the peer may verify it (on a Verification
    context: pynetdicom would answer one sent on a storage context too)."""
    request: Any = event.request
    refused = check_context(str(event.context.abstract_syntax),
                            str(request.AffectedSOPClassUID or ""))
    if refused is not None:
        logger.warning("C-ECHO from %s refused with 0x%04X: %s", _calling_ae(event.assoc),
                       int(refused.status), refused.reason)
        return status_dataset(refused.status, refused.reason)
    return int(Status.SUCCESS)


def handle_store(event: Event, ctx: ListenerContext) -> int | Dataset:
    """C-STORE as pynetdicom delivers it (the fast path calls :func:`store_received`)."""
    request: Any = event.request
    sop_class_uid = str(request.AffectedSOPClassUID or "")
    raw_instance = request.AffectedSOPInstanceUID
    sop_instance_uid = None if raw_instance in (None, MISSING_UID) else str(raw_instance)
    refused = check_store_command(str(event.context.abstract_syntax), sop_class_uid,
                                  sop_instance_uid)
    if refused is not None or sop_instance_uid is None:
        refused = refused or Rejected(Status.MISSING_UID, "Affected SOP Instance UID is missing")
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s (SOP Instance UID %s)",
            _calling_ae(event.assoc), int(refused.status), refused.reason,
            _uid_for_log(sop_instance_uid),
        )
        return status_dataset(refused.status, refused.reason)
    return store_received(
        ctx, event.assoc, event.dataset_path, str(event.context.transfer_syntax),
        sop_class_uid, sop_instance_uid,
    )


def store_received(
    ctx: ListenerContext,
    assoc: Association,
    received: Path,
    transfer_syntax_uid: str,
    sop_class_uid: str,
    sop_instance_uid: str,
) -> int | Dataset:
    """C-STORE: durable on disk and in the database before success (see :mod:`ctdx.scp.store`)."""
    lease = ctx.associations.lease_for(assoc)
    size = scp_metrics.file_size(received)  # before the store moves it
    try:
        result = ctx.store.store(
            received, transfer_syntax_uid, sop_class_uid, sop_instance_uid, lease
        )
    except Rejected as exc:
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s (SOP Instance UID %s)",
            lease.calling_ae_title, int(exc.status), exc.reason, _uid_for_log(sop_instance_uid),
        )
        scp_metrics.observe_store(int(exc.status), size)
        return status_dataset(exc.status, exc.reason)
    scp_metrics.observe_store(int(Status.SUCCESS), size)
    if result.outcome is Outcome.DUPLICATE:
        logger.info(
            "C-STORE from %s: instance %s already stored with identical bytes (kept once)",
            lease.calling_ae_title, sop_instance_uid,
        )
    return int(Status.SUCCESS)


def handle_mpps_create(event: Event, ctx: ListenerContext) -> tuple[int | Dataset, Dataset | None]:
    """MPPS N-CREATE: remember the step (it must start IN PROGRESS)."""
    request: Any = event.request
    uid = str(request.AffectedSOPInstanceUID or "").rstrip("\x00 ")
    try:
        wrong_context = check_context(str(event.context.abstract_syntax),
                                      str(request.AffectedSOPClassUID or ""))
        if wrong_context is not None:
            raise wrong_context
        if not is_valid_uid(uid):
            raise Rejected(Status.MISSING_ATTRIBUTE, "Affected SOP Instance UID missing or invalid")
        attributes = event.attribute_list
        report = mpps.parse_step(attributes)
        with session_scope(ctx.engine) as session:
            mpps.create_step(session, uid, report, utcnow())
    except Rejected as exc:
        return _mpps_refused("N-CREATE", event, uid, exc), None
    except IntegrityError:  # a concurrent N-CREATE of the same step won the race
        duplicate = Rejected(Status.DUPLICATE_SOP_INSTANCE, "MPPS instance already exists")
        return _mpps_refused("N-CREATE", event, uid, duplicate), None
    except SQLAlchemyError as exc:
        return _mpps_database_error("N-CREATE", event, uid, exc), None
    logger.info("MPPS %s created by %s (%s)", uid, _calling_ae(event.assoc), report.status)
    return int(Status.SUCCESS), attributes


def handle_mpps_set(event: Event, ctx: ListenerContext) -> tuple[int | Dataset, Dataset | None]:
    """MPPS N-SET: update the step; COMPLETED with every instance here completes at once."""
    request: Any = event.request
    uid = str(request.RequestedSOPInstanceUID or "").rstrip("\x00 ")
    completed: list[int] = []
    try:
        wrong_context = check_context(str(event.context.abstract_syntax),
                                      str(request.RequestedSOPClassUID or ""))
        if wrong_context is not None:
            raise wrong_context
        modifications = event.modification_list
        report = mpps.parse_step(modifications)
        if report.status == mpps.COMPLETED:
            ctx.flush()  # the instances it references were acknowledged: see their rows
        now = utcnow()
        with session_scope(ctx.engine) as session:
            step_id = mpps.set_step(session, uid, report, now)
            if report.status == mpps.COMPLETED:
                completed = completion.complete_mpps_step(session, step_id, now)
    except Rejected as exc:
        return _mpps_refused("N-SET", event, uid, exc), None
    except SQLAlchemyError as exc:
        return _mpps_database_error("N-SET", event, uid, exc), None
    logger.info(
        "MPPS %s set by %s (%s)", _uid_for_log(uid), _calling_ae(event.assoc),
        report.status or "no status change",
    )
    if completed:
        ctx.on_completed()
    return int(Status.SUCCESS), modifications


def _mpps_refused(what: str, event: Event, uid: str, exc: Rejected) -> Dataset:
    logger.warning(
        "MPPS %s from %s refused with 0x%04X: %s (MPPS instance %s)",
        what, _calling_ae(event.assoc), int(exc.status), exc.reason, _uid_for_log(uid),
    )
    return status_dataset(exc.status, exc.reason)


def _mpps_database_error(what: str, event: Event, uid: str, exc: SQLAlchemyError) -> Dataset:
    logger.error(
        "MPPS %s from %s failed, database error %s (MPPS instance %s)",
        what, _calling_ae(event.assoc), type(exc).__name__, _uid_for_log(uid),
    )
    return status_dataset(Status.PROCESSING_FAILURE, "database unavailable")


def handle_accepted(event: Event, ctx: ListenerContext) -> None:
    ctx.associations.lease_for(event.assoc)
    logger.info(
        "association accepted from %s at %s", _calling_ae(event.assoc),
        event.assoc.requestor.address,
    )



def handle_rejected(event: Event) -> None:
    logger.warning(
        "association from %s at %s rejected: %s", _calling_ae(event.assoc),
        event.assoc.requestor.address, reject_reason(event),
    )


def handle_aborted(event: Event) -> None:
    logger.warning(
        "association from %s at %s aborted", _calling_ae(event.assoc), event.assoc.requestor.address
    )


def handle_release_request(event: Event, ctx: ListenerContext) -> None:
    """A-RELEASE-RQ received: answer it only once the association's instances have rows."""
    primitive = event.primitive  # type: ignore[attr-defined]
    if isinstance(primitive, A_RELEASE) and primitive.result is None:
        ctx.flush()


def handle_closed(event: Event, ctx: ListenerContext) -> None:
    """The connection is gone (release, abort or time-out): delete what it left half received,
    release the association's leases."""
    discard_unclaimed(event.assoc.dul)
    lease = ctx.associations.end(event.assoc)
    if lease is None:
        return
    ctx.flush()  # rows still being written would add lease rows after ours are gone
    if not lease.versions:
        return
    try:
        with session_scope(ctx.engine) as session:
            registry.delete_leases(session, lease.holder)
    except SQLAlchemyError as exc:  # they expire on their own
        logger.warning("leases of %s not released (%s); they will expire", lease.holder,
                       type(exc).__name__)


def event_handlers(ctx: ListenerContext) -> list[tuple[Any, ...]]:
    """The listener's bindings, as data."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_N_CREATE, handle_mpps_create, [ctx]),
        (evt.EVT_N_SET, handle_mpps_set, [ctx]),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_ACSE_RECV, handle_release_request, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
        *scp_metrics.event_bindings(),
    ]
