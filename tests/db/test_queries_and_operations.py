"""db.queries and db.operations as a library: frozen results, no PHI unless asked, no commits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from ctdx.db import operations, queries
from ctdx.db.models import AuditEntry, Base, ExportState, StudyVersion
from ctdx.db.session import session_scope
from tests.cli.factories import Scenario, build_scenario


@pytest.fixture
def filled(engine: Engine) -> Scenario:
    with session_scope(engine) as session:
        return build_scenario(session)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    s = sessionmaker(bind=engine)()
    try:
        yield s
    finally:
        s.rollback()
        s.close()


def _walk(value: object) -> Iterator[object]:
    yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)


def test_results_are_frozen_plain_data_without_phi(filled: Scenario, session: Session) -> None:
    results: list[object] = [
        queries.list_studies(session),
        queries.get_study(session, "ACC-COVID"),
        queries.study_stats(session),
        queries.list_exports(session),
    ]
    for result in results:
        for value in _walk(result):
            assert not isinstance(value, Base), f"ORM object leaked: {value!r}"
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                assert type(value).__dataclass_params__.frozen  # type: ignore[attr-defined]
    detail = queries.get_study(session, "ACC-COVID")
    with pytest.raises(dataclasses.FrozenInstanceError):
        detail.accession_number = "x"  # type: ignore[misc]
    assert detail.patient_id is None and detail.patient_name is None
    assert all(r.patient_name is None for r in queries.list_studies(session))
    with_phi = queries.get_study(session, "ACC-COVID", include_phi=True)
    assert with_phi.patient_name == "DOE^JANE"
    assert not session.new and not session.dirty and not session.deleted


def test_operations_commit_nothing_themselves(
    filled: Scenario, engine: Engine, session: Session
) -> None:
    done = operations.requeue_study(session, filled.uids["failed"], "tester@host")
    assert done.previous_state == "failed" and done.audit_id > 0
    retried = operations.retry_export(session, dead=True, actor="tester@host")
    assert [r.export_id for r in retried] == [filled.exports["dead"]]
    session.rollback()  # the caller decides: nothing of either action remains
    with session_scope(engine) as other:
        assert other.scalar(select(func.count(AuditEntry.id))) == 0
        states = set(other.scalars(select(StudyVersion.state)))
        assert "complete" not in states
        dead = queries.list_exports(other, state=ExportState.DEAD)
        assert [e.id for e in dead] == [filled.exports["dead"]]


def test_retry_needs_exactly_one_target(filled: Scenario, session: Session) -> None:
    with pytest.raises(ValueError):
        operations.retry_export(session, actor="a@b")
    with pytest.raises(ValueError):
        operations.retry_export(session, 1, dead=True, actor="a@b")


def test_turnaround_statistics() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 100.0]
    t = queries.turnaround(values)
    assert t.count == 5 and t.median_seconds == 30.0 and t.max_seconds == 100.0
    assert t.p95_seconds == pytest.approx(88.0)  # numpy's linear interpolation
    assert queries.turnaround([]).median_seconds is None
    assert queries.summarise_exports(["delivered", "pending"]) == "pending"
    assert queries.summarise_exports(["delivered", "dead", "pending"]) == "dead"
    assert queries.summarise_exports([]) is None
    assert queries.iso_study_date("20260501") == "2026-05-01"
    assert queries.iso_study_date("2026") == "2026"
