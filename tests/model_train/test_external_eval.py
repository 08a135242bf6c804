"""``ctdx train evaluate MODEL --manifest EXTERNAL.csv --out DIR`` on a set the model never saw.

A one-epoch ResNet18 trained on six synthetic phantom subjects (all in train, by a split
file), exported, then evaluated on six other phantom subjects (another seed): the
paper's tables for that set, from the exported checkpoint.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.model_train.importers.dicom_table import import_dicom_table
from ctdx.model_train.manifest import apply_slice_policy, read_manifest, write_manifest
from ctdx.model_train.method.checkpoint import read_checkpoint_meta
from ctdx.model_train.synthetic import write_recognition_set


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ctdx.model_train.cli._configure_logging", lambda: None)


def _manifest(root: Path, seed: int) -> Path:
    table = write_recognition_set(root / f"set-{seed}", subjects_per_class=2, n_slices=6,
                                  size=64, seed=seed)
    write_manifest(import_dicom_table(table), root / f"set-{seed}.csv")
    return root / f"set-{seed}.csv"


def test_evaluate_an_exported_model_on_an_external_manifest(tmp_path: Path) -> None:
    train_set, external = _manifest(tmp_path, 0), _manifest(tmp_path, 1)
    split = tmp_path / "split.csv"
    split.write_text("subject,role\n" + "".join(
        f"{s},train\n" for s in sorted({r.subject for r in read_manifest(train_set).rows})))
    cache = tmp_path / "cache"
    runner = CliRunner()
    trained = runner.invoke(app, [
        "train", "train", "smoke", "--manifest", str(train_set), "--network", "UP-ResNet18",
        "--cache-dir", str(cache), "--split-file", str(split), "--out", str(tmp_path / "runs")])
    assert trained.exit_code == 0, trained.output
    model = tmp_path / "model.pt"
    exported = runner.invoke(app, ["train", "export",
                                   str(tmp_path / "runs" / "recognition" / "UP-ResNet18" /
                                       "fold-0"), "--out", str(model)])
    assert exported.exit_code == 0, exported.output
    meta = read_checkpoint_meta(model)
    assert meta.training_data["slice_policy"] == "lesion_only"

    out = tmp_path / "external"
    result = runner.invoke(app, ["train", "evaluate", str(model), "--manifest", str(external),
                                 "--out", str(out), "--cache-dir", str(cache),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = out / "report"
    for name in ("table1", "table2", "table5", "auc"):
        assert (report / f"{name}.md").is_file(), name
    for name in ("fig4-roc.png", "fig6-threshold.png", "fig7-confusion.png"):
        with Image.open(report / name) as img:
            assert img.size[0] > 200
    run = out / "recognition" / "UP-ResNet18" / "fold-0"
    res = json.loads((run / "result.json").read_text())
    assert res["external"]["model_uid"] == meta.model_uid
    # slice level: the external set under the model's slice policy; study level: every slice
    policy_rows = apply_slice_policy(read_manifest(external), "lesion_only").rows
    assert 0 < res["test"]["n"] <= len(policy_rows)
    with (run / "predictions-test-studies.csv").open() as fh:
        studies = {r["study"] for r in csv.DictReader(fh)}
    assert studies == {r.study for r in read_manifest(external).rows}
    table5 = (report / "table5.md").read_text()
    assert f"(n = {len(studies)})" in table5
    assert "ctdx train evaluate" in (report / "README.md").read_text()

    # --split-file: only its test subjects
    one = sorted({r.subject for r in read_manifest(external).rows})[0]
    only = tmp_path / "only.csv"
    only.write_text(f"subject,role\n{one},test\n")
    out2 = tmp_path / "external-one"
    result = runner.invoke(app, ["train", "evaluate", str(model), "--manifest", str(external),
                                 "--out", str(out2), "--cache-dir", str(cache),
                                 "--split-file", str(only)])
    assert result.exit_code == 0, result.output
    res2 = json.loads((out2 / "recognition" / "UP-ResNet18" / "fold-0" / "result.json")
                      .read_text())
    assert res2["data"]["test"]["subjects"] == 1

    # a model file without --manifest is a clear error
    missing = runner.invoke(app, ["train", "evaluate", str(model)])
    assert missing.exit_code == 2 and "--manifest" in missing.output
