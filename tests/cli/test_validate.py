"""`ctdx validate run|adopt` and `ctdx results stats --by`, on SQLite and PostgreSQL.

Results rows come from :mod:`tests.cli.factories` (as the worker writes them);
every number is recomputed here with scikit-learn / scipy from the same
arrays. The worker's use of an adopted threshold is tested with real
analyses in ``test_adopted_threshold_reaches_the_worker_and_the_sr``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from sqlalchemy import select

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    AuditEntry,
    OperatingPoint,
    SliceResult,
    VersionState,
)
from ctdx.db.session import make_engine, session_scope
from tests.cli.conftest import ctdx, flat
from tests.cli.factories import add_analysis, add_study, add_version, uid
from tests.cli.test_docs import _fields
from tests.worker import conftest as worker_conftest

CLASSES = ["covid19", "other_pneumonia", "normal"]
OTHER_MODEL = uid("model/other")


@dataclass
class Built:
    truth_rows: list[dict[str, str]] = field(default_factory=list)
    cases: list[tuple[str, str, float]] = field(default_factory=list)  # truth, call, share
    expected_excluded: dict[str, str] = field(default_factory=dict)  # key -> reason


def _call(share: float, other: float) -> str:
    if share > 0.05:
        return "covid19"
    return "other_pneumonia" if other > 0.05 else "normal"


def build(url: str, n: int = 60, seed: int = 3, when: datetime | None = None) -> Built:
    """``n`` analysed studies with known classes, plus one of each excluded kind."""
    rng = np.random.default_rng(seed)
    when = when or datetime.now(UTC) - timedelta(days=2)
    out = Built()
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            for i in range(n):
                truth = CLASSES[i % 3]
                share = float(np.clip(rng.normal(0.3 if truth == "covid19" else 0.04, 0.08),
                                      0, 1))
                share = round(share * 40) / 40  # k of 40 slices
                other = 0.3 if truth == "other_pneumonia" and rng.random() < 0.7 else 0.0
                call = _call(share, other)
                study = add_study(s, f"val-{seed}-{i}", accession_number=f"VAL{seed}-{i}",
                                  created_at=when)
                version = add_version(s, study, state=VersionState.ANALYSED,
                                      calling_ae_title="CT01", received_at=when)
                add_analysis(s, version, decision=call,
                             fractions=(share, other, 1.0 - share - other), p_covid=[0.9])
                key = study.study_instance_uid if i % 2 else str(study.accession_number)
                out.truth_rows.append({"accession_number" if i % 2 == 0 else
                                       "study_instance_uid": key, "truth": truth})
                out.cases.append((truth, call, share))
            # failed with the model
            study = add_study(s, f"val-{seed}-failed", accession_number=f"VAL{seed}-F",
                              created_at=when)
            version = add_version(s, study, state=VersionState.FAILED, calling_ae_title="CT01",
                                  received_at=when)
            add_analysis(s, version, state=AnalysisState.FAILED,
                         failure_reason="no usable CT series")
            out.truth_rows.append({"accession_number": f"VAL{seed}-F", "truth": "covid19"})
            out.expected_excluded[f"VAL{seed}-F"] = "failed"
            # analysed by another model only (an older one: the newest analysis names the
            # model in use)
            study = add_study(s, f"val-{seed}-other", accession_number=f"VAL{seed}-O",
                              created_at=when - timedelta(days=30))
            version = add_version(s, study, state=VersionState.ANALYSED,
                                  calling_ae_title="CT01", received_at=when - timedelta(days=30))
            add_analysis(s, version, decision="normal", fractions=(0.0, 0.0, 1.0),
                         p_covid=[0.1], model_uid=OTHER_MODEL)
            out.truth_rows.append({"accession_number": f"VAL{seed}-O", "truth": "normal"})
            out.expected_excluded[f"VAL{seed}-O"] = "other_model"
            # still queued
            study = add_study(s, f"val-{seed}-queued", accession_number=f"VAL{seed}-Q",
                              created_at=when)
            add_version(s, study, state=VersionState.QUEUED, calling_ae_title="CT01",
                        received_at=when)
            out.truth_rows.append({"accession_number": f"VAL{seed}-Q", "truth": "normal"})
            out.expected_excluded[f"VAL{seed}-Q"] = "pending"
            # two studies share an accession number
            for k in range(2):
                study = add_study(s, f"val-{seed}-twin-{k}", accession_number=f"VAL{seed}-TWIN",
                                  created_at=when)
            out.truth_rows.append({"accession_number": f"VAL{seed}-TWIN", "truth": "normal"})
            out.expected_excluded[f"VAL{seed}-TWIN"] = "ambiguous"
        # never sent to ctdx
        out.truth_rows.append({"study_instance_uid": "1.2.3.4.5.404", "truth": "covid19"})
        out.expected_excluded["1.2.3.4.5.404"] = "missing"
    finally:
        engine.dispose()
    return out


def write_truth(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh, ["StudyInstanceUID", "accession_number", "truth", "reader_comment"])
        writer.writeheader()
        for i, row in enumerate(rows):  # classes in any case, as people type them
            writer.writerow({"StudyInstanceUID": row.get("study_instance_uid", ""),
                             "accession_number": row.get("accession_number", ""),
                             "truth": row["truth"].upper() if i % 3 == 0 else row["truth"],
                             "reader_comment": "ignored, | with a pipe"})
    return path


def _wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def _check_prop(p: dict[str, Any], k: int, n: int) -> None:
    assert (p["k"], p["n"]) == (k, n)
    assert p["value"] == pytest.approx(k / n)
    assert (p["low"], p["high"]) == pytest.approx(_wilson(k, n))


def run(url: str, tmp_path: Path, built: Built, *extra: str) -> tuple[dict[str, Any], Path]:
    truth = write_truth(tmp_path / "truth.csv", built.truth_rows)
    out = tmp_path / "validation"
    result = ctdx("validate", "run", "--truth", str(truth), "--out", str(out), "-f", "json",
                  "--database-url", url, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_run_reports_every_metric_as_sklearn_and_scipy_compute_it(
    db_url: str, tmp_path: Path
) -> None:
    built = build(db_url)
    doc, out = run(db_url, tmp_path, built)

    truth = np.array([t == "covid19" for t, _, _ in built.cases])
    calls = np.array([c == "covid19" for _, c, _ in built.cases])
    scores = np.array([s for _, _, s in built.cases])
    assert doc["n_studies"] == len(built.cases)
    assert (doc["n_positive"], doc["n_negative"]) == (truth.sum(), (~truth).sum())
    assert doc["model"]["model_uid"] == uid("model/resnet50")

    matrix = confusion_matrix([t for t, _, _ in built.cases], [c for _, c, _ in built.cases],
                              labels=CLASSES)
    assert doc["confusion_3x3"] == {"labels": CLASSES, "matrix": matrix.tolist()}
    tn, fp, fn, tp = confusion_matrix(truth, calls).ravel()
    rep = doc["as_reported"]
    assert rep["table_2x2"] == {"tp": tp, "fn": fn, "fp": fp, "tn": tn}
    _check_prop(rep["sensitivity"], tp, tp + fn)
    _check_prop(rep["specificity"], tn, tn + fp)
    _check_prop(rep["accuracy"], tp + tn, len(truth))
    _check_prop(rep["accuracy_3class"], int(np.trace(matrix)), len(truth))

    assert doc["roc"]["auc"] == pytest.approx(roc_auc_score(truth, scores))
    assert doc["roc"]["auc_low"] < doc["roc"]["auc"] < doc["roc"]["auc_high"]

    # the threshold for 95% sensitivity: reached, and the least false positives doing so
    target = doc["at_target_sensitivity"]
    t = target["threshold"]
    assert np.mean(scores[truth] > t) >= 0.95
    fpr, tpr, _ = roc_curve(truth, scores)
    assert 1 - target["specificity"]["value"] == pytest.approx(fpr[tpr >= 0.95].min())
    positives_called = int(np.sum(scores[truth] > t))
    _check_prop(target["sensitivity"], positives_called, int(truth.sum()))
    paper = doc["at_paper_threshold"]
    assert paper["threshold"] == 0.05
    _check_prop(paper["specificity"], int(np.sum(scores[~truth] <= 0.05)), int((~truth).sum()))
    # the stored calls were made at 5%: "as reported" and "at the paper's 5%" agree
    assert paper["table_2x2"] == rep["table_2x2"]
    assert doc["current_threshold"] == 0.05

    reasons = {e["key"]: e["reason"] for e in doc["excluded"]}
    assert reasons == built.expected_excluded

    # the JSON is the documented contract (docs/cli-json.md)
    assert list(doc) == _fields("`ctdx validate run --format json`")
    assert list(rep["sensitivity"]) == _fields("proportion")
    assert list(target) == _fields("operating point")
    assert list(doc["excluded"][0]) == _fields("excluded study")
    assert doc["n_excluded"] == len(built.expected_excluded)
    failed = next(e for e in doc["excluded"] if e["reason"] == "failed")
    assert "no usable CT series" in failed["detail"]
    other = next(e for e in doc["excluded"] if e["reason"] == "other_model")
    assert OTHER_MODEL in other["detail"]

    # the files: the same document, tables that add up, a PNG, a report naming the left-outs
    assert json.loads((out / "validation.json").read_text()) == doc
    assert set(doc["files"]) == {p.name for p in out.iterdir()}
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "confusion_3x3.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["truth", *CLASSES]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == matrix.tolist()
    with (out / "excluded.csv").open() as fh:
        assert {r["key"]: r["reason"] for r in csv.DictReader(fh)} == built.expected_excluded
    report = (out / "report.md").read_text()
    for key in built.expected_excluded:
        assert key in report
    assert "roc.png" in report and "Wilson" in report


def test_table_output_names_the_numbers(db_url: str, tmp_path: Path) -> None:
    built = build(db_url, n=30)
    truth = write_truth(tmp_path / "truth.csv", built.truth_rows)
    result = ctdx("validate", "run", "--truth", str(truth), "--out", str(tmp_path / "v"),
                  "--database-url", db_url, columns=120)
    assert result.exit_code == 0, result.output
    assert "30 studies" in result.output and "5 left out" in result.output
    assert "AUC" in result.output and "report.md" in result.output


def test_model_option_and_no_usable_study(sqlite_url: str, tmp_path: Path) -> None:
    built = build(sqlite_url, n=9)
    doc, _ = run(sqlite_url, tmp_path, built, "--model", OTHER_MODEL)
    # only the study analysed by the other model is used; the rest are "other_model"
    assert doc["n_studies"] == 1 and doc["model"]["model_uid"] == OTHER_MODEL
    assert doc["roc"]["auc"] is None  # one class only
    truth = write_truth(tmp_path / "t2.csv", [{"study_instance_uid": "9.9.9", "truth": "normal"}])
    result = ctdx("validate", "run", "--truth", str(truth), "--out", str(tmp_path / "o"),
                  "--database-url", sqlite_url)
    assert result.exit_code == 5 and "none of the 1 studies" in flat(result.output)
    result = ctdx("validate", "run", "--truth", str(truth), "--out", str(tmp_path / "o"),
                  "--model", "no-such-model", "--database-url", sqlite_url)
    assert result.exit_code == 5 and "no-such-model" in flat(result.output)


@pytest.mark.parametrize(("content", "message"), [
    ("study_instance_uid,truth\n1.2.3,covid\n1.2.4,pneumonia\n", "line 3"),
    ("uid,truth\n1.2.3,normal\n", "no study_instance_uid or accession_number column"),
    ("accession_number,finding\nA1,normal\n", "no truth"),
    ("accession_number,truth\n", "has no studies"),
    ("accession_number,truth\n,normal\n", "line 2"),
])
def test_bad_truth_file_is_a_clear_error(sqlite_url: str, tmp_path: Path, content: str,
                                         message: str) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(content)
    result = ctdx("validate", "run", "--truth", str(path), "--out", str(tmp_path / "o"),
                  "--database-url", sqlite_url)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Traceback" not in result.output


def test_adopt_records_the_operating_point_with_an_audit_row(db_url: str, tmp_path: Path
                                                             ) -> None:
    built = build(db_url)
    doc, out = run(db_url, tmp_path, built)
    result = ctdx("validate", "adopt", str(out), "--database-url", db_url, columns=200)
    assert result.exit_code == 0, result.output
    target = doc["at_target_sensitivity"]
    assert f"more than {100 * target['threshold']:.1f}%" in result.output
    result = ctdx("validate", "adopt", str(out), "--choice", "paper", "--database-url", db_url,
                  columns=200)
    assert result.exit_code == 0 and "(was " in result.output
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            first, second = s.scalars(select(OperatingPoint).order_by(OperatingPoint.id)).all()
            audit = s.scalars(select(AuditEntry).where(AuditEntry.action == "validation.adopt")
                              .order_by(AuditEntry.id)).all()
            assert first.threshold == target["threshold"] and first.choice == "target_sensitivity"
            assert first.sensitivity == target["sensitivity"]["value"]
            assert (first.specificity_low, first.specificity_high) == (
                target["specificity"]["low"], target["specificity"]["high"])
            assert first.n_studies == doc["n_studies"] and first.model_uid == uid(
                "model/resnet50")
            assert first.positive_rate == target["positive_rate"]
            assert first.source_dir == str(out.absolute())
            assert second.threshold == 0.05 and second.choice == "paper"
            assert [a.target for a in audit] == [first.model_uid] * 2
            assert "@" in audit[0].actor
            assert json.loads(audit[1].detail or "{}")["previous_threshold"] == first.threshold
    finally:
        engine.dispose()


def test_adopt_refuses_an_unreachable_target_and_a_folder_without_a_run(
    sqlite_url: str, tmp_path: Path
) -> None:
    built = build(sqlite_url, n=12)
    engine = make_engine(sqlite_url)
    with session_scope(engine) as s:  # a COVID-19 study without a single COVID-19 slice
        study = add_study(s, "missed", accession_number="MISSED", created_at=datetime.now(UTC))
        version = add_version(s, study, state=VersionState.ANALYSED, calling_ae_title="CT01",
                              received_at=datetime.now(UTC) - timedelta(days=3))
        add_analysis(s, version, decision="normal", fractions=(0.0, 0.0, 1.0), p_covid=[0.1])
    engine.dispose()
    built.truth_rows.append({"accession_number": "MISSED", "truth": "covid19"})
    doc, out = run(sqlite_url, tmp_path, built, "--target-sensitivity", "1.0")
    assert doc["at_target_sensitivity"]["threshold"] is None
    assert "not reachable" in (out / "report.md").read_text()
    result = ctdx("validate", "adopt", str(out), "--database-url", sqlite_url)
    assert result.exit_code == 5 and "--choice paper" in flat(result.output)
    result = ctdx("validate", "adopt", str(tmp_path), "--database-url", sqlite_url)
    assert result.exit_code == 2 and "validation.json" in flat(result.output)


# --- drift ------------------------------------------------------------------------------


def _weekly(url: str, weeks: list[tuple[int, int]], start: datetime) -> None:
    """Per week: (studies, called COVID-19), received on the week's Wednesday at noon."""
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            for w, (n, positive) in enumerate(weeks):
                when = start + timedelta(weeks=w)
                for i in range(n):
                    covid = i < positive
                    study = add_study(s, f"drift-{w}-{i}", accession_number=None,
                                      created_at=when)
                    version = add_version(s, study, state=VersionState.ANALYSED,
                                          calling_ae_title="CT01", received_at=when)
                    share = 0.4 if covid else 0.01
                    add_analysis(s, version, decision="covid19" if covid else "normal",
                                 fractions=(share, 0.0, 1 - share), p_covid=[0.5])
    finally:
        engine.dispose()


def _wednesday_noon_weeks_ago(weeks: int) -> datetime:
    today = datetime.now().astimezone()
    monday = (today - timedelta(days=today.weekday(), weeks=weeks)).replace(
        hour=12, minute=0, second=0, microsecond=0)
    return (monday + timedelta(days=2)).astimezone(UTC)


def test_drift_flags_a_shifted_week_and_not_a_steady_series(db_url: str, tmp_path: Path
                                                            ) -> None:
    built = build(db_url, n=60, when=_wednesday_noon_weeks_ago(30))
    _, out = run(db_url, tmp_path, built)
    assert ctdx("validate", "adopt", str(out), "--database-url", db_url).exit_code == 0
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        point = s.scalars(select(OperatingPoint)).one()
        baseline, threshold = point.positive_rate, point.threshold
    engine.dispose()
    assert 0.01 <= threshold < 0.4
    n = 40
    steady = round(baseline * n)
    start = _wednesday_noon_weeks_ago(8)
    _weekly(db_url, [(n, steady)] * 6 + [(n, min(n, steady + 20)), (n, steady)], start)

    result = ctdx("results", "stats", "--by", "week", "--since", start.isoformat(), "-f", "json",
                  "--database-url", db_url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc) == _fields("`ctdx results stats --by week|month`")
    assert list(doc["periods"][0]) == _fields("period")
    assert doc["baseline"]["positive_rate"] == baseline
    periods = doc["periods"]
    assert [p["studies"] for p in periods] == [n] * 8
    assert [p["flagged"] for p in periods] == [False] * 6 + [True, False]
    shifted = periods[6]
    assert shifted["called_covid19"] == min(n, steady + 20)
    # counted at the adopted threshold (shares 0.4 and 0.01 lie on either side of it)
    assert [p["above_baseline_threshold"] for p in periods] == [
        p["called_covid19"] for p in periods]
    assert shifted["p_value"] == pytest.approx(
        binomtest(shifted["called_covid19"], n, baseline).pvalue)
    assert shifted["mean_fraction_covid19"] == pytest.approx(
        (0.4 * shifted["called_covid19"] + 0.01 * (n - shifted["called_covid19"])) / n)
    assert shifted["positive_rate"] == pytest.approx(shifted["called_covid19"] / n)

    table = ctdx("results", "stats", "--by", "week", "--since", start.isoformat(),
                 "--database-url", db_url, columns=100)
    assert table.exit_code == 0, table.output
    assert periods[6]["period"] in table.output and "DRIFT" in table.output
    # the validation's own week: called at 5% then, counted at the adopted threshold now,
    # it is exactly the baseline
    everything = json.loads(ctdx("results", "stats", "--by", "week", "-f", "json",
                                 "--database-url", db_url).stdout)["periods"]
    own = next(p for p in everything if p["studies"] == 60)
    assert own["above_baseline_threshold"] == round(baseline * 60) and not own["flagged"]
    months = ctdx("results", "stats", "--by", "month", "-f", "json", "--database-url", db_url)
    assert months.exit_code == 0
    per_month = json.loads(months.stdout)["periods"]
    assert sum(p["studies"] for p in per_month) == 8 * n + 60 + 1  # + the other model's study


def test_drift_without_an_adopted_operating_point_flags_nothing(sqlite_url: str) -> None:
    _weekly(sqlite_url, [(10, 9), (10, 1)], _wednesday_noon_weeks_ago(3))
    result = ctdx("results", "stats", "--by", "week", "-f", "json", "--database-url", sqlite_url)
    doc = json.loads(result.stdout)
    assert doc["baseline"] is None
    assert [p["flagged"] for p in doc["periods"]] == [False, False]
    assert [p["p_value"] for p in doc["periods"]] == [None, None]
    table = ctdx("results", "stats", "--by", "week", "--database-url", sqlite_url, columns=100)
    assert "no operating point adopted" in table.output


# --- the worker uses the adopted threshold; the SR says so --------------------------------
# Real analyses: phantom slices through the worker. A small random-weight network is made to
# call chosen slices COVID-19: a first analysis measures each slice's COVID-19 margin, the
# network's COVID-19 bias is then set in the widest gap between margins, and studies are
# composed of slices above ("COVID-19 slices") and below it, so their shares are known.

SLICES = 8


def _checkpoint(path: Path, bias: float) -> Path:
    import torch

    from ctdx.model_train.method.checkpoint import CheckpointMeta, save_checkpoint
    from ctdx.model_train.method.networks import build_resnet
    from ctdx.model_train.method.preprocess import PreprocessParams

    torch.manual_seed(0)
    net = build_resnet("resnet18")
    with torch.no_grad():  # other pneumonia = normal; COVID-19 margins spread 50-fold
        w = net.fc.weight
        w[2] = w[1]
        w[0] = w[1] + 50.0 * (w[0] - w[1])
        net.fc.bias.copy_(torch.tensor([bias, 0.0, 0.0]))
    save_checkpoint(path, net, CheckpointMeta.new(
        "recognition", "resnet18", "test-validation", "0.0.2",
        training_data={"note": "random weights, tests only"}, preprocess=PreprocessParams(size=64),
    ))
    return path


def _compose(sources: list[Path], out: Path, name: str) -> list[Path]:
    """One new axial series of the given slices (new UIDs, positions 2.5 mm apart)."""
    import pydicom

    out.mkdir(parents=True)
    study, series = uid(f"composed/{name}"), uid(f"composed/{name}/series")
    paths = []
    for i, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        sop = uid(f"composed/{name}/{i}")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.AccessionNumber = f"W-{name}"
        ds.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * i]
        ds.SliceLocation = -100.0 + 2.5 * i
        ds.InstanceNumber = i + 1
        path = out / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dsrdump(path: Path) -> str:
    """dcmtk's reading of an SR, long text values in full."""
    import subprocess

    from tests.conftest import require_tool

    done = subprocess.run([require_tool("dsrdump"), "-Ec", "+Pl", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "E: " not in done.stderr, done.stderr
    return done.stdout


def test_adopted_threshold_reaches_the_worker_and_the_sr(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from ctdx.model_train.phantom import write_phantom_series
    from ctdx.worker import runtime, service
    from ctdx.worker.report.publish import build_objects
    from tests.report.conftest import dciodvfy

    Checkpoints, analysis_settings = worker_conftest.Checkpoints, worker_conftest.analysis_settings
    engine = make_engine(db_url)

    rules = tmp_path / "rules.toml"  # the default rules, but 8-slice series are usable
    rules.write_text('[[filters]]\nattribute = "modality"\nin = ["CT"]\n'
                     '[[filters]]\nattribute = "slice_count"\nmin = 4\n')

    def settings_for(checkpoint: Path, **overrides: object) -> Any:
        return analysis_settings(tmp_path / "data", db_url, Checkpoints(checkpoint, checkpoint),
                                 rules, manifestation_model=None, precision="fp32",
                                 **overrides)

    def analyse(settings: Any, paths: list[Path]) -> Analysis:
        stored = worker_conftest.store_files(engine, tmp_path / "data" / "spool", paths)
        result = service.process_study_version(engine, settings, runtime.get_models(settings),
                                               stored.study_version_id)
        assert result.outcome is service.Outcome.ANALYSED, result
        with session_scope(engine) as s:
            analysis = s.get(Analysis, result.analysis_id)
            assert analysis is not None
            s.expunge(analysis)
            return analysis

    # 1. margins of a pool of phantom slices under the unbiased network
    pool: list[Path] = []
    for i, kind in enumerate(("covid19", "normal", "other_pneumonia")):
        pool += write_phantom_series(tmp_path / f"pool{i}", kind, n_slices=SLICES, size=80,
                                     seed=i).paths
    import pydicom
    by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in pool}
    calibration = _checkpoint(tmp_path / "calibration.pt", 0.0)
    margins: dict[str, float] = {}
    for i in range(3):
        first = analyse(settings_for(calibration), pool[i * SLICES:(i + 1) * SLICES])
        with session_scope(engine) as s:
            for r in s.scalars(select(SliceResult).where(SliceResult.analysis_id == first.id,
                                                         SliceResult.skipped.is_(False))):
                margins[r.sop_instance_uid] = float(
                    np.log(r.p_covid19) - np.log(max(r.p_other_pneumonia, r.p_normal)))
    ranked = sorted(margins.items(), key=lambda kv: kv[1])
    assert len(ranked) >= 8, "too few analysed slices in the pool"
    # the widest gap with at least 4 slices on each side
    j = max(range(3, len(ranked) - 4), key=lambda k: ranked[k + 1][1] - ranked[k][1])
    gap = ranked[j + 1][1] - ranked[j][1]
    assert gap > 0.05, f"margins too close to separate robustly: {ranked}"
    cut = (ranked[j][1] + ranked[j + 1][1]) / 2
    low = [by_sop[sop] for sop, _ in ranked[: j + 1]][:4]
    high = [by_sop[sop] for sop, _ in ranked[j + 1:]][:4]
    model = _checkpoint(tmp_path / "model.pt", -cut)
    settings = settings_for(model)

    # 2. a validation set through the worker: COVID-19 studies all COVID-19 slices, the others
    # half (share 50%) or none; at the paper's 5% the half ones are false positives
    truth = []
    for name, slices, klass in (("p1", high + high, "covid19"), ("p2", high[::-1] * 2, "covid19"),
                                ("n1", high + low, "normal"), ("n2", low + low, "normal"),
                                ("n3", low[::-1] + high[::-1], "other_pneumonia")):
        analysis = analyse(settings, _compose(slices, tmp_path / name, name))
        expected = {"p": 1.0, "n2": 0.0}.get(name[:1] if name != "n2" else name, 0.5)
        assert analysis.fraction_covid19 == pytest.approx(expected), name
        assert analysis.threshold == 0.05 and analysis.operating_point_id is None
        truth.append({"study_instance_uid": uid(f"composed/{name}"), "truth": klass})
    before = analyse(settings, _compose(low + high, tmp_path / "before", "before"))
    assert before.decision == "covid19"  # 50% > 5%
    sr_before = build_objects(engine, before.id, settings)
    unvalidated = dsrdump(tmp_path / "data" / next(o.path for o in sr_before if o.kind == "sr"))
    assert "not validated at this site" in unvalidated

    doc, out = run(db_url, tmp_path, Built(truth_rows=truth))
    assert doc["model"]["model_version"] == "0.0.2" and doc["n_studies"] == 5
    assert doc["at_target_sensitivity"]["threshold"] == pytest.approx(0.5)
    assert doc["as_reported"]["specificity"]["value"] == pytest.approx(1 / 3)
    assert doc["at_target_sensitivity"]["specificity"]["value"] == 1.0
    assert ctdx("validate", "adopt", str(out), "--database-url", db_url).exit_code == 0

    # 3. the next analysis is called at the adopted 50%, and its SR says on what it rests
    after = analyse(settings, _compose(low + high, tmp_path / "after", "after"))
    assert after.fraction_covid19 == pytest.approx(0.5)
    assert after.threshold == pytest.approx(0.5) and after.decision == "normal"
    assert after.operating_point_id is not None
    objects = build_objects(engine, after.id, settings)
    sr = tmp_path / "data" / next(o.path for o in objects if o.kind == "sr")
    tree = dsrdump(sr)
    assert "operating point: COVID-19 above 50.0% of analysed slices" in tree
    assert "local validation of 5 studies (2 COVID-19)" in tree
    assert "sensitivity 100.0% (95% CI 34.2%-100.0%)" in tree  # Wilson, 2 of 2
    errors, _ = dciodvfy(sr)
    assert not errors, errors

    # 4. CTDX_COVID_THRESHOLD set explicitly still wins, and the log says so
    caplog.set_level(logging.WARNING, logger="ctdx.db.validation_db")
    forced = analyse(settings_for(model, covid_threshold=0.05),
                     _compose(low + high, tmp_path / "forced", "forced"))
    assert forced.decision == "covid19" and forced.operating_point_id is None
    assert any("overrides operating point" in r.getMessage() for r in caplog.records)
    objects = build_objects(engine, forced.id, settings)
    tree = dsrdump(tmp_path / "data" / next(o.path for o in objects if o.kind == "sr"))
    assert "set by configuration (CTDX_COVID_THRESHOLD)" in tree
    engine.dispose()


@pytest.mark.slow
def test_real_series_validated_with_the_data_sets_own_subject_table(
    tmp_path: Path, sqlite_url: str, shared_data: Path
) -> None:
    """COVID-CT-MD's COVID-19 subject through the worker; the data set's subjects.csv is the truth.

    The table was written by the data set's authors: its ``class`` column (COVID-19, CAP,
    Normal) and ``study_instance_uid`` are read as they are, the other columns ignored. Only
    P001 is analysed (a real series takes minutes on a loaded 2-core machine): the other two
    subjects are reported as missing.
    """
    from ctdx.worker import runtime, service

    root = shared_data / "covid-ct-md"
    rules = tmp_path / "rules.toml"
    rules.write_text('[[filters]]\nattribute = "modality"\nin = ["CT"]\n')
    model = _checkpoint(tmp_path / "model.pt", 1000.0)  # calls every analysed slice COVID-19
    settings = worker_conftest.analysis_settings(
        tmp_path / "data", sqlite_url, worker_conftest.Checkpoints(model, model), rules,
        manifestation_model=None, precision="fp32")
    engine = make_engine(sqlite_url)
    shares = {}
    for folder in ("COVID-19/P001",):
        stored = worker_conftest.store_files(engine, settings.spool_dir,
                                             sorted((root / folder).glob("*.dcm")))
        result = service.process_study_version(engine, settings, runtime.get_models(settings),
                                               stored.study_version_id)
        assert result.outcome is service.Outcome.ANALYSED, result
        with session_scope(engine) as s:
            analysis = s.get(Analysis, result.analysis_id)
            assert analysis is not None
            shares[stored.study_instance_uid] = analysis.fraction_covid19
    engine.dispose()

    out = tmp_path / "validation"
    result = ctdx("validate", "run", "--truth", str(root / "subjects.csv"), "--out", str(out),
                  "-f", "json", "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n_studies"] == 1 and (doc["n_positive"], doc["n_negative"]) == (1, 0)
    assert doc["confusion_3x3"]["matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    _check_prop(doc["as_reported"]["sensitivity"], 1, 1)
    assert doc["as_reported"]["specificity"]["value"] is None  # no negative study
    assert doc["roc"]["auc"] is None
    assert {(e["line"], e["truth"], e["reason"]) for e in doc["excluded"]} == {
        (3, "other_pneumonia", "missing"), (4, "normal", "missing")}
    with (out / "cases.csv").open() as fh:
        cases = {r["study_instance_uid"]: float(r["fraction_covid19"])
                 for r in csv.DictReader(fh)}
    assert cases == pytest.approx(shares)
