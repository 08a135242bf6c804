"""What local validation reads from and writes to the results database.

- :func:`model_in_use` and :func:`load_cases`: the studies of a truth file,
  joined with their analyses by one model; every study that cannot be used is
  returned as :class:`Excluded` with the reason (never dropped silently).
- :func:`adopt`: records an operating point (``operating_points``) and its
  audit row in the caller's transaction.
- :func:`current_operating_point`: what the worker runs at for a model.
- :func:`drift`: per week or month, the calls against the adopted baseline.

Like :mod:`ctdx.db.queries`, functions take a caller-owned session, never commit,
and hand out frozen dataclasses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ctdx.db import operations
from ctdx.db.models import Analysis, AnalysisState, OperatingPoint, Study, StudyVersion, utcnow
from ctdx.db.queries import _is_newest_analysis, _period
from ctdx.db.selftest_studies import not_test_version

logger = logging.getLogger(__name__)

ACTION_ADOPT = "validation.adopt"
_CHUNK = 500  # keys per IN (...) list


class ValidationError(Exception):
    """A validation that cannot be run or adopted; the message says why."""


@dataclass(frozen=True)
class ModelRef:
    model_name: str
    model_version: str
    model_uid: str

    def label(self) -> str:
        return f"{self.model_name} {self.model_version} (UID {self.model_uid})"


@dataclass(frozen=True)
class TruthRow:
    line: int  # in the CSV file, header = line 1
    key: str  # Study Instance UID or accession number, as written
    truth: str  # one of db.validation.CLASSES


@dataclass(frozen=True)
class Case:
    """A truth row with its analysis by the validated model."""

    line: int
    key: str
    truth: str
    study_instance_uid: str
    accession_number: str | None
    version: int
    analysis_id: int
    decision: str
    fraction_covid19: float
    threshold: float


class ExclusionReason(StrEnum):
    MISSING = "missing"  # no study with this UID or accession number
    AMBIGUOUS = "ambiguous"  # the accession number names several studies
    FAILED = "failed"  # the model's analysis failed
    PENDING = "pending"  # not analysed yet (arriving, queued, being analysed)
    OTHER_MODEL = "other_model"  # analysed, but only by another model or version
    DUPLICATE = "duplicate"  # the same study named twice in the truth file


@dataclass(frozen=True)
class Excluded:
    line: int
    key: str
    truth: str
    reason: ExclusionReason
    detail: str
    study_instance_uid: str | None = None


def model_in_use(session: Session, model: str | None = None) -> ModelRef:
    """The model of the newest finished analysis, or the one named by UID or version.

    ``model`` may be a model UID or a model version (the newest analysed
    model with that version); :class:`ValidationError` when none matches.
    """
    stmt = (
        select(Analysis.model_name, Analysis.model_version, Analysis.model_uid)
        .where(Analysis.state == AnalysisState.ANALYSED.value)
        .order_by(Analysis.finished_at.desc(), Analysis.id.desc())
        .limit(1)
    )
    if model is not None:
        key = model.strip()
        stmt = stmt.where((Analysis.model_uid == key) | (Analysis.model_version == key))
    row = session.execute(stmt).first()
    if row is None:
        if model is None:
            raise ValidationError("no analysed study in the database: nothing to validate")
        raise ValidationError(f"no analysed study by a model with UID or version {model!r}")
    return ModelRef(row.model_name, row.model_version, row.model_uid)


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _studies(session: Session, keys: Sequence[str]
             ) -> tuple[dict[str, Study], dict[str, list[Study]]]:
    by_uid: dict[str, Study] = {}
    by_accession: dict[str, list[Study]] = defaultdict(list)
    for chunk in _chunks(sorted(set(keys))):
        for study in session.scalars(select(Study).where(Study.study_instance_uid.in_(chunk))):
            by_uid[study.study_instance_uid] = study
        for study in session.scalars(
            select(Study).where(Study.accession_number.in_(chunk)).order_by(Study.id)
        ):
            by_accession[str(study.accession_number)].append(study)
    return by_uid, by_accession


def _analyses(session: Session, study_ids: Sequence[int]
              ) -> dict[int, list[tuple[StudyVersion, Analysis | None]]]:
    """Per study: its versions, newest first, each with its analyses (or None)."""
    out: dict[int, list[tuple[StudyVersion, Analysis | None]]] = defaultdict(list)
    for start in range(0, len(study_ids), _CHUNK):
        chunk = study_ids[start : start + _CHUNK]
        rows = session.execute(
            select(StudyVersion, Analysis)
            .outerjoin(Analysis, Analysis.study_version_id == StudyVersion.id)
            .where(StudyVersion.study_id.in_(chunk))
            .order_by(StudyVersion.version.desc(), Analysis.id.desc())
        ).all()
        for version, analysis in rows:
            out[version.study_id].append((version, analysis))
    return out


def _classify(row: TruthRow, study: Study, history: list[tuple[StudyVersion, Analysis | None]],
              model: ModelRef) -> Case | Excluded:
    mine = [(v, a) for v, a in history if a is not None and a.model_uid == model.model_uid]
    for version, analysis in mine:  # newest version first
        if (analysis.state == AnalysisState.ANALYSED and analysis.fraction_covid19 is not None
                and analysis.decision is not None and analysis.threshold is not None):
            return Case(
                line=row.line, key=row.key, truth=row.truth,
                study_instance_uid=study.study_instance_uid,
                accession_number=study.accession_number, version=version.version,
                analysis_id=analysis.id, decision=analysis.decision,
                fraction_covid19=float(analysis.fraction_covid19),
                threshold=float(analysis.threshold),
            )

    def excluded(reason: ExclusionReason, detail: str) -> Excluded:
        return Excluded(row.line, row.key, row.truth, reason, detail, study.study_instance_uid)

    for version, analysis in mine:
        if analysis.state == AnalysisState.FAILED:
            return excluded(ExclusionReason.FAILED,
                            f"version {version.version}: {analysis.failure_reason or 'failed'}")
    if mine:
        return excluded(ExclusionReason.PENDING, "being analysed by this model")
    others = sorted({f"{a.model_name} {a.model_version} (UID {a.model_uid})"
                     for _, a in history if a is not None and a.state == AnalysisState.ANALYSED})
    if others:
        return excluded(ExclusionReason.OTHER_MODEL, "analysed only by " + "; ".join(others))
    newest = history[0][0] if history else None
    state = newest.state if newest is not None else "no version"
    return excluded(ExclusionReason.PENDING, f"not analysed by any model (study is {state})")


def load_cases(session: Session, rows: Sequence[TruthRow], model: ModelRef
               ) -> tuple[list[Case], list[Excluded]]:
    """Join truth rows with the model's analyses; the rest is excluded with its reason."""
    by_uid, by_accession = _studies(session, [r.key for r in rows])
    resolved: dict[int, Study | Excluded] = {}
    for row in rows:
        if row.key in by_uid:
            resolved[row.line] = by_uid[row.key]
        elif len(by_accession.get(row.key, [])) == 1:
            resolved[row.line] = by_accession[row.key][0]
        elif row.key in by_accession:
            uids = ", ".join(s.study_instance_uid for s in by_accession[row.key])
            resolved[row.line] = Excluded(
                row.line, row.key, row.truth, ExclusionReason.AMBIGUOUS,
                f"accession number names {len(by_accession[row.key])} studies ({uids}); "
                "give the Study Instance UID")
        else:
            resolved[row.line] = Excluded(
                row.line, row.key, row.truth, ExclusionReason.MISSING,
                "no study with this Study Instance UID or accession number")
    study_ids = sorted({s.id for s in resolved.values() if isinstance(s, Study)})
    histories = _analyses(session, study_ids)
    cases: list[Case] = []
    excluded: list[Excluded] = []
    seen: dict[str, int] = {}
    for row in rows:
        target = resolved[row.line]
        if isinstance(target, Excluded):
            excluded.append(target)
            continue
        if target.study_instance_uid in seen:
            excluded.append(Excluded(
                row.line, row.key, row.truth, ExclusionReason.DUPLICATE,
                f"same study as line {seen[target.study_instance_uid]}",
                target.study_instance_uid))
            continue
        seen[target.study_instance_uid] = row.line
        outcome = _classify(row, target, histories.get(target.id, []), model)
        (cases if isinstance(outcome, Case) else excluded).append(outcome)  # type: ignore[arg-type]
    return cases, excluded


# --- operating points ---------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPointInfo:
    id: int
    adopted_at: datetime
    adopted_by: str
    model_name: str
    model_version: str
    model_uid: str
    threshold: float
    choice: str
    target_sensitivity: float | None
    validated_at: datetime
    n_studies: int
    n_positive: int
    n_negative: int
    sensitivity: float
    sensitivity_low: float
    sensitivity_high: float
    specificity: float
    specificity_low: float
    specificity_high: float
    positive_rate: float
    auc: float | None
    source_dir: str | None


def _info(row: OperatingPoint) -> OperatingPointInfo:
    return OperatingPointInfo(**{name: getattr(row, name)
                                 for name in OperatingPointInfo.__dataclass_fields__})


def current_operating_point(session: Session, model_uid: str) -> OperatingPointInfo | None:
    """The newest operating point adopted for ``model_uid``; None = not validated locally."""
    row = session.scalars(
        select(OperatingPoint).where(OperatingPoint.model_uid == model_uid)
        .order_by(OperatingPoint.adopted_at.desc(), OperatingPoint.id.desc()).limit(1)
    ).first()
    return _info(row) if row is not None else None


def operating_point(session: Session, operating_point_id: int) -> OperatingPointInfo | None:
    row = session.get(OperatingPoint, operating_point_id)
    return _info(row) if row is not None else None


def newest_operating_point(session: Session) -> OperatingPointInfo | None:
    """The newest operating point of any model (the drift baseline)."""
    row = session.scalars(
        select(OperatingPoint).order_by(OperatingPoint.adopted_at.desc(), OperatingPoint.id.desc())
        .limit(1)
    ).first()
    return _info(row) if row is not None else None


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def adopt(session: Session, validation: Mapping[str, Any], *, choice: str, actor: str,
          source_dir: str | None, now: datetime | None = None) -> OperatingPointInfo:
    """Record the operating point ``choice`` ("target" or "paper") of a ``validate run`` result.

    ``validation`` is the run's JSON document (``validation.json``). Refused
    (:class:`ValidationError`) when the target sensitivity was not reached, or
    when the set lacks positives or negatives. The audit row names ``actor``.
    """
    now = now or utcnow()
    key = {"target": "at_target_sensitivity", "paper": "at_paper_threshold"}.get(choice)
    if key is None:
        raise ValidationError(f"unknown choice {choice!r}: target or paper")
    point = validation.get(key)
    if not point or point.get("threshold") is None:
        raise ValidationError(
            f"the validation reached no threshold with sensitivity "
            f"{validation.get('target_sensitivity')}: adopt the paper's threshold (--choice "
            "paper) or validate on more studies"
        )
    sens, spec = point["sensitivity"], point["specificity"]
    if sens["value"] is None or spec["value"] is None:
        raise ValidationError(
            "the validation set needs COVID-19 and non-COVID-19 studies to give sensitivity "
            f"and specificity (it has {validation['n_positive']} and "
            f"{validation['n_negative']})")
    model = validation["model"]
    row = OperatingPoint(
        adopted_at=now, adopted_by=actor[:128], model_name=model["model_name"],
        model_version=model["model_version"], model_uid=model["model_uid"],
        threshold=float(point["threshold"]),
        choice="target_sensitivity" if choice == "target" else "paper",
        target_sensitivity=validation.get("target_sensitivity") if choice == "target" else None,
        validated_at=_aware(validation["validated_at"]), n_studies=validation["n_studies"],
        n_positive=validation["n_positive"], n_negative=validation["n_negative"],
        sensitivity=sens["value"], sensitivity_low=sens["low"], sensitivity_high=sens["high"],
        specificity=spec["value"], specificity_low=spec["low"], specificity_high=spec["high"],
        positive_rate=float(point["positive_rate"]), auc=validation["roc"]["auc"],
        source_dir=source_dir, truth_sha256=validation["truth"]["sha256"],
        summary=dict(validation),
    )
    session.add(row)
    session.flush()
    previous = session.scalars(
        select(OperatingPoint).where(OperatingPoint.model_uid == row.model_uid,
                                     OperatingPoint.id != row.id)
        .order_by(OperatingPoint.id.desc()).limit(1)
    ).first()
    operations.record(
        session, actor=actor, action=ACTION_ADOPT, target=row.model_uid, at=now,
        detail={
            "operating_point_id": row.id, "threshold": row.threshold, "choice": row.choice,
            "model_version": row.model_version, "n_studies": row.n_studies,
            "validated_at": validation["validated_at"], "source_dir": source_dir,
            "truth_sha256": row.truth_sha256,
            "previous_threshold": previous.threshold if previous is not None else None,
        },
    )
    logger.info("operating point %d adopted for model %s: threshold %g (%s) by %s",
                row.id, row.model_uid, row.threshold, row.choice, actor)
    return _info(row)


# --- drift ------------------------------------------------------------------------------


class PeriodUnit(StrEnum):
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True)
class PeriodRow:
    period: str  # "2026-W49" or "2026-12" (local calendar)
    start: datetime
    end: datetime
    studies: int  # analysed study versions (newest analysis of each)
    called_covid19: int
    positive_rate: float | None
    mean_fraction_covid19: float | None
    # studies whose share is above the baseline's threshold: the period as the validation would
    # have called it (studies called before the adoption were called at another threshold)
    above_baseline_threshold: int | None
    p_value: float | None  # binomial test of the above against the baseline; None without one
    flagged: bool


@dataclass(frozen=True)
class Drift:
    by: PeriodUnit
    since: datetime | None
    until: datetime | None
    baseline: OperatingPointInfo | None
    alpha: float
    periods: tuple[PeriodRow, ...]


def _period_of(moment: datetime, by: PeriodUnit) -> tuple[str, datetime, datetime]:
    local = moment.astimezone().date()
    if by is PeriodUnit.WEEK:
        first = local - timedelta(days=local.weekday())
        after = first + timedelta(days=7)
        year, week, _ = first.isocalendar()
        label = f"{year}-W{week:02d}"
    else:
        first = local.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
        label = f"{first.year}-{first.month:02d}"

    def midnight(day: date) -> datetime:
        return datetime.combine(day, time()).astimezone().astimezone(UTC)

    return label, midnight(first), midnight(after)


def drift(session: Session, by: PeriodUnit, *, since: datetime | None = None,
          until: datetime | None = None) -> Drift:
    """Per local week or month (of when the version started arriving): the analysed calls.

    The baseline is the newest adopted operating point's positive rate (share
    of its validation set called COVID-19 at the adopted threshold). Each
    period's studies are counted at that same threshold (their COVID-19 slice
    share above it), so studies called before the adoption compare alike; a
    period is flagged when the exact binomial test gives p < :data:`DRIFT_ALPHA`.
    """
    from ctdx.db.validation import DRIFT_ALPHA, drift_p_value  # scipy: not at import

    baseline = newest_operating_point(session)
    rows = session.execute(
        select(StudyVersion.first_received_at, Analysis.decision, Analysis.fraction_covid19)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(_is_newest_analysis(), Analysis.state == AnalysisState.ANALYSED.value,
               not_test_version(),  # self-test studies are no patients
               *_period(StudyVersion.first_received_at, since, until))
    ).all()
    groups: dict[str, list[tuple[str | None, float | None]]] = defaultdict(list)
    bounds: dict[str, tuple[datetime, datetime]] = {}
    for received_at, decision, fraction in rows:
        label, start, end = _period_of(received_at, by)
        groups[label].append((decision, fraction))
        bounds[label] = (start, end)
    periods = []
    for label in sorted(groups, key=lambda k: bounds[k][0]):
        calls = groups[label]
        n = len(calls)
        positive = sum(1 for d, _ in calls if d == "covid19")
        fractions = [f for _, f in calls if f is not None]
        above = (sum(1 for _, f in calls if f is not None and f > baseline.threshold)
                 if baseline else None)
        p = (drift_p_value(above, n, baseline.positive_rate)
             if baseline is not None and above is not None else None)
        periods.append(PeriodRow(
            period=label, start=bounds[label][0], end=bounds[label][1], studies=n,
            called_covid19=positive, positive_rate=positive / n if n else None,
            mean_fraction_covid19=sum(fractions) / len(fractions) if fractions else None,
            above_baseline_threshold=above, p_value=p, flagged=p is not None and p < DRIFT_ALPHA,
        ))
    return Drift(by=by, since=since, until=until, baseline=baseline, alpha=DRIFT_ALPHA,
                 periods=tuple(periods))


# --- the worker's threshold ---------------------------------------------------------------


@dataclass(frozen=True)
class StudyThreshold:
    """The threshold an analysis is made at and where it comes from."""

    threshold: float
    operating_point_id: int | None  # the adopted operating point used; None: configured
    source: str  # "adopted", "configured" (CTDX_COVID_THRESHOLD) or "default" (paper's 5%)


def study_threshold(session: Session, model_uid: str, configured: float,
                    explicitly_set: bool) -> StudyThreshold:
    """The site's adopted threshold for ``model_uid``, unless the setting was given explicitly.

    ``explicitly_set``: ``CTDX_COVID_THRESHOLD`` (or the config file) named a
    threshold; it wins over an adopted operating point, which is logged.
    """
    point = current_operating_point(session, model_uid)
    if explicitly_set:
        if point is not None:
            logger.warning(
                "CTDX_COVID_THRESHOLD=%g overrides operating point %d adopted for model %s "
                "(threshold %g, validated on %d studies): unset it to use the site's",
                configured, point.id, model_uid, point.threshold, point.n_studies)
        return StudyThreshold(configured, None, "configured")
    if point is None:
        return StudyThreshold(configured, None, "default")
    return StudyThreshold(point.threshold, point.id, "adopted")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def operating_point_statement(session: Session, analysis_id: int) -> str:
    """One line for the report: the threshold used and the local validation it rests on.

    Plain ASCII (it goes into the SR's algorithm parameters). Depends only on
    rows older than the analysis, so a rebuilt report says the same.
    """
    analysis = session.get(Analysis, analysis_id)
    if analysis is None or analysis.threshold is None:
        return "operating point: none (no study call)"
    threshold = analysis.threshold
    if analysis.operating_point_id is not None:
        point = operating_point(session, analysis.operating_point_id)
        if point is not None:
            return (
                f"operating point: COVID-19 above {_pct(threshold)} of analysed slices, adopted "
                f"{point.adopted_at.date().isoformat()} for this model from a local validation "
                f"of {point.n_studies} studies ({point.n_positive} COVID-19) run "
                f"{point.validated_at.date().isoformat()}: sensitivity {_pct(point.sensitivity)} "
                f"(95% CI {_pct(point.sensitivity_low)}-{_pct(point.sensitivity_high)}), "
                f"specificity {_pct(point.specificity)} (95% CI {_pct(point.specificity_low)}-"
                f"{_pct(point.specificity_high)})"
            )
    adopted = session.scalars(
        select(OperatingPoint).where(OperatingPoint.model_uid == analysis.model_uid,
                                     OperatingPoint.adopted_at <= analysis.claimed_at)
        .order_by(OperatingPoint.adopted_at.desc(), OperatingPoint.id.desc()).limit(1)
    ).first()
    if adopted is not None:
        return (
            f"operating point: COVID-19 above {_pct(threshold)} of analysed slices, set by "
            f"configuration (CTDX_COVID_THRESHOLD) instead of the site's adopted "
            f"{_pct(adopted.threshold)}; this threshold is not validated at this site"
        )
    return (
        f"operating point: COVID-19 above {_pct(threshold)} of analysed slices (the paper's "
        "default or configured); this model is not validated at this site (no local "
        "validation adopted)"
    )
