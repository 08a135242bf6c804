"""A corpus of real-world variety through the real listener, the worker and a PACS (issue 13).

Every case of :mod:`tests.report.corpus` (files nobody here wrote, and the
edits real series come with) is sent by C-STORE to the listener
(``ctdx.scp.server.ScpService`` in this process), analysed by a real ``ctdx
worker`` subprocess (embedded broker, SQLite, the small random-weight test
checkpoints, ``sr,sc,ko``) and its report objects delivered to dcmtk's
``storescp``. Each case must end one of two ways:

- **analysed**, and every report object at the PACS passes ctdx's checks, a
  strict pydicom read, ``dsrdump`` and ``dciodvfy`` with zero errors; or
- **refused** with a reason: stored (``failure_reason``) and shown by
  ``ctdx results show``, or answered by the listener (a C-STORE status with
  an Error Comment, or a presentation context it does not accept).

No case may leave an invalid object at the PACS. One run serves all cases
(one listener, one worker): a few minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.db import migrate
from ctdx.db.models import Analysis, Export, Study, StudyVersion
from ctdx.db.session import make_engine, session_scope
from ctdx.scp.outbox import CelerySender
from ctdx.scp.server import ScpService
from tests.conftest import REPO_ROOT, SHARED_DATA, free_port, require_tool, wait_for
from tests.report.conftest import StoreSCP
from tests.report.corpus import Case, build_cases, ct_small, for_empty, make_series
from tests.report.test_empty_values import assert_valid
from tests.worker.conftest import (  # noqa: F401 - fixtures used here
    Checkpoints,
    WorkerProcess,
    _env,
    analysis_settings,
    checkpoints,
    redis_queue,
    small_rules,
    start_worker,
)

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

#: The corpus, by name; the shared-data cases run when ../shared/data is there.
NAMES = (
    "ct-small", "ct-small-implicit", "ct-small-deflated", "ct-small-big-endian",
    "ct-small-rle", "ct-small-jpeg-ls", "ct-small-jpeg-2000", "ct-small-jpeg-lossless",
    "pynetdicom-ct", "frame-of-reference-missing", "frame-of-reference-empty",
    "series-fields-missing", "patient-name-empty", "latin1-iso-ir-100", "utf8-iso-ir-192",
    "signed-rescale-slope-2", "gantry-tilt", "uneven-spacing", "localizer-first-in-series",
    "localizer-last-in-series",
    "one-slice", "large-1024", "large-1024-for-empty-jpeg-2000", "pydicom-data-enhanced-ct",
    "shared-p001", "shared-p001-for-empty",
)
SHARED = ("shared-p001", "shared-p001-for-empty")
#: Seconds the sender waits for each C-STORE response (pynetdicom's default is 30)
DIMSE_TIMEOUT = 120


@dataclass(frozen=True)
class Sent:
    """What the listener answered for one file: a status, or why nothing was sent."""

    status: int | None
    comment: str
    syntax: str = ""  # the transfer syntax it was sent in
    seconds: float = 0.0  # from the C-STORE request to its response


@dataclass
class CorpusRun:
    cases: dict[str, Case]
    answers: dict[str, list[Sent]]
    database_url: str
    data_dir: Path
    pacs: StoreSCP
    worker_log: Path


def _send(case: Case, port: int, scratch: Path) -> list[Sent]:
    """C-STORE a case's files as a scanner would: its own syntax, or a fallback it converts to."""
    ae = AE(ae_title="SCANNER")
    # a scanner waits for a response longer than pynetdicom's 30 s (storescu: without limit);
    # a response slower than this fails the case, not the whole corpus (see below)
    ae.dimse_timeout = DIMSE_TIMEOUT
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    for sop_class in sorted({str(h.SOPClassUID) for h in headers}):
        ae.add_requested_context(sop_class, [case.syntax, *case.fallback])
    assoc = ae.associate("127.0.0.1", port, ae_title="CTDX")
    if not assoc.is_established:
        return [Sent(None, "association not established")]
    answers = []
    try:
        for path, header in zip(case.files, headers, strict=True):
            if not assoc.is_established:  # aborted by the listener, or the response timed out
                answers.append(Sent(None, "association ended before this file was sent"))
                continue
            contexts = [cx for cx in assoc.accepted_contexts
                        if cx.abstract_syntax == header.SOPClassUID]
            if not contexts:
                answers.append(Sent(None, f"presentation context refused ({case.syntax})"))
                continue
            accepted = contexts[0].transfer_syntax[0]
            if accepted != case.syntax:  # the sender converts, as dcmtk's storescu does
                converted = scratch / f"{case.name}-{path.name}"
                assert accepted == ExplicitVRLittleEndian, accepted
                subprocess.run([require_tool("dcmconv"), "+te", str(path), str(converted)],
                               check=True, capture_output=True, timeout=120)
                path = converted
            started = time.monotonic()
            response = assoc.send_c_store(path)
            seconds = time.monotonic() - started
            status = int(response.Status) if "Status" in response else None
            comment = str(response.get("ErrorComment", "")) if status is not None else (
                f"no response after {seconds:.1f} s (association aborted or timed out)")
            answers.append(Sent(status, comment, accepted, seconds))
    finally:
        assoc.release()
    return answers


def _settled(url: str, expected: int, worker: subprocess.Popen[bytes], log: Path) -> bool:
    if worker.poll() is not None:
        raise AssertionError(f"worker exited:\n{log.read_text(errors='replace')[-4000:]}")
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            states = list(session.scalars(select(StudyVersion.state)))
            exports = list(session.scalars(select(Export.state)))
    finally:
        engine.dispose()
    done = len(states) == expected and all(s in ("analysed", "failed") for s in states)
    return done and all(e in ("delivered", "dead") for e in exports)


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints,  # noqa: F811
    small_rules: Path,  # noqa: F811
) -> Iterator[CorpusRun]:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    root = tmp_path_factory.mktemp("corpus")
    shared = SHARED_DATA if (SHARED_DATA / "covid-ct-md").is_dir() else None
    cases = {c.name: c for c in build_cases(root / "cases", shared)}
    assert set(cases) == set(NAMES) - (set() if shared else set(SHARED))
    url = f"sqlite:///{root / 'ctdx.sqlite3'}"
    migrate.upgrade(url)
    pacs = StoreSCP(root / "pacs", free_port())
    pacs.start()
    settings = analysis_settings(
        root / "data", url, checkpoints, small_rules, host="127.0.0.1", port=free_port(),
        quiet_seconds=1.0, outbox_poll_seconds=0.2, min_free_bytes=0, broker_url="embedded",
        min_lung_fraction=0.0,  # every slice analysed: CT_small is not a chest
        pacs_ae_title=pacs.ae_title, pacs_host="127.0.0.1", pacs_port=pacs.port,
        report_outputs="sr,sc,ko", export_backoff_seconds=0.5, export_max_attempts=2,
    )
    service = ScpService(settings, sender=CelerySender(settings))
    service.start()
    env = _env(settings) | {"CTDX_REPORT_OUTPUTS": "sr,sc,ko", "CTDX_TORCH_THREADS": "1",
                            "CTDX_EXPORT_BACKOFF_SECONDS": "0.5", "CTDX_EXPORT_MAX_ATTEMPTS": "2"}
    log = root / "worker.log"
    with log.open("wb") as fh:
        worker = subprocess.Popen(
            [str(Path(sys.executable).with_name("ctdx")), "worker", "--pool", "solo",
             "--hostname", "corpus@%h"],
            cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        scratch = root / "converted"
        scratch.mkdir()
        # the listener answers after fsync; on ext4 (data=ordered) its first fsync may also
        # write out what earlier tests left in the page cache (CI: model_train's checkpoints
        # and data sets just before this module). Flush that first, outside the sends.
        os.sync()
        started = time.monotonic()
        answers = {name: _send(case, service.port, scratch) for name, case in cases.items()}
        sent = time.monotonic()
        stored = sum(any(a.status == 0 for a in sent) for sent in answers.values())
        wait_for(lambda: _settled(url, stored, worker, log), timeout=900, interval=1.0,
                 message=f"{stored} corpus studies analysed or failed, exports settled")
        slowest = max((a.seconds for sent in answers.values() for a in sent), default=0.0)
        print(f"corpus: {len(cases)} cases sent in {sent - started:.1f} s (slowest C-STORE "
              f"response {slowest:.2f} s), analysed and delivered "
              f"{time.monotonic() - sent:.1f} s later")
        yield CorpusRun(cases, answers, url, root / "data", pacs, log)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        service.stop()
        pacs.stop()


def _pacs_files(run: CorpusRun, study_instance_uid: str) -> list[Path]:
    return [p for p in run.pacs.files()
            if str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            == study_instance_uid]


def _show(run: CorpusRun, study_instance_uid: str) -> dict[str, object]:
    env = {"CTDX_DATABASE_URL": run.database_url, "CTDX_DATA_DIR": str(run.data_dir)}
    shown = CliRunner().invoke(app, ["results", "show", study_instance_uid, "--format", "json"],
                               env=env)
    assert shown.exit_code == 0, shown.output
    document: dict[str, object] = json.loads(shown.output)
    return document


@pytest.mark.parametrize("name", NAMES)
def test_case_is_analysed_with_valid_reports_or_refused_with_a_reason(
    corpus: CorpusRun, name: str
) -> None:
    if name not in corpus.cases:
        pytest.skip("needs ../shared/data")
    case = corpus.cases[name]
    answers = corpus.answers[name]
    if case.expect == "refused":
        assert all(a.status != 0 for a in answers), answers
        assert all(a.comment for a in answers), answers
        assert _pacs_files(corpus, case.study_instance_uid) == []
        return
    assert [a.status for a in answers] == [0] * len(case.files), answers
    if case.fallback:  # the listener declined the file's own syntax (big endian): converted
        assert {a.syntax for a in answers} == {case.fallback[0]}, answers
    engine = make_engine(corpus.database_url)
    try:
        with session_scope(engine) as session:
            study = session.scalars(
                select(Study).where(Study.study_instance_uid == case.study_instance_uid)
            ).one()
            analysis = session.scalars(
                select(Analysis).join(StudyVersion).where(StudyVersion.study_id == study.id)
            ).one()
            state, reason, problems = (analysis.state, analysis.failure_reason,
                                       analysis.report_problems)
            exports = {e.kind: e.state for e in session.scalars(
                select(Export).where(Export.analysis_id == analysis.id))}
    finally:
        engine.dispose()
    shown = _show(corpus, case.study_instance_uid)
    versions = shown["versions"]
    assert isinstance(versions, list)
    [version] = versions
    [shown_analysis] = version["analyses"]
    if case.expect == "failed":
        assert state == "failed" and reason and case.reason in reason.lower(), reason
        assert shown_analysis["failure_reason"] == reason  # what the CLI says
        assert exports == {} and _pacs_files(corpus, case.study_instance_uid) == []
        return
    assert state == "analysed", (reason, corpus.worker_log.read_text(errors="replace")[-3000:])
    assert problems is None, problems
    assert shown_analysis["report_problems"] == []
    assert exports == {"sr": "delivered", "sc": "delivered", "ko": "delivered"}, exports
    received = _pacs_files(corpus, case.study_instance_uid)
    assert sorted(pydicom.dcmread(p).Modality for p in received) == ["KO", "OT", "SR"]
    for path in received:
        assert_valid(path)


def test_every_object_at_the_pacs_is_valid(corpus: CorpusRun) -> None:
    """Whatever happened to each case: nothing invalid reached the PACS."""
    files = corpus.pacs.files()
    analysed = [n for n, c in corpus.cases.items() if c.expect == "analysed"]
    assert len(files) == 3 * len(analysed)
    for path in files:
        assert_valid(path)


@pytest.mark.redis
@pytest.mark.postgres
def test_empty_frame_of_reference_through_redis_postgres_and_a_celery_worker(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_queue: str,  # noqa: F811
    checkpoints: Checkpoints, small_rules: Path,  # noqa: F811
    start_worker: Callable[..., WorkerProcess],  # noqa: F811
) -> None:
    """Issue 13's case in the production shape: what reaches the PACS is valid, the SR too."""
    paths, study_uid = make_series(ct_small(), tmp_path / "series", edit=for_empty)
    case = Case("redis-frame-of-reference-empty", tuple(paths), study_uid, ExplicitVRLittleEndian)
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    pacs.start()
    settings = analysis_settings(
        tmp_path / "data", postgres_url, checkpoints, small_rules, host="127.0.0.1",
        port=free_port(), quiet_seconds=1.0, outbox_poll_seconds=0.2, min_free_bytes=0,
        broker_url=f"{redis_url}/0", min_lung_fraction=0.0, pacs_ae_title=pacs.ae_title,
        pacs_host="127.0.0.1", pacs_port=pacs.port,
    )
    service = ScpService(settings, sender=CelerySender(settings, queue=redis_queue))
    service.start()
    worker = start_worker(settings, redis_queue, "corpus-redis", pool="prefork")
    try:
        answers = _send(case, service.port, tmp_path)
        assert [a.status for a in answers] == [0] * len(paths), answers
        engine = make_engine(postgres_url)

        def delivered() -> list[Path] | None:
            assert worker.proc.poll() is None, worker.output()
            with session_scope(engine) as session:
                states = list(session.scalars(select(Export.state)))
            files = pacs.files()
            done = states and set(states) == {"delivered"} and len(files) == len(states)
            return files if done else None

        try:
            received = wait_for(delivered, timeout=300, message="the report objects delivered")
        finally:
            engine.dispose()
        assert isinstance(received, list)
        modalities = [pydicom.dcmread(p).Modality for p in received]
        assert "SR" in modalities, modalities
        for path in received:
            assert_valid(path)
    finally:
        service.stop()
        pacs.stop()
