"""From an analysis to report files on disk and rows in the export outbox.

Reads like the diagram: load the analysis -> read the headers it needs from
the spool -> build the objects named by ``settings.report_outputs`` -> write
each durably -> record one export per object -> try to deliver at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ctdx.db.models import Analysis, AnalysisState, StudyVersion, utcnow
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.worker.report import outbox, storage
from ctdx.worker.report.delivery import deliver_due
from ctdx.worker.report.errors import SourceImageMissing
from ctdx.worker.report.frames import frame_view
from ctdx.worker.report.headers import clean_header
from ctdx.worker.report.inputs import ReportInput, SliceInfo, load_report_input
from ctdx.worker.report.ko import build_key_objects
from ctdx.worker.report.outbox import StoredObject
from ctdx.worker.report.routing import destination_for
from ctdx.worker.report.sr import SrSources, build_sr
from ctdx.worker.report.summary import build_summary
from ctdx.worker.report.uids import ReportKind, object_uids
from ctdx.worker.report.validation import InvalidReportObject, require_valid, scrubbed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreviousAnalysis:
    study_version: int
    model_uid: str


def previous_analyses(session: Session, inp: ReportInput) -> list[PreviousAnalysis]:
    """Earlier analyses of the same study, newest first (the newest SR among them is replaced)."""
    rows = session.execute(
        select(StudyVersion.version, Analysis.model_uid, Analysis.finished_at)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(
            StudyVersion.study_id == inp.study_id,
            Analysis.state == AnalysisState.ANALYSED,
            Analysis.id != inp.analysis_id,
        )
    ).all()
    older = [
        row
        for row in rows
        if (row.version, row.finished_at or inp.finished_at) < (inp.study_version, inp.finished_at)
    ]
    older.sort(key=lambda row: (row.version, row.finished_at or inp.finished_at), reverse=True)
    return [PreviousAnalysis(row.version, row.model_uid) for row in older]


def read_image(settings: Settings, sl: SliceInfo, pixels: bool = False) -> Dataset:
    """A source image from the spool, cleaned so the builders copy only valid values.

    :func:`~worker.report.headers.clean_header`: empty or invalid attributes are
    left out, the copied Type 2 attributes are present (empty when unknown).
    """
    path = settings.spool_dir / sl.path
    try:
        dataset = dcmread(path, stop_before_pixels=not pixels)
    except (OSError, InvalidDicomError) as exc:
        raise SourceImageMissing(
            f"instance {sl.sop_instance_uid} is not readable in the spool: {exc}"
        ) from exc
    return clean_header(dataset)


def predecessor_header(
    settings: Settings, inp: ReportInput, previous: list[PreviousAnalysis]
) -> Dataset | None:
    """The SR of the newest earlier analysis that has one on disk."""
    for prev in previous:
        uids = object_uids(inp.study_instance_uid, prev.study_version, prev.model_uid, "sr")
        path = settings.data_dir / storage.relative_path(
            inp.study_instance_uid, "sr", uids.sop_instance_uid
        )
        if path.is_file():
            return storage.read_header(path)
    return None


def build_objects(engine: Engine, analysis_id: int, settings: Settings) -> list[StoredObject]:
    """Build, check and durably write the configured report objects of an analysis.

    An object that cannot be built or fails :func:`~worker.report.validation.check_object`
    is not written and not returned (so never sent); ``analyses.report_problems``
    says which and why. The others go on.
    """
    with session_scope(engine) as session:
        inp = load_report_input(session, analysis_id)
        previous = previous_analyses(session, inp)
    key_slices = inp.key_slices
    source = read_image(settings, key_slices[0] if key_slices else inp.slices[0])
    headers: dict[str, Dataset] = {}  # frames of one instance: its header is read once
    for sl in key_slices:
        if sl.path not in headers:
            headers[sl.path] = read_image(settings, sl)
    key_headers = [
        clean_header(frame_view(headers[sl.path], sl.frame_number)) for sl in key_slices
    ]
    objects: list[StoredObject] = []
    problems: list[str] = []

    def add(kind: ReportKind, build: Callable[[], Dataset], replaces: str | None = None) -> None:
        """Build and check the object, write the bytes checked durably and add it; or say
        in ``problems`` why not."""
        try:
            dataset = build()
            path = storage.save(settings.data_dir, kind, dataset, require_valid(dataset, kind))
        except InvalidReportObject as exc:
            problems.append(f"{kind} {exc.sop_instance_uid}: {'; '.join(exc.problems)}")
            return
        except SourceImageMissing:
            raise
        except BUILD_ERRORS as exc:
            problems.append(f"{kind}: cannot be built ({scrubbed(exc)})")
            return
        objects.append(StoredObject(kind, str(dataset.SOPInstanceUID), str(path), replaces))

    if "sr" in settings.report_outputs:
        predecessor = predecessor_header(settings, inp, previous)
        add("sr", lambda: build_sr(
            inp, SrSources(source=source, key_images=key_headers, predecessor=predecessor)
        ), replaces=str(predecessor.SOPInstanceUID) if predecessor is not None else None)
    if "sc" in settings.report_outputs:
        shown = key_slices[0] if key_slices else representative_slice(inp)

        def summary() -> Dataset:
            if shown.frame_number is None:
                return build_summary(inp, read_image(settings, shown, pixels=True), shown)
            # one frame of a multi-frame instance: decode only that frame
            return build_summary(inp, read_image(settings, shown), shown,
                                 pixels=settings.spool_dir / shown.path)

        add("sc", summary)
    if "ko" in settings.report_outputs:
        if key_headers:
            add("ko", lambda: build_key_objects(inp, key_headers))
        else:
            logger.info("analysis %d has no key slices: no key object selection", analysis_id)
    record_problems(engine, analysis_id, problems)
    return objects


#: What a builder raises on source data it cannot represent (highdicom, pydicom, numpy, PIL).
BUILD_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError,
                NotImplementedError, RuntimeError, OverflowError, LookupError)


def record_problems(engine: Engine, analysis_id: int, problems: list[str]) -> None:
    """Store why objects were not sent (NULL when all passed), and log it with UIDs only."""
    text = "\n".join(problems) if problems else None
    with session_scope(engine) as session:
        analysis = session.get_one(Analysis, analysis_id)
        analysis.report_problems = text[:8000] if text else None
    for line in problems:
        logger.error("analysis %d: report object not sent: %s", analysis_id, line)


def representative_slice(inp: ReportInput) -> SliceInfo:
    """Without key slices, the summary shows the middle analysed slice."""
    analysed = [s for s in inp.slices if not s.skipped] or list(inp.slices)
    return analysed[len(analysed) // 2]


def publish_reports(engine: Engine, analysis_id: int, settings: Settings) -> None:
    """Build the report objects of an analysed study and try to deliver them at once.

    Idempotent: an analysis whose exports are recorded is not built again, its
    pending exports are only offered for delivery. Raises
    :class:`~worker.report.errors.ReportError` when no report can be built;
    never raises for delivery problems (the outbox retries them).
    """
    with session_scope(engine) as session:
        existing = outbox.export_ids_of(session, analysis_id)
    destination = destination_for(engine, analysis_id, settings)
    if existing:
        ids = existing
        logger.info(
            "analysis %d: exports already recorded, offering them for delivery", analysis_id
        )
    else:
        objects = build_objects(engine, analysis_id, settings)
        if destination is None:
            logger.info(
                "analysis %d: %d report objects built; no PACS configured (CTDX_PACS_HOST)",
                analysis_id,
                len(objects),
            )
            return
        ids = outbox.record_exports(engine, analysis_id, objects, destination, utcnow())
    try:
        deliver_due(engine, settings, ids=ids)
    except (SQLAlchemyError, OSError):
        logger.exception("analysis %d: immediate delivery failed; the outbox retries", analysis_id)
