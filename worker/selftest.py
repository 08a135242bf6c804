"""``ctdx selftest``: check a live installation end to end with a synthetic test study.

Stages, each timed and passed or failed (the first failure ends the run):

1. ``echo``: C-ECHO to the listener (``CTDX_HOST``/``CTDX_PORT``, or ``--host``/``--port``);
2. ``stand-in PACS``: unless ``--to-pacs``, a storage SCP this command starts
   (on ``--report-host``, a free port) to receive the test study's reports;
3. ``send``: a synthetic chest CT phantom (:mod:`ctdx.model_train.phantom`) with
   Patient ID ``CTDX-SELFTEST`` and a new Study Instance UID, recorded in
   ``selftest_studies`` first with the destination of its reports, then sent
   by C-STORE inside an MPPS IN PROGRESS ... COMPLETED step (so the listener
   completes it at once instead of after its quiet period);
4. ``received``: the listener recorded every instance and completed the study;
5. ``analysed``: a worker analysed it;
6. ``report delivered``: its report objects are delivered (and, with the
   stand-in, the SR arrived there).

The worker learns where a test study's reports go from ``selftest_studies``
(:mod:`ctdx.worker.report.routing`): the stand-in's ``AE@host:port``, or the
configured PACS with ``--to-pacs``. Test studies are left out of
``ctdx results stats`` and never alert (:mod:`ctdx.db.selftest_studies`).
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ctdx.db.settings import Settings, load_settings

logger = logging.getLogger(__name__)

CALLING_AE = "CTDXSELFTEST"
STAND_IN_AE = "CTDXSELFTESTPACS"
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class SelftestFailed(Exception):
    """A stage did not pass; the message says what to look at."""


@dataclass(frozen=True)
class Stage:
    name: str
    ok: bool
    seconds: float
    detail: str


@dataclass
class Run:
    stages: list[Stage] = field(default_factory=list)
    study_instance_uid: str | None = None
    destination: str | None = None
    to_pacs: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return bool(self.stages) and all(s.ok for s in self.stages)


class StandIn:
    """A storage SCP in this process that keeps the SOP Instance UIDs and classes it receives."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.received: dict[str, str] = {}  # SOP Instance UID -> SOP Class UID
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> StandIn:
        from pynetdicom import AE, StoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        def on_store(event: Any) -> int:
            with self._lock:
                self.received[str(event.request.AffectedSOPInstanceUID)] = str(
                    event.request.AffectedSOPClassUID)
            return 0x0000

        ae = AE(ae_title=STAND_IN_AE)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def srs(self) -> list[str]:
        with self._lock:
            return [uid for uid, cls in self.received.items()
                    if cls.startswith(SR_SOP_CLASS_PREFIX)]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listener_host(settings: Settings, host: str | None) -> str:
    if host:
        return host
    return "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host


def _echo(host: str, port: int, called_ae: str, timeout: float) -> str:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SelftestFailed(f"association with {called_ae}@{host}:{port} {how} "
                             "(is `ctdx scp` running there, and is CTDXSELFTEST an allowed "
                             "calling AE?)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or int(status.Status) != 0x0000:
        raise SelftestFailed("C-ECHO got no success status")
    return f"{called_ae}@{host}:{port} answered C-ECHO"


def _send(paths: list[Path], host: str, port: int, called_ae: str, timeout: float) -> str:
    """C-STORE inside an MPPS step: N-CREATE IN PROGRESS, the images, N-SET COMPLETED."""
    import pydicom
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        ModalityPerformedProcedureStep,
    )

    datasets = [pydicom.dcmread(p) for p in paths]
    first = datasets[0]
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise SelftestFailed(f"the listener at {host}:{port} refused the association")
    step_uid = generate_uid()
    try:
        create = pydicom.Dataset()
        create.PatientID = first.PatientID
        create.PatientName = first.PatientName
        scheduled = pydicom.Dataset()
        scheduled.StudyInstanceUID = first.StudyInstanceUID
        create.ScheduledStepAttributesSequence = DicomSequence([scheduled])
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        create.Modality = "CT"
        create.PerformedSeriesSequence = DicomSequence([])
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, step_uid)
        mpps = bool(status) and int(status.Status) == 0x0000
        failures = 0
        for ds in datasets:
            reply = assoc.send_c_store(ds)
            if not reply or int(reply.Status) != 0x0000:
                failures += 1
        if failures:
            raise SelftestFailed(f"{failures} of {len(datasets)} instances were not stored "
                                 "(see the listener's log; is the disk guard refusing?)")
        if mpps:
            done = pydicom.Dataset()
            done.PerformedProcedureStepStatus = "COMPLETED"
            series = pydicom.Dataset()
            series.SeriesInstanceUID = first.SeriesInstanceUID
            refs = []
            for ds in datasets:
                ref = pydicom.Dataset()
                ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
                ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                refs.append(ref)
            series.ReferencedImageSequence = DicomSequence(refs)
            done.PerformedSeriesSequence = DicomSequence([series])
            status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, step_uid)
            mpps = bool(status) and int(status.Status) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    how = "MPPS COMPLETED" if mpps else "no MPPS: completion after the quiet period"
    return f"{len(datasets)} instances stored ({how})"


def _poll(what: Callable[[], str | None], deadline: float, waiting_for: str,
          state: Callable[[], str]) -> str:
    """Call ``what`` until it returns a detail; SelftestFailed at the deadline."""
    while True:
        detail = what()
        if detail is not None:
            return detail
        if time.monotonic() > deadline:
            raise SelftestFailed(f"timed out waiting for {waiting_for} ({state()})")
        time.sleep(0.5)


@dataclass
class Observer:
    """Reads the test study's progress from the database."""

    url: str
    study_instance_uid: str
    expected_instances: int
    _engine: Any = None

    def __post_init__(self) -> None:
        from ctdx.db.session import make_engine

        self._engine = make_engine(self.url)

    def close(self) -> None:
        self._engine.dispose()

    def snapshot(self) -> dict[str, Any]:
        from sqlalchemy import func, select

        from ctdx.db.models import Analysis, Export, Instance, Study, StudyVersion
        from ctdx.db.session import session_scope

        with session_scope(self._engine) as s:
            version = s.execute(
                select(StudyVersion.id, StudyVersion.state, StudyVersion.version)
                .join(Study, Study.id == StudyVersion.study_id)
                .where(Study.study_instance_uid == self.study_instance_uid)
                .order_by(StudyVersion.version.desc())
            ).first()
            if version is None:
                return {"state": "not received"}
            count = s.scalar(select(func.count(Instance.id))
                             .where(Instance.study_version_id == version.id)) or 0
            analysis = s.execute(
                select(Analysis.id, Analysis.state, Analysis.decision, Analysis.failure_reason)
                .where(Analysis.study_version_id == version.id).order_by(Analysis.id.desc())
            ).first()
            exports = [] if analysis is None else s.execute(
                select(Export.kind, Export.state, Export.destination, Export.last_error)
                .where(Export.analysis_id == analysis.id)
            ).all()
        return {"state": str(version.state), "instances": int(count), "analysis": analysis,
                "exports": exports}


def _received(obs: Observer) -> str | None:
    snap = obs.snapshot()
    if snap["state"] in ("not received", "receiving"):
        return None
    if snap["instances"] != obs.expected_instances:
        raise SelftestFailed(f"the listener recorded {snap['instances']} of "
                             f"{obs.expected_instances} instances")
    return f"{snap['instances']} instances recorded, study {snap['state']}"


def _analysed(obs: Observer) -> str | None:
    snap = obs.snapshot()
    analysis = snap.get("analysis")
    if snap["state"] == "failed" or (analysis is not None and analysis.state == "failed"):
        reason = analysis.failure_reason if analysis is not None else "unknown"
        raise SelftestFailed(f"the analysis failed: {reason}")
    if snap["state"] != "analysed" or analysis is None:
        return None
    return f"analysis {analysis.id}: {analysis.decision}"


def _delivered(obs: Observer, stand_in: StandIn | None) -> str | None:
    exports = obs.snapshot().get("exports") or []
    dead = [e for e in exports if e.state == "dead"]
    if dead:
        raise SelftestFailed(f"report {dead[0].kind} to {dead[0].destination} is dead: "
                             f"{dead[0].last_error}")
    if not exports or any(e.state != "delivered" for e in exports):
        return None
    if stand_in is not None and not stand_in.srs():
        return None
    kinds = ",".join(sorted(e.kind for e in exports))
    return f"{kinds} delivered to {exports[0].destination}"


def _state_hint(obs: Observer) -> Callable[[], str]:
    def hint() -> str:
        snap = obs.snapshot()
        state = snap["state"]
        tip = {
            "queued": "; is a worker running (`ctdx worker`) on the same broker?",
            "complete": "; the listener cannot reach the broker?",
            "processing": "; a worker is analysing it",
        }.get(state, "")
        pending = [e for e in (snap.get("exports") or []) if e.state == "pending"]
        if pending and pending[0].last_error:
            tip = f"; last delivery error: {pending[0].last_error}"
        return f"study version is {state}{tip}"

    return hint


def run_selftest(settings: Settings, *, host: str | None, port: int | None, to_pacs: bool,
                 report_host: str, timeout: float, slices: int, size: int,
                 on_stage: Callable[[Stage], None]) -> Run:
    """Run the stages in order; stop at the first that fails."""
    from ctdx.db import selftest_studies
    from ctdx.db.session import make_engine
    from ctdx.model_train.phantom import write_phantom_series

    run = Run(to_pacs=to_pacs)
    deadline = run.started + timeout
    listener = _listener_host(settings, host)
    listener_port = port or settings.port
    stand_in: StandIn | None = None
    observer: Observer | None = None
    workdir = Path(tempfile.mkdtemp(prefix="ctdx-selftest-"))

    def stage(name: str, body: Callable[[], str]) -> None:
        began = time.monotonic()
        try:
            detail = body()
        except SelftestFailed as exc:
            result = Stage(name, False, round(time.monotonic() - began, 2), str(exc))
        else:
            result = Stage(name, True, round(time.monotonic() - began, 2), detail)
        run.stages.append(result)
        on_stage(result)
        if not result.ok:
            raise SelftestFailed(result.detail)

    try:
        stage("echo", lambda: _echo(listener, listener_port, settings.ae_title,
                                    settings.network_timeout))

        def start_stand_in() -> str:
            nonlocal stand_in
            if to_pacs:
                if not settings.pacs_host:
                    raise SelftestFailed("--to-pacs, but no PACS is configured (CTDX_PACS_HOST)")
                run.destination = None
                return (f"reports go to the configured PACS {settings.pacs_ae_title}@"
                        f"{settings.pacs_host}:{settings.pacs_port}")
            try:
                stand_in = StandIn(report_host, _free_port(report_host)).start()
            except OSError as exc:
                raise SelftestFailed(
                    f"cannot start the stand-in PACS on {report_host}: {exc}") from None
            run.destination = f"{STAND_IN_AE}@{report_host}:{stand_in.port}"
            return f"listening as {run.destination}"

        stage("stand-in PACS", start_stand_in)

        def send() -> str:
            nonlocal observer
            from pydicom.uid import generate_uid

            study_uid = generate_uid()
            phantom = write_phantom_series(
                workdir, "covid19", n_slices=slices, size=size, seed=int(time.time()) % 10_000,
                study_instance_uid=study_uid, patient_id=selftest_studies.SELFTEST_PATIENT_ID)
            run.study_instance_uid = study_uid
            engine = make_engine(settings.resolved_database_url)
            try:
                selftest_studies.register(engine, study_uid, run.destination)
            finally:
                engine.dispose()
            observer = Observer(settings.resolved_database_url, study_uid, len(phantom.paths))
            return f"study {study_uid}: " + _send(list(phantom.paths), listener, listener_port,
                                                  settings.ae_title, settings.network_timeout)

        stage("send", send)
        assert observer is not None
        obs = observer
        stage("received", lambda: _poll(lambda: _received(obs), deadline,
                                        "the listener to complete the study", _state_hint(obs)))
        stage("analysed", lambda: _poll(lambda: _analysed(obs), deadline,
                                        "the analysis", _state_hint(obs)))
        stage("report delivered", lambda: _poll(lambda: _delivered(obs, stand_in), deadline,
                                                "the report's delivery", _state_hint(obs)))
    except SelftestFailed:
        pass
    finally:
        if stand_in is not None:
            stand_in.stop()
        if observer is not None:
            observer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return run


class SelftestFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


def run_json(run: Run) -> dict[str, Any]:
    """The documented JSON object (docs/cli-json.md, `ctdx selftest`)."""
    return {
        "ok": run.ok,
        "study_instance_uid": run.study_instance_uid,
        "to_pacs": run.to_pacs,
        "report_destination": run.destination,
        "total_seconds": round(time.monotonic() - run.started, 2),
        "stages": [{"name": s.name, "ok": s.ok, "seconds": s.seconds, "detail": s.detail}
                   for s in run.stages],
    }


SELFTEST_HELP = (
    "Check the installation end to end: C-ECHO to the listener, send a synthetic test "
    "study (Patient ID CTDX-SELFTEST, a new Study Instance UID each run), wait for its "
    "analysis and for the delivery of its report; print each stage with its time and "
    "pass/fail. Exit 0 only when every stage passes, 1 otherwise.\n\n"
    "Its reports go to a stand-in PACS this command starts (on --report-host, which the "
    "workers must reach), or to the configured PACS with --to-pacs. Test studies are left "
    "out of `ctdx results stats` and never raise alerts. A worker (`ctdx worker`) must be "
    "running; this command reads the same database as the listener and the workers."
)


def selftest_command(
    to_pacs: Annotated[bool, typer.Option(
        "--to-pacs", help="Send the test study's reports to the configured PACS "
        "(CTDX_PACS_HOST) instead of a stand-in.")] = False,
    host: Annotated[str | None, typer.Option(
        "--host", help="Listener host (default CTDX_HOST; 127.0.0.1 when that is 0.0.0.0).",
        show_default=False)] = None,
    port: Annotated[int | None, typer.Option(
        "--port", help="Listener port (default CTDX_PORT).", show_default=False)] = None,
    report_host: Annotated[str, typer.Option(
        "--report-host", help="Address the stand-in PACS listens on; the workers send the "
        "test reports there (use this machine's address when workers run elsewhere).",
    )] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(
        "--timeout", min=5, help="Seconds for the whole test.")] = 300.0,
    slices: Annotated[int, typer.Option(
        "--slices", min=1, help="Slices of the synthetic study.")] = 24,
    size: Annotated[int, typer.Option(
        "--size", min=32, help="Rows and columns of each slice.")] = 256,
    output: Annotated[SelftestFormat, typer.Option(
        "--format", "-f", help="table (for people) or json (for scripts).",
    )] = SelftestFormat.TABLE,
) -> None:
    from ctdx.db.cli.common import open_database
    from ctdx.db.cli.output import make_console, write_json
    from ctdx.db.logs import configure_logging

    configure_logging("WARNING")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # failures are our stages
    settings = load_settings()
    with open_database(None):
        pass  # the database exists, is reachable and at head (else exit 3)
    console = make_console()

    def show(stage: Stage) -> None:
        if output is SelftestFormat.TABLE:
            mark = "[green]PASS[/green]" if stage.ok else "[red]FAIL[/red]"
            console.print(f"{mark} {stage.name:<17} {stage.seconds:7.2f} s  {stage.detail}",
                          highlight=False, soft_wrap=True)

    run = run_selftest(settings, host=host, port=port, to_pacs=to_pacs,
                       report_host=report_host, timeout=timeout, slices=slices, size=size,
                       on_stage=show)
    if output is SelftestFormat.JSON:
        write_json(run_json(run))
    else:
        total = time.monotonic() - run.started
        verdict = "[green]selftest passed[/green]" if run.ok else "[red]selftest FAILED[/red]"
        console.print(f"{verdict} in {total:.1f} s (study {run.study_instance_uid or '-'})",
                      highlight=False, soft_wrap=True)
    if not run.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("selftest", help=SELFTEST_HELP,
                short_help="Check the installation end to end with a test study.")(
        selftest_command)
