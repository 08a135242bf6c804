"""Spool retention (scp/retention.py) through a real listener and `ctdx spool prune` processes.

Studies arrive by real C-STORE; what the worker and the export outbox would
have done to them (analysed, failed, report delivered, pending or dead) is
written to the database directly, since only those rows decide what may go.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from ctdx.db.models import (
    Analysis,
    Export,
    Instance,
    PruneState,
    ReportPrune,
    SpoolPrune,
    Study,
    StudyVersion,
    utcnow,
)
from ctdx.db.session import session_scope
from ctdx.scp import retention
from tests.cli.test_docs import _fields
from tests.conftest import REPO_ROOT, wait_for
from tests.scp.conftest import Running, phantom, send_files

CTDX = [sys.executable, "-c", "from ctdx.cli import main; main()"]


@dataclass(frozen=True)
class Sent:
    uid: str
    paths: tuple[Path, ...]  # the copies in the listener's spool

    def present(self) -> list[bool]:
        return [p.exists() for p in self.paths]


def send_study(scp: Running, tmp_path: Path, size: int = 64, n_slices: int = 4,
               **uids: str) -> Sent:
    study = phantom(tmp_path / "sent", f"s{uuid.uuid4().hex[:8]}", n_slices=n_slices,
                    size=size, **uids)
    assert set(send_files(scp.port, list(study.paths))) == {0x0000}
    uid = study.study_instance_uid

    def queued() -> bool:  # the newest version is handed to the (recording) broker
        with session_scope(scp.engine) as s:
            states = s.scalars(select(StudyVersion.state).join(Study)
                               .where(Study.study_instance_uid == uid)
                               .order_by(StudyVersion.version)).all()
        return bool(states) and states[-1] == "queued"

    wait_for(queued, timeout=60, message=f"study {uid} to be queued")
    with session_scope(scp.engine) as s:
        paths = s.scalars(select(Instance.path).join(StudyVersion).join(Study)
                          .where(Study.study_instance_uid == uid)).all()
    return Sent(uid, tuple(scp.spool / p for p in paths))


def finish(engine: Engine, data_dir: Path, uid: str, *, state: str = "analysed",
           export: str | None = "delivered", age: timedelta = timedelta(days=10),
           version: int | None = None) -> None:
    """What the worker and the outbox would have done, and the arrival moved back by ``age``."""
    now = utcnow()
    with session_scope(engine) as s:
        versions = s.scalars(select(StudyVersion).join(Study)
                             .where(Study.study_instance_uid == uid)).all()
        for v in versions:
            if version is not None and v.version != version:
                continue
            v.state = state
            v.first_received_at = v.last_received_at = now - age
            if state not in ("analysed", "failed"):
                continue
            analysis = Analysis(study_version_id=v.id, state=state, model_name="m",
                                model_version="1", model_uid=f"2.25.{uuid.uuid4().int}",
                                finished_at=now, decision="normal" if state == "analysed" else None)
            s.add(analysis)
            s.flush()
            if export is not None:
                sop = f"2.25.{uuid.uuid4().int}"
                report = data_dir / "sr" / f"{sop}.dcm"
                report.parent.mkdir(parents=True, exist_ok=True)
                report.write_bytes(b"report")
                s.add(Export(analysis_id=analysis.id, kind="sr", destination="PACS@h:104",
                             sop_instance_uid=sop, path=f"sr/{sop}.dcm", state=export))


def ctdx(settings_env: dict[str, str], *args: str,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTDX, *args], cwd=REPO_ROOT, env=settings_env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def env_for(scp: Running, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}
    env.update(CTDX_DATA_DIR=str(scp.settings.data_dir),
               CTDX_DATABASE_URL=scp.settings.resolved_database_url,
               CTDX_EMERGENCY_FREE_BYTES="0")
    env.update({f"CTDX_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def scenario(scp: Running, tmp_path: Path) -> Iterator[dict[str, Sent]]:
    """One study of each kind the retention rule must tell apart."""
    data = scp.settings.data_dir
    sent = {name: send_study(scp, tmp_path) for name in (
        "delivered", "failed", "dead", "undelivered", "unanalysed", "recent", "later_version")}
    finish(scp.engine, data, sent["delivered"].uid)
    finish(scp.engine, data, sent["failed"].uid, state="failed", export=None)
    finish(scp.engine, data, sent["dead"].uid, export="dead")
    finish(scp.engine, data, sent["undelivered"].uid, export="pending")
    finish(scp.engine, data, sent["unanalysed"].uid, state="queued", export=None)
    finish(scp.engine, data, sent["recent"].uid, age=timedelta(days=6))
    # version 1 analysed long ago, version 2 still being analysed: version 2 needs version 1
    later = sent["later_version"]
    extra = send_study(scp, tmp_path, study_instance_uid=later.uid)
    finish(scp.engine, data, later.uid, version=1)
    finish(scp.engine, data, later.uid, state="processing", export=None, version=2)
    sent["later_version"] = Sent(later.uid, later.paths + extra.paths)
    yield sent


def test_prune_removes_exactly_the_finished_studies_past_retention(
    scp: Running, scenario: dict[str, Sent]
) -> None:
    env = env_for(scp, retention_days=7)
    reports_before = sorted((scp.settings.data_dir / "sr").iterdir())
    eligible = {"delivered", "failed", "dead"}
    expected_bytes = sum(p.stat().st_size for n in eligible for p in scenario[n].paths)

    dry = ctdx(env, "spool", "prune", "--dry-run", "--format", "json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    assert {s["study_instance_uid"] for s in planned["studies"]} == {
        scenario[n].uid for n in eligible}
    assert planned["bytes_freed"] == expected_bytes
    assert all(all(s.present()) for s in scenario.values()), "a dry run deleted files"

    done = ctdx(env, "spool", "prune", "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result) == _fields("`ctdx spool prune`")  # docs/cli-json.md, in order
    assert list(result["studies"][0]) == _fields("pruned study")
    assert {s["study_instance_uid"] for s in result["studies"]} == {
        scenario[n].uid for n in eligible}
    assert {s["reason"] for s in result["studies"]} == {"retention"}
    assert result["files_removed"] == sum(len(scenario[n].paths) for n in eligible)
    assert result["bytes_freed"] == expected_bytes
    for name, sent in scenario.items():
        assert sent.present() == [name not in eligible] * len(sent.paths), name
    assert sorted((scp.settings.data_dir / "sr").iterdir()) == reports_before  # reports stay

    with session_scope(scp.engine) as s:
        rows = s.scalars(select(SpoolPrune)).all()
        assert {r.state for r in rows} == {PruneState.PRUNED}
        assert sum(r.files_removed for r in rows) == result["files_removed"]
        assert s.scalar(select(Analysis.id).limit(1)) is not None  # results stay

    again = json.loads(ctdx(env, "spool", "prune", "--format", "json").stdout)
    assert again["studies"] == [] and again["files_removed"] == 0

    # --older-than overrides the setting: the 6-day-old study goes with 5 days
    five = json.loads(ctdx(env, "spool", "prune", "--older-than", "5", "-f", "json").stdout)
    assert [s["study_instance_uid"] for s in five["studies"]] == [scenario["recent"].uid]


def test_results_show_and_requeue_know_a_pruned_study(
    scp: Running, scenario: dict[str, Sent]
) -> None:
    env = env_for(scp)
    assert ctdx(env, "spool", "prune").returncode == 0
    uid = scenario["delivered"].uid
    shown = ctdx(env, "results", "show", uid, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    version = json.loads(shown.stdout)["versions"][0]
    assert version["pruned_at"] is not None and version["prune_reason"] == "retention"
    table = ctdx(env, "results", "show", uid)
    assert "pruned from the spool" in table.stdout
    kept = json.loads(ctdx(env, "results", "show", scenario["undelivered"].uid, "-f",
                           "json").stdout)["versions"][0]
    assert kept["pruned_at"] is None

    refused = ctdx(env, "studies", "requeue", uid)
    assert refused.returncode == 5
    assert "deleted from the spool" in refused.stderr
    with session_scope(scp.engine) as s:  # nothing was changed
        assert s.scalar(select(StudyVersion.state).join(Study)
                        .where(Study.study_instance_uid == uid)) == "analysed"


def test_two_processes_pruning_at_once_split_the_studies(
    scp: Running, tmp_path: Path
) -> None:
    sent = [send_study(scp, tmp_path, n_slices=3) for _ in range(8)]
    for study in sent:
        finish(scp.engine, scp.settings.data_dir, study.uid)
    env = env_for(scp)
    procs = [subprocess.Popen([*CTDX, "spool", "prune", "--format", "json"], cwd=REPO_ROOT,
                              env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    claimed = [{s["study_instance_uid"] for s in r["studies"]} for r in results]
    assert claimed[0].isdisjoint(claimed[1]), "a study was pruned by both processes"
    assert claimed[0] | claimed[1] == {s.uid for s in sent}
    assert sum(r["files_removed"] for r in results) == sum(len(s.paths) for s in sent)
    assert not any(any(s.present()) for s in sent)
    with session_scope(scp.engine) as s:
        rows = s.scalars(select(SpoolPrune)).all()
        assert len(rows) == len(sent) and {r.state for r in rows} == {PruneState.PRUNED}


def test_an_abandoned_claim_is_finished_and_missing_files_are_no_error(
    scp: Running, tmp_path: Path
) -> None:
    study = send_study(scp, tmp_path)
    finish(scp.engine, scp.settings.data_dir, study.uid)
    study.paths[0].unlink()  # already deleted by the process that died
    with session_scope(scp.engine) as s:
        version_id = s.scalar(select(StudyVersion.id).join(Study)
                              .where(Study.study_instance_uid == study.uid))
        s.add(SpoolPrune(study_version_id=version_id, reason="retention",
                         state=PruneState.PRUNING, claimed_by="dead-host:1/x",
                         claimed_at=utcnow() - timedelta(hours=1)))
    result = retention.prune(scp.engine, scp.settings)
    assert [s.study_instance_uid for s in result.studies] == [study.uid]
    assert result.files_removed == len(study.paths) - 1
    assert not any(study.present())
    with session_scope(scp.engine) as s:
        assert s.scalar(select(SpoolPrune.state)) == PruneState.PRUNED


# --- emergency cleaning on a small real file system ---------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs of this test's own (needs root: CI and the dev machines run as root)."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_until_free(mount: Path, free: int) -> Path:
    ballast = mount / "ballast"
    size = shutil.disk_usage(mount).free - free
    with ballast.open("wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, size)
    return ballast


def test_emergency_cleaning_frees_space_oldest_finished_first(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path, small_fs: Path
) -> None:
    guard = 3_000_000
    scp = start_scp_sqlite(data_dir=small_fs / "data", min_free_bytes=guard)
    names = ("oldest", "older", "newer", "newest", "unanalysed", "undelivered")
    sent = {n: send_study(scp, tmp_path, size=256, n_slices=8) for n in names}
    data = scp.settings.data_dir
    for hours, name in zip((5, 4, 3, 2), names[:4], strict=True):  # all within retention
        finish(scp.engine, data, sent[name].uid, age=timedelta(hours=hours))
    finish(scp.engine, data, sent["unanalysed"].uid, state="queued", export=None,
           age=timedelta(days=30))
    finish(scp.engine, data, sent["undelivered"].uid, export="pending", age=timedelta(days=30))
    study_bytes = sum(p.stat().st_size for p in sent["oldest"].paths)

    fill_until_free(small_fs, guard - 500_000)  # below the disk guard: the listener refuses
    late = phantom(tmp_path / "sent", "late", n_slices=1, size=256)
    assert send_files(scp.port, list(late.paths)) == [0xA700]

    mark = retention.free_bytes(scp.spool) + int(1.5 * study_bytes)
    env = env_for(scp, emergency_free_bytes=mark)
    done = ctdx(env, "spool", "prune", "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [s["study_instance_uid"] for s in result["studies"]] == [
        sent["oldest"].uid, sent["older"].uid]
    assert {s["reason"] for s in result["studies"]} == {"emergency"}
    assert result["free_bytes_after"] >= mark > result["free_bytes_before"]
    for name, study in sent.items():
        gone = name in ("oldest", "older")
        assert study.present() == [not gone] * len(study.paths), name
    assert send_files(scp.port, list(late.paths)) == [0x0000]  # the guard lets it in again


def test_emergency_cleaning_never_touches_unfinished_studies(
    scp: Running, tmp_path: Path
) -> None:
    waiting = send_study(scp, tmp_path)
    pending = send_study(scp, tmp_path)
    finish(scp.engine, scp.settings.data_dir, waiting.uid, state="processing", export=None)
    finish(scp.engine, scp.settings.data_dir, pending.uid, export="pending")
    settings = scp.settings.model_copy(update={"emergency_free_bytes": 1 << 60})
    result = retention.prune(scp.engine, settings)  # "disk" can never be free enough
    assert result.studies == ()
    assert all(waiting.present()) and all(pending.present())
    with session_scope(scp.engine) as s:  # the worker finished the first one meanwhile
        s.execute(update(StudyVersion).where(StudyVersion.state == "processing")
                  .values(state="analysed"))
    later = retention.prune(scp.engine, settings)
    assert [s.study_instance_uid for s in later.studies] == [waiting.uid]
    assert not any(waiting.present()) and all(pending.present())


def test_a_late_series_after_pruning_is_analysed_without_the_pruned_files(
    scp: Running, tmp_path: Path
) -> None:
    from ctdx.worker.study import load_study_version

    first = send_study(scp, tmp_path)
    finish(scp.engine, scp.settings.data_dir, first.uid)
    assert retention.prune(scp.engine, scp.settings).studies
    late = send_study(scp, tmp_path, study_instance_uid=first.uid)  # version 2
    with session_scope(scp.engine) as s:
        v2 = s.scalar(select(StudyVersion.id).join(Study).where(
            Study.study_instance_uid == first.uid, StudyVersion.version == 2))
        assert v2 is not None
        loaded = load_study_version(s, v2, scp.spool)
    paths = [i.path for series in loaded.series for i in series.instances]
    version_2 = set(late.paths) - set(first.paths)  # send_study lists every version's files
    assert len(version_2) == 4
    assert sorted(paths) == sorted(p.absolute() for p in version_2)
    assert all(p.exists() for p in paths)


def test_report_objects_are_kept_unless_their_own_retention_is_set(
    scp: Running, scenario: dict[str, Sent]
) -> None:
    def reports() -> dict[str, tuple[str, bool]]:
        with session_scope(scp.engine) as s:
            return {e.path: (e.state, (scp.settings.data_dir / e.path).exists())
                    for e in s.scalars(select(Export))}

    assert ctdx(env_for(scp), "spool", "prune").returncode == 0
    assert all(present for _, present in reports().values())  # default: kept

    done = ctdx(env_for(scp, report_retention_days=0), "spool", "prune", "-f", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    after = reports()
    assert {state for state, present in after.values() if not present} == {"delivered"}
    assert all(present for state, present in after.values() if state != "delivered")
    assert result["reports_removed"] == sum(1 for st, _ in after.values() if st == "delivered")
    assert result["report_bytes_freed"] == len(b"report") * result["reports_removed"]
    with session_scope(scp.engine) as s:
        assert len(s.scalars(select(ReportPrune)).all()) == result["reports_removed"]
    again = json.loads(ctdx(env_for(scp, report_retention_days=0), "spool", "prune",
                            "-f", "json").stdout)
    assert again["reports_removed"] == 0
