"""The listener process(es): the DICOM server, its housekeeping, and start-up recovery.

One *primary* process runs the DICOM server plus the housekeeping that must
happen once per installation (completion, the outbox dispatcher, sweeping
interrupted transfers). With ``CTDX_LISTENER_PROCESSES`` > 1 it also spawns
*secondary* processes that run only a DICOM server on the same port
(``SO_REUSEPORT``: the kernel spreads new connections across them, so more than
one core receives) and keep their own associations' leases alive.

Start-up recovery (primary, before listening): leftover temporary files are
deleted, acknowledged instances without a database row (``.unindexed`` links,
see :mod:`ctdx.scp.recorder`) are recorded, leases of dead processes of this host
are dropped, versions still ``receiving`` get a fresh quiet period (their
senders are likely to resend), and outbox rows not yet dispatched are sent by
the dispatcher as usual.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pydicom.config
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    ModalityPerformedProcedureStep,
    Verification,
)
from sqlalchemy import Engine

from ctdx.db.logs import silence_identifier_logging
from ctdx.db.migrate import require_head
from ctdx.db.models import utcnow
from ctdx.db.reconcile import Periodic
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.scp import completion, registry
from ctdx.scp import metrics as scp_metrics
from ctdx.scp.fastpath import FastStoreConfig
from ctdx.scp.handlers import Associations, ListenerContext, event_handlers, store_received
from ctdx.scp.outbox import CelerySender, OutboxDispatcher, Sender
from ctdx.scp.prepared import PreparedFiles
from ctdx.scp.receive import stop_streaming, stream_received_data_sets_to
from ctdx.scp.recorder import ORPHAN_SECONDS, reindex_unindexed
from ctdx.scp.spool import Spool
from ctdx.scp.store import InstanceStore
from ctdx.scp.transport import (
    ConnectionLimits,
    ListenerServer,
    use_event_driven_waits,
    use_fast_command_sets,
)

logger = logging.getLogger(__name__)

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "Housekeeper",
    "Listener",
    "ScpService",
    "build_ae",
    "recover",
    "serve",
    "tls_context",
]

#: Image storage SOP classes accepted; any other is refused at association negotiation.
STORAGE_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
#: Transfer syntaxes accepted for storage, in order of preference. Lossy ones are refused.
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70, what CT scanners send (covid-ct-md)
    JPEGLosslessP14,  # 1.2.840.10008.1.2.4.57
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    RLELossless,  # 1.2.840.10008.1.2.5
)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

HEARTBEAT_SECONDS = 5.0  # how often a process renews its associations' leases
LEASE_TTL_SECONDS = 30.0  # a lease not renewed for this long belongs to a dead process
SWEEP_SECONDS = 60.0
MPPS_GIVE_UP_SECONDS = 86_400.0  # a COMPLETED step whose instances never all arrive


def build_ae(settings: Settings) -> AE:
    """The application entity: contexts, calling-AE allow-list, limits, time-outs."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    # the limit is ConnectionLimits' (scp.transport), counted from the full A-ASSOCIATE-RQ;
    # pynetdicom's own count (acceptor threads, some still ending) is only a backstop
    ae.maximum_associations = 2 * settings.max_associations
    ae.network_timeout = settings.network_timeout
    ae.dimse_timeout = settings.network_timeout
    ae.acse_timeout = min(30.0, settings.network_timeout)
    if settings.calling_ae_allow_list is not None:
        ae.require_calling_aet = list(settings.calling_ae_allow_list)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, list(_UNCOMPRESSED))
    ae.add_supported_context(ModalityPerformedProcedureStep, list(_UNCOMPRESSED))
    return ae


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS when a certificate and key are configured; client certificates
    are required when a CA bundle is given."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both CTDX_TLS_CERT and CTDX_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Listener:
    """The DICOM server of one process and the context its handlers share."""

    def __init__(self, settings: Settings, engine: Engine, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.engine = engine
        self.reuse_port = reuse_port
        self.spool = Spool(settings.spool_dir)
        self.store = InstanceStore(
            self.spool, engine, settings.min_free_bytes, lease_ttl_seconds=LEASE_TTL_SECONDS
        )
        self.associations = Associations()
        self.context = ListenerContext(
            self.store, engine, self.associations, flush_seconds=settings.network_timeout
        )
        self.ae = build_ae(settings)
        self._server: ListenerServer | None = None
        self._thread: threading.Thread | None = None
        self._prepared: PreparedFiles | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        silence_identifier_logging()
        self.spool.prepare()
        try:
            server: ListenerServer = self.ae.make_server(  # type: ignore[assignment]
                (self.settings.host, self.settings.port),
                ae_title=self.settings.ae_title,
                ssl_context=tls_context(self.settings),
                evt_handlers=event_handlers(self.context),
                server_class=ListenerServer,
                reuse_port=self.reuse_port,
                fast_store=self._fast_store(),
                limits=ConnectionLimits(
                    self.settings.max_associations,
                    self.settings.max_pending_associations, self.settings.max_pending_per_peer,
                ),
            )  # bound and listening; nothing is accepted before serve_forever
        except BaseException:
            self._close_prepared()
            raise
        self.store.recorder.start()
        stream_received_data_sets_to(self.spool.incoming)
        use_fast_command_sets(True)
        use_event_driven_waits(True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ctdx-listener",
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "listening on %s:%d as %s (TLS %s, calling AEs %s)",
            self.settings.host, self.port, self.settings.ae_title,
            "on" if server.ssl_context else "off", ",".join(self.settings.allowed_calling_aes),
        )

    @property
    def fast_path_answers(self) -> int:
        """C-STORE requests this process answered on the fast path (:mod:`ctdx.scp.fastpath`)."""
        config = self._server.fast_store if self._server is not None else None
        return config.answered.value if config is not None else 0

    def _fast_store(self) -> FastStoreConfig | None:
        if not self.settings.fast_receive:
            return None
        self._prepared = PreparedFiles(self.spool.incoming)
        return FastStoreConfig(
            store=functools.partial(store_received, self.context),
            sop_classes=frozenset(str(uid) for uid in STORAGE_SOP_CLASSES),
            incoming=self._prepared,
        )

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for assoc in server.active_associations:
            assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.recorder.stop()
        self.store.close()
        self._close_prepared()
        stop_streaming()
        use_fast_command_sets(False)
        use_event_driven_waits(False)

    def _close_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.close()


class Housekeeper:
    """Periodic work: lease heartbeat everywhere; completion and sweeping in the primary."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        listener: Listener,
        primary: bool,
        on_completed: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.listener = listener
        self.primary = primary
        self.on_completed = on_completed
        self._last_heartbeat = 0.0
        self._last_sweep = 0.0
        self._last_expiry = 0.0

    @property
    def tick_seconds(self) -> float:
        return max(0.05, min(1.0, self.settings.quiet_seconds / 4))

    def run_once(self) -> int:
        """One round; returns how many versions it completed."""
        clock = time.monotonic()
        if clock - self._last_heartbeat >= HEARTBEAT_SECONDS:
            self._heartbeat()
            self._last_heartbeat = clock
        if not self.primary:
            return 0
        if clock - self._last_sweep >= SWEEP_SECONDS:
            stale = 2 * self.settings.network_timeout + 60  # no live transfer is idle that long
            self.listener.spool.clear_incoming(older_than_seconds=stale)
            # a dead secondary's acknowledged instances: no live recorder holds links this old
            reindex_unindexed(self.listener.spool, self.engine, self.listener.store.cache,
                              older_than_seconds=ORPHAN_SECONDS)
            self._last_sweep = clock
        expire = clock - self._last_expiry >= HEARTBEAT_SECONDS
        if expire:
            self._last_expiry = clock
        completed = self._complete(expire)
        if completed:
            self.on_completed()
        return completed

    def _heartbeat(self) -> None:
        holders = self.listener.associations.holders()
        if not holders:
            return
        with session_scope(self.engine) as session:
            registry.renew_leases(
                session, holders, registry.lease_expiry(utcnow(), LEASE_TTL_SECONDS)
            )

    def _complete(self, expire_leases: bool) -> int:
        now = utcnow()
        completed = 0
        with session_scope(self.engine) as session:
            if expire_leases:  # a write: at heartbeat pace, not every tick
                completion.expire_leases(session, now)
            candidates = completion.quiet_candidates(session, now, self.settings.quiet_seconds)
            give_up = now.timestamp() - MPPS_GIVE_UP_SECONDS
            steps = completion.pending_mpps_steps(session, _from_timestamp(give_up))
        for version_id in candidates:
            with session_scope(self.engine) as session:
                completed += completion.complete_quiet(
                    session, version_id, now, self.settings.quiet_seconds
                )
        for step_id in steps:
            with session_scope(self.engine) as session:
                completed += len(completion.complete_mpps_step(session, step_id, now))
        return completed


def _from_timestamp(value: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(value, UTC)


class ScpService:
    """Listener plus housekeeping for one process; ``start()``/``stop()`` or a ``with`` block."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        primary: bool = True,
        sender: Sender | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self._own_engine = engine is None
        self.engine = engine or make_engine(
            settings.resolved_database_url,
            pool_size=settings.max_associations + 4,
            max_overflow=8,
        )
        self.primary = primary
        self.listener = Listener(settings, self.engine, reuse_port=reuse_port)
        self._sender = sender
        self._dispatch_loop: Periodic | None = None
        self._housekeeping_loop: Periodic | None = None

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> ScpService:
        require_head(self.engine)
        dispatcher: OutboxDispatcher | None = None
        if self.primary:
            sender = self._sender or CelerySender(self.settings)
            self._sender = sender
            dispatcher = OutboxDispatcher(
                self.engine, sender, self.settings.outbox_poll_seconds, settings=self.settings
            )
            self._dispatch_loop = Periodic(
                "ctdx-outbox", dispatcher.dispatch_due, self.settings.outbox_poll_seconds
            )
        wake = self._dispatch_loop.wake.set if self._dispatch_loop else (lambda: None)
        self.listener.context.on_completed = wake
        housekeeper = Housekeeper(self.settings, self.engine, self.listener, self.primary, wake)
        self._housekeeping_loop = Periodic(
            "ctdx-housekeeping", housekeeper.run_once, housekeeper.tick_seconds
        )
        self.listener.start()
        self._housekeeping_loop.start()
        if self._dispatch_loop is not None:
            self._dispatch_loop.start()
        return self

    def stop(self) -> None:
        self.listener.stop()
        for loop in (self._housekeeping_loop, self._dispatch_loop):
            if loop is not None and loop.is_alive():
                loop.stop()
        close = getattr(self._sender, "close", None)
        if callable(close):
            close()
        if self._own_engine:
            self.engine.dispose()

    def __enter__(self) -> ScpService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def recover(settings: Settings, engine: Engine) -> None:
    """Start-up recovery of the primary (see the module docstring)."""
    spool = Spool(settings.spool_dir)
    spool.prepare()
    removed = spool.clear_incoming()
    # acknowledged instances whose rows a crash kept from being written: record them now
    reindex_unindexed(spool, engine, registry.RegistryCache())
    now = utcnow()
    with session_scope(engine) as session:
        dropped = completion.drop_dead_leases(session)
        resumed = completion.resume_receiving(session, now)
    logger.info(
        "start-up: %d interrupted transfer(s) removed, %d stale lease(s) dropped, "
        "%d study version(s) still arriving get a new quiet period",
        removed, dropped, resumed,
    )


def _secondary_main(settings: Settings, parent_pid: int, index: int) -> None:
    """A secondary listener process: serve until told to stop or the parent is gone."""
    from ctdx.db.logs import configure_logging

    configure_logging()
    configure_process()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ScpService(settings, primary=False, reuse_port=True):
        logger.info("listener process %d of %d running", index + 1, settings.listener_processes)
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                logger.warning("primary listener process is gone; stopping")
                break


def configure_process() -> None:
    """Process-wide switches of a listener process (``ctdx scp`` and its secondaries).

    pydicom only decodes DIMSE command sets and MPPS attribute lists here (data
    sets are read by :mod:`ctdx.scp.header_scan`, never re-encoded), so checking each
    value against its VR's regular expression is work without a use: the
    listener is tolerant when decoding. Only set in listener processes: other
    code in a process (tests, the report builder) keeps pydicom's validation.
    """
    silence_identifier_logging()
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the listener until SIGTERM/SIGINT (or ``stop``): what ``ctdx scp`` does."""
    configure_process()
    stop = stop or threading.Event()
    engine = make_engine(
        settings.resolved_database_url, pool_size=settings.max_associations + 4, max_overflow=8
    )
    require_head(engine)
    recover(settings, engine)
    scp_metrics.start(settings)  # before secondaries start: they inherit its directory
    multi = settings.listener_processes > 1
    spawn = multiprocessing.get_context("spawn")
    children: list[Any] = []
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    service = ScpService(settings, engine, primary=True, reuse_port=multi)
    try:
        service.start()
        if multi:
            for index in range(1, settings.listener_processes):
                child = spawn.Process(
                    target=_secondary_main, args=(settings, os.getpid(), index),
                    name=f"ctdx-scp-{index}", daemon=False,
                )
                child.start()
                children.append(child)
        while not stop.wait(1.0):
            for i, child in enumerate(children):
                if not child.is_alive():
                    logger.error("listener process %s exited (%s); restarting", child.name,
                                 child.exitcode)
                    scp_metrics.process_exited(child.pid)  # its open associations are gone
                    replacement = spawn.Process(
                        target=_secondary_main, args=(settings, os.getpid(), i + 1),
                        name=child.name, daemon=False,
                    )
                    replacement.start()
                    children[i] = replacement
    finally:
        logger.info("stopping")
        for child in children:
            child.terminate()
        for child in children:
            child.join(timeout=10)
        service.stop()
        engine.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
