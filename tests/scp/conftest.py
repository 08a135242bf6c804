"""Fixtures of the listener tests: a running listener on localhost and real peers.

``scp_service`` starts the listener in this process (its housekeeping and
outbox threads included) on a free port, over the ``db_url`` database, with an
outbox sender that records what it was given; ``send`` is a pynetdicom SCU
that sends files exactly as they are on disk (chunked: no decode, no
re-encode) or datasets built in the test, and returns each C-STORE status.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    ModalityPerformedProcedureStep,
    Verification,
)
from sqlalchemy import Engine, func, select

from ctdx.db.models import Instance, OutboxEntry, StudyVersion
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings, load_settings
from ctdx.model_train.phantom import PhantomStudy, write_phantom_series
from ctdx.scp.server import ScpService
from tests.conftest import free_port, wait_for

WaitFor = Callable[..., object]


class RecordingSender:
    """An outbox sender that remembers what it was handed (no broker needed)."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.down = False
        self._lock = threading.Lock()

    def send(self, study_version_id: int) -> None:
        from ctdx.scp.outbox import BrokerUnavailable

        if self.down:
            raise BrokerUnavailable("test broker down")
        with self._lock:
            self.sent.append(study_version_id)


@dataclass
class Running:
    """A started listener and what tests need to look at it."""

    service: ScpService
    settings: Settings
    engine: Engine
    sender: RecordingSender
    spool: Path = field(init=False)

    def __post_init__(self) -> None:
        self.spool = self.settings.spool_dir

    @property
    def port(self) -> int:
        return self.service.port

    def versions(self) -> list[StudyVersion]:
        with session_scope(self.engine) as s:
            return list(s.scalars(select(StudyVersion).order_by(StudyVersion.id)))

    def instance_count(self) -> int:
        with session_scope(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    def outbox(self) -> list[OutboxEntry]:
        with session_scope(self.engine) as s:
            return list(s.scalars(select(OutboxEntry).order_by(OutboxEntry.id)))

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.spool.rglob("*.dcm") if ".incoming" not in p.parts)

    def incoming_files(self) -> list[Path]:
        """Files of received data sets in every process's receive folder (not their lock files):
        named ones, and unnamed ones this process holds with data in them (the fast path's,
        see ``ctdx.scp.prepared``; the empty ones it keeps ready are not transfers)."""
        incoming = self.spool / ".incoming"
        named = [p for p in incoming.rglob("*") if p.is_file() and p.suffix != ".lock"]
        return sorted(named + unnamed_files_in(incoming))


def unnamed_files_in(folder: Path, pid: int | str = "self", empty_too: bool = False
                     ) -> list[Path]:
    """Unnamed files under ``folder`` that process ``pid`` holds open: those it has written to,
    or all (``empty_too``: also the empty ones a listener keeps ready)."""
    found = []
    prefix = f"{folder.resolve()}/"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
            if (target.startswith(prefix) and target.endswith(" (deleted)")
                    and (empty_too or os.stat(link).st_size > 0)):
                found.append(Path(target))
        except OSError:  # closed meanwhile
            continue
    return found


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "host": "127.0.0.1",
        "port": free_port(),
        "quiet_seconds": 0.5,
        "outbox_poll_seconds": 0.2,
        "min_free_bytes": 0,
        "broker_url": "memory://",
        "network_timeout": 10,
    }
    values.update(overrides)
    return load_settings(**values)


def _starter(tmp_path: Path, db_url: str) -> tuple[Callable[..., Running], Callable[[], None]]:
    started: list[tuple[ScpService, Engine]] = []

    def start(**overrides: Any) -> Running:
        sender = overrides.pop("sender", None) or RecordingSender()
        settings = make_settings(tmp_path, overrides.pop("database_url", db_url), **overrides)
        service = ScpService(settings, sender=sender)
        service.start()
        engine = make_engine(settings.resolved_database_url)
        started.append((service, engine))
        return Running(service, settings, engine, sender)

    def stop_all() -> None:
        for service, engine in started:
            service.stop()
            engine.dispose()

    return start, stop_all


@pytest.fixture
def start_scp(tmp_path: Path, db_url: str) -> Iterator[Callable[..., Running]]:
    """Start listeners on SQLite and PostgreSQL (``start_scp(**setting_overrides)``)."""
    start, stop_all = _starter(tmp_path, db_url)
    yield start
    stop_all()


@pytest.fixture
def start_scp_sqlite(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[..., Running]]:
    """Like ``start_scp``, SQLite only: for behaviour the database backend cannot change."""
    start, stop_all = _starter(tmp_path, sqlite_url)
    yield start
    stop_all()


@pytest.fixture
def scp(start_scp: Callable[..., Running]) -> Running:
    """A listener with default test settings (quiet period 0.5 s), SQLite and PostgreSQL."""
    return start_scp()


@pytest.fixture
def scp_sqlite(start_scp_sqlite: Callable[..., Running]) -> Running:
    """A listener with default test settings on SQLite."""
    return start_scp_sqlite()


def phantom(tmp_path: Path, name: str = "series", n_slices: int = 6, size: int = 64,
            transfer_syntax_uid: str | None = None, **uids: str) -> PhantomStudy:
    """A small synthetic CT series on disk."""
    return write_phantom_series(
        tmp_path / name, "covid19", n_slices=n_slices, size=size, seed=3,
        transfer_syntax_uid=transfer_syntax_uid, **uids,
    )


STORAGE = (CTImageStorage, EnhancedCTImageStorage)


@contextmanager
def associate(
    port: int,
    transfer_syntaxes: Sequence[str] | None = None,
    ae_title: str = "TESTSCU",
    extra_contexts: Sequence[str] = (),
    **kwargs: Any,
) -> Iterator[Association]:
    """An association with the listener; released on exit (aborted if still open on error)."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    syntaxes = list(transfer_syntaxes) if transfer_syntaxes else None
    for sop_class in STORAGE:
        if syntaxes:
            ae.add_requested_context(sop_class, syntaxes)
        else:
            ae.add_requested_context(sop_class)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    for sop_class in extra_contexts:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTDX", **kwargs)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def status_of(response: Dataset) -> int:
    return int(response.Status) if response is not None and "Status" in response else -1


def transfer_syntax_of(path: Path) -> str:
    """The transfer syntax a file was written in (to propose exactly it)."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def version_states(engine: Engine) -> list[str]:
    """States of every study version, oldest first."""
    with session_scope(engine) as s:
        return [v.state for v in s.scalars(select(StudyVersion).order_by(StudyVersion.id))]


@contextmanager
def chunked_send() -> Iterator[None]:
    """Make pynetdicom send files' bytes as they are on disk (not decoded and re-encoded)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def send_files(port: int, paths: Sequence[Path], transfer_syntax: str | None = None,
               ae_title: str = "TESTSCU") -> list[int]:
    """C-STORE each file as it is on disk; the statuses, in order."""
    syntax = transfer_syntax or str(pydicom.dcmread(paths[0], stop_before_pixels=True)
                                    .file_meta.TransferSyntaxUID)
    statuses = []
    with chunked_send(), associate(port, [syntax], ae_title=ae_title) as assoc:
        assert assoc.is_established
        for path in paths:
            statuses.append(status_of(assoc.send_c_store(path)))
    return statuses


def send_datasets(
    port: int, datasets: Sequence[Dataset], ae_title: str = "TESTSCU"
) -> list[Dataset]:
    """C-STORE datasets built in the test (encoded by pynetdicom); the full responses."""
    responses = []
    with associate(port, ae_title=ae_title) as assoc:
        assert assoc.is_established
        for ds in datasets:
            responses.append(assoc.send_c_store(ds))
    return responses


__all__ = [
    "RecordingSender",
    "Running",
    "WaitFor",
    "associate",
    "chunked_send",
    "make_settings",
    "phantom",
    "send_datasets",
    "send_files",
    "status_of",
    "wait_for",
]
