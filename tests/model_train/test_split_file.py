"""Splits as data (``--split-file``): small sets, external test subjects, export from the run.

Six synthetic phantom subjects (two per class, 6 slices of 64 px, network input 32 px):
too few for the 70/15/15 ring, which must say what to do instead.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.model_train.importers.dicom_table import import_dicom_table
from ctdx.model_train.manifest import read_manifest, write_manifest
from ctdx.model_train.method.checkpoint import load_checkpoint
from ctdx.model_train.split_file import folds_from_file, read_split_file
from ctdx.model_train.splits import SplitError, recognition_folds
from ctdx.model_train.synthetic import write_recognition_set


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures logging on stderr, which the CLI runner swaps and closes."""
    monkeypatch.setattr("ctdx.model_train.cli._configure_logging", lambda: None)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    table = write_recognition_set(root / "rec", subjects_per_class=2, n_slices=6, size=64)
    write_manifest(import_dicom_table(table), root / "recognition.csv")
    return root / "recognition.csv"


def _subjects(manifest: Path) -> list[str]:
    return sorted({r.subject for r in read_manifest(manifest).rows})


def _write_split(path: Path, roles: dict[str, str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "role"])
        w.writerows(sorted(roles.items()))
    return path


def _train(manifest: Path, split: Path, out: Path, cache: Path) -> str:
    result = CliRunner().invoke(app, [
        "train", "train", "smoke", "--manifest", str(manifest), "--network", "UP-ResNet18",
        "--cache-dir", str(cache), "--split-file", str(split), "--epochs", "2",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_ring_split_of_a_small_set_says_what_is_possible(small_set: Path) -> None:
    with pytest.raises(SplitError, match="6 items are too few.*--split-file.*all 6 subjects "
                                         "in train"):
        recognition_folds(read_manifest(small_set), seed=0)


def test_split_file_errors_name_the_line(tmp_path: Path, small_set: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,role\nx,training\n")
    with pytest.raises(SplitError, match=r"bad.csv:2: role 'training'"):
        read_split_file(bad)
    bad.write_text("subject,role\nx,train\nx,test\n")
    with pytest.raises(SplitError, match=r"bad.csv:3: subject 'x' is in train and test"):
        read_split_file(bad)
    bad.write_text("subj,role\nx,train\n")
    with pytest.raises(SplitError, match="header must be subject,role"):
        read_split_file(bad)
    bad.write_text("subject,role\nnobody,train\n")
    with pytest.raises(SplitError, match="not in the manifest.*'nobody'"):
        folds_from_file(bad, read_manifest(small_set), "subject")
    only_test = _write_split(tmp_path / "t.csv", {s: "test" for s in _subjects(small_set)})
    with pytest.raises(SplitError, match="no training subjects"):
        folds_from_file(only_test, read_manifest(small_set), "subject")


def test_folds_column_and_left_out_subjects(tmp_path: Path, small_set: Path) -> None:
    subjects = _subjects(small_set)
    path = tmp_path / "folds.csv"
    path.write_text("subject,role,fold\n"
                    + "".join(f"{s},train,0\n" for s in subjects[:4])
                    + f"{subjects[4]},val,0\n"
                    + "".join(f"{s},{'test' if s == subjects[0] else 'train'},1\n"
                              for s in subjects))
    f0, f1 = folds_from_file(path, read_manifest(small_set), "subject")
    assert (f0.fold, f1.fold) == (0, 1)
    assert set(f0.train) == set(subjects[:4]) and f0.validation == (subjects[4],)
    assert subjects[5] not in f0.train + f0.validation + f0.test  # not named: left out
    assert f1.test == (subjects[0],) and f1.validation == ()


def test_all_subjects_in_train_then_int8_export_reads_the_recorded_split(
        small_set: Path, tmp_path: Path) -> None:
    subjects = _subjects(small_set)
    split = _write_split(tmp_path / "split.csv", {s: "train" for s in subjects})
    out = tmp_path / "runs"
    output = _train(small_set, split, out, tmp_path / "cache")
    run = out / "recognition" / "UP-ResNet18" / "fold-0"
    result = json.loads((run / "result.json").read_text())
    assert result["validation"] is None and result["test"] is None
    assert result["best_epoch"] == 1  # no validation set: the last epoch is kept
    assert result["selection"]["rule"] == "no validation set: last epoch"
    recorded = json.loads((run / "split.json").read_text())
    assert sorted(recorded["train"]) == subjects and recorded["test"] == []
    assert "validation accuracy n/a (no validation set: last epoch kept)" in output

    split.unlink()  # export must read the run's split.json, not rebuild it
    model = tmp_path / "model.pt"
    exported = CliRunner().invoke(app, ["train", "export", str(run), "--out", str(model),
                                        "--int8", "--int8-min-agreement", "0"])
    assert exported.exit_code == 0, exported.output
    loaded = load_checkpoint(model, task="recognition")
    assert loaded.int8 is not None
    report = loaded.int8.report
    n_train = result["data"]["train"]["slices"]
    assert report.evaluation_slices == n_train
    assert "no held-out set" in report.evaluation_source
    assert loaded.meta.training_data["test_overall_accuracy"] is None

    # the report of such a root: no test tables, but the per-epoch table
    evaluated = CliRunner().invoke(app, ["train", "evaluate", str(out), "--config", "smoke"])
    assert evaluated.exit_code == 0, evaluated.output
    readme = (out / "report" / "README.md").read_text()
    assert "no run has a test set" in readme
    assert "| 1 |" in (out / "report" / "epochs.md").read_text()


def test_split_file_with_an_external_test_subject(small_set: Path, tmp_path: Path) -> None:
    subjects = _subjects(small_set)
    external = [s for s in subjects if s.endswith("002")]  # one subject of each class
    roles = {s: ("test" if s in external else "train") for s in subjects}
    split = _write_split(tmp_path / "split.csv", roles)
    out = tmp_path / "runs"
    _train(small_set, split, out, tmp_path / "cache")
    run = out / "recognition" / "UP-ResNet18" / "fold-0"
    result = json.loads((run / "result.json").read_text())
    assert result["validation"] is None
    assert result["test"]["n"] == result["data"]["test"]["slices"] > 0
    assert result["data"]["test"]["subjects"] == len(external)
    with (run / "predictions-test-studies.csv").open() as fh:
        tested = {r["subject"] for r in csv.DictReader(fh)}
    assert tested == set(external)
    assert str(split.absolute()) in (run / "config.toml").read_text()



def test_reproduce_with_a_split_file_runs_its_folds(small_set: Path, tmp_path: Path) -> None:
    """The config asks for folds 0 and 1; the file has one fold: that one is run."""
    text = (Path(__file__).parents[2] / "model_train" / "configs" / "smoke.toml").read_text()
    head, sep, tail = text.partition("[manifestation]")
    config = tmp_path / "one.toml"
    config.write_text(head.replace('networks = ["UP-ResNet18", "UP-ResNet50"]',
                                   'networks = ["UP-ResNet18"]')
                      + sep + tail.replace("enabled = true", "enabled = false"))
    subjects = _subjects(small_set)
    split = _write_split(tmp_path / "split.csv", {s: ("test" if s.endswith("001") else "train")
                                                  for s in subjects})
    out = tmp_path / "grid"
    result = CliRunner().invoke(app, [
        "train", "reproduce", str(config), "--manifest", str(small_set), "--cache-dir",
        str(tmp_path / "cache"), "--split-file", str(split), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "trained 1 runs" in result.output
    assert "--split-file" in (out / "report" / "command.txt").read_text()
    assert (out / "report" / "table5.md").is_file()
    assert not (out / "recognition" / "UP-ResNet18" / "fold-1").exists()

@pytest.mark.slow
def test_real_covid_ct_md_subjects_by_split_file(shared_data: Path, tmp_path: Path) -> None:
    """The three real COVID-CT-MD subjects (every 6th slice, to stay fast): two train, the
    third named as test; then int8 export from the run folder and an external evaluation
    of the exported model on the third subject's slices."""
    rows = import_dicom_table(shared_data / "covid-ct-md")
    subjects = sorted({r.subject for r in rows})
    assert len(subjects) == 3
    manifest = tmp_path / "ct-md.csv"
    write_manifest(tuple(r for i, r in enumerate(rows) if i % 6 == 0), manifest)
    held = next(r.subject for r in rows if r.label == "normal")
    split = _write_split(tmp_path / "split.csv",
                         {s: ("test" if s == held else "train") for s in subjects})
    out = tmp_path / "runs"
    _train(manifest, split, out, tmp_path / "cache")
    run = out / "recognition" / "UP-ResNet18" / "fold-0"
    result = json.loads((run / "result.json").read_text())
    assert result["data"]["test"]["subjects"] == 1 and result["validation"] is None
    model = tmp_path / "model.pt"
    exported = CliRunner().invoke(app, ["train", "export", str(run), "--out", str(model),
                                        "--int8", "--int8-min-agreement", "0"])
    assert exported.exit_code == 0, exported.output
    loaded = load_checkpoint(model, task="recognition")
    assert loaded.int8 is not None
    assert loaded.int8.report.evaluation_slices == result["data"]["test"]["slices"]
    evaluated = CliRunner().invoke(app, [
        "train", "evaluate", str(model), "--manifest", str(manifest), "--out",
        str(tmp_path / "ext"), "--cache-dir", str(tmp_path / "cache"), "--split-file",
        str(split), "--precision", "int8"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "1 studies" in evaluated.output
    assert (tmp_path / "ext" / "report" / "table5.md").is_file()
