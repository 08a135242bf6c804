"""Claims on SQLite and PostgreSQL: one analysis per version and model; takeovers exactly once."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    SliceResult,
    Study,
    StudyVersion,
    VersionState,
    utcnow,
)
from ctdx.db.session import session_scope
from ctdx.worker import claim as claims
from ctdx.worker.claim import ClaimStatus, ModelIdentity
from ctdx.worker.store import ClaimLost, SliceRow, StudyResult, store_results
from tests.conftest import wait_for

MODEL = ModelIdentity("test-resnet50", "1", "1.2.826.0.1.3680043.8.498.1")


def _version(engine: Engine) -> int:
    with session_scope(engine) as session:
        study = Study(study_instance_uid=f"1.2.3.{id(engine)}.{utcnow().timestamp()}")
        session.add(study)
        session.flush()
        version = StudyVersion(study_id=study.id, version=1, state=VersionState.QUEUED.value)
        session.add(version)
        session.flush()
        return version.id


def _state(engine: Engine, version_id: int) -> tuple[str, list[tuple[str, int, str | None]]]:
    with session_scope(engine) as session:
        vstate = session.scalar(select(StudyVersion.state).where(StudyVersion.id == version_id))
        rows = session.execute(
            select(Analysis.state, Analysis.attempts, Analysis.worker).where(
                Analysis.study_version_id == version_id
            )
        ).all()
        return str(vstate), [tuple(r) for r in rows]  # type: ignore[misc]


def _result() -> StudyResult:
    return StudyResult(
        "1.2.3.4", "only series", 2, 1, 1, 1.0, 0.0, 0.0, "covid19", 0.05, None, "cpu"
    )


def _slices() -> list[SliceRow]:
    return [
        SliceRow("1.2.3.4.1", 0, -2.0, 0.0, 0.0, True),
        SliceRow("1.2.3.4.2", 1, 0.0, 1000.0, 0.3, False, 0.9, 0.05, 0.05, "covid19"),
    ]


def test_first_claim_wins_then_busy_then_done(engine: Engine) -> None:
    version_id = _version(engine)
    first = claims.claim(engine, version_id, MODEL, "host-a:1/x", claim_timeout=60)
    assert first.status is ClaimStatus.CLAIMED and first.attempts == 1
    assert _state(engine, version_id)[0] == VersionState.PROCESSING

    second = claims.claim(engine, version_id, MODEL, "host-b:2/y", claim_timeout=60)
    assert second.status is ClaimStatus.BUSY and second.worker == "host-a:1/x"

    assert first.analysis_id is not None
    store_results(engine, first.analysis_id, "host-a:1/x", version_id, _result(), _slices(), {})
    third = claims.claim(engine, version_id, MODEL, "host-b:2/y", claim_timeout=60)
    assert third.status is ClaimStatus.DONE and third.analysis_id == first.analysis_id
    vstate, rows = _state(engine, version_id)
    assert vstate == VersionState.ANALYSED and rows == [("analysed", 1, "host-a:1/x")]

    # another model is another analysis of the same version
    other = ModelIdentity("test-resnet50", "2", "1.2.826.0.1.3680043.8.498.2")
    assert claims.claim(engine, version_id, other, "host-b:2/y", 60).status is ClaimStatus.CLAIMED


def test_concurrent_first_claims_give_one_owner(engine: Engine) -> None:
    version_id = _version(engine)
    results: list[ClaimStatus] = []
    barrier = threading.Barrier(6)

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(claims.claim(engine, version_id, MODEL, f"host:{i}/t", 60).status)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([ClaimStatus.CLAIMED] + [ClaimStatus.BUSY] * 5)
    assert len(_state(engine, version_id)[1]) == 1


def test_stale_claim_is_taken_over_exactly_once(engine: Engine) -> None:
    version_id = _version(engine)
    first = claims.claim(engine, version_id, MODEL, "gone-host:1/x", claim_timeout=60)
    assert first.analysis_id is not None
    later = utcnow() + timedelta(seconds=61)
    results: list[ClaimStatus] = []
    barrier = threading.Barrier(5)

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(claims.claim(engine, version_id, MODEL, f"new:{i}/t", 60, now=later).status)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(ClaimStatus.CLAIMED) == 1
    _, rows = _state(engine, version_id)
    assert len(rows) == 1 and rows[0][1] == 2 and rows[0][2] != "gone-host:1/x"

    # the old holder finds out: no heartbeat, no results
    assert not claims.heartbeat(engine, first.analysis_id, "gone-host:1/x")
    with pytest.raises(ClaimLost):
        store_results(engine, first.analysis_id, "gone-host:1/x", version_id, _result(), [], {})
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(SliceResult)) == 0


def test_claim_of_a_dead_local_process_is_taken_over_at_once(engine: Engine) -> None:
    version_id = _version(engine)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = f"{claims.socket.gethostname()}:{int(proc.stdout)}/dead"
    alive = f"{claims.socket.gethostname()}:1/init"  # pid 1 exists
    assert claims.holder_is_dead(dead) and not claims.holder_is_dead(alive)
    assert not claims.holder_is_dead("other-host:123456789/x")

    claims.claim(engine, version_id, MODEL, dead, claim_timeout=600)
    taken = claims.claim(engine, version_id, MODEL, "me:2/t", claim_timeout=600)
    assert taken.status is ClaimStatus.CLAIMED and taken.taken_over_from == dead
    assert taken.attempts == 2


def test_released_claim_is_taken_over_and_repeated_deaths_fail_the_study(engine: Engine) -> None:
    version_id = _version(engine)
    holder = "h:1/a"
    first = claims.claim(engine, version_id, MODEL, holder, claim_timeout=600)
    assert first.analysis_id is not None
    for attempt in range(2, claims.MAX_ATTEMPTS + 1):
        claims.release(engine, first.analysis_id, holder)
        holder = f"h:{attempt}/a"
        got = claims.claim(engine, version_id, MODEL, holder, claim_timeout=600)
        assert got.status is ClaimStatus.CLAIMED and got.attempts == attempt
    claims.release(engine, first.analysis_id, holder)
    last = claims.claim(engine, version_id, MODEL, "h:99/a", claim_timeout=600)
    assert last.status is ClaimStatus.DONE
    with session_scope(engine) as session:
        row = session.get_one(Analysis, first.analysis_id)
        assert row.state == AnalysisState.FAILED
        assert row.failure_reason and "interrupted 3 times" in row.failure_reason
    assert _state(engine, version_id)[0] == VersionState.FAILED


def test_claim_keeper_heartbeats_and_notices_a_takeover(engine: Engine) -> None:
    version_id = _version(engine)
    mine = claims.claim(engine, version_id, MODEL, "k:1/a", claim_timeout=600)
    assert mine.analysis_id is not None
    analysis_id = mine.analysis_id

    def heartbeat_at() -> object:
        with session_scope(engine) as session:
            return session.get_one(Analysis, analysis_id).heartbeat_at

    before = heartbeat_at()
    with claims.ClaimKeeper(engine, analysis_id, "k:1/a", interval=0.05) as keeper:
        wait_for(lambda: heartbeat_at() != before, timeout=10, message="a heartbeat")
        assert not keeper.lost.is_set()

        def take_over() -> bool:
            # the keeper still beats every 50 ms and may refresh the claim between our release
            # and our claim (then "busy"): try again, as a second worker would later
            claims.release(engine, analysis_id, "k:1/a")
            got = claims.claim(engine, version_id, MODEL, "k:2/b", 600)
            return got.status is ClaimStatus.CLAIMED

        wait_for(take_over, timeout=10, message="a takeover between two heartbeats")
        wait_for(keeper.lost.is_set, timeout=10, message="the keeper to notice the takeover")
