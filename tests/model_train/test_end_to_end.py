"""One-epoch runs end to end on synthetic phantoms: every table and figure, resume, export.

Tiny data (21 phantom subjects of 8 slices at 64 px, 21 manifestation images), tiny
network input (32 px), ResNet18 only, one epoch, two folds: the point is the
plumbing, not the accuracy.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.model_train.config import Config, load_config, with_overrides
from ctdx.model_train.data import ensure_cached, load_task_data, study_manifest, task_folds
from ctdx.model_train.data import task_manifest as task_rows
from ctdx.model_train.export import choose_run
from ctdx.model_train.importers.dicom_table import import_dicom_table
from ctdx.model_train.importers.medseg import import_medseg
from ctdx.model_train.manifest import write_manifest
from ctdx.model_train.method.checkpoint import load_checkpoint
from ctdx.model_train.method.inference import SliceClassifier
from ctdx.model_train.method.preprocess import gray_from_uint8, to_network_input
from ctdx.model_train.synthetic import write_manifestation_set, write_recognition_set
from ctdx.model_train.train import RunSpec, load_train_checkpoint, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures logging on stderr, which the CLI runner swaps and closes."""
    monkeypatch.setattr("ctdx.model_train.cli._configure_logging", lambda: None)


@dataclass(frozen=True)
class SmokeData:
    recognition: Path
    manifestation: Path
    weights: Path
    cache: Path


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> SmokeData:
    root = tmp_path_factory.mktemp("smoke")
    table = write_recognition_set(root / "rec", subjects_per_class=7, n_slices=8, size=64)
    write_manifest(import_dicom_table(table), root / "recognition.csv")
    write_manifestation_set(root / "man", per_class=7, size=64)
    write_manifest(import_medseg(root / "man"), root / "manifestation.csv")
    # stands in for torchvision's ImageNet file: same format, random values (no download)
    torch.save(resnet18(weights=None).state_dict(), root / "resnet18-imagenet.pth")
    return SmokeData(root / "recognition.csv", root / "manifestation.csv",
                     root / "resnet18-imagenet.pth", root / "cache")


#: The packaged smoke config is unpretrained only (no download); these tests compare a
#: pretrained network too, from the local stand-in weights file.
_SMOKE_NETWORKS = 'networks = ["UP-ResNet18", "UP-ResNet50"]'
_WITH_PRETRAINED = ("UP-ResNet18", "P-ResNet18")


def _config(d: SmokeData) -> Config:
    return with_overrides(
        load_config(Path("smoke")),
        data={"manifest": d.recognition, "manifestation_manifest": d.manifestation,
              "cache_dir": d.cache, "cache_workers": 1},
        recognition={"networks": _WITH_PRETRAINED},
        manifestation={"networks": _WITH_PRETRAINED},
        evaluation={"study_network": "P-ResNet18"},
        pretrained={"resnet18": d.weights},
    )


def _grid_config(tmp_path: Path) -> Path:
    """The packaged smoke config with one manifestation fold and a pretrained network, as a
    user's own file."""
    text = (Path(__file__).parents[2] / "model_train" / "configs" / "smoke.toml").read_text()
    assert text.count(_SMOKE_NETWORKS) == 2
    text = text.replace(_SMOKE_NETWORKS, f"networks = {list(_WITH_PRETRAINED)}".replace("'", '"'))
    text = text.replace('study_network = "UP-ResNet18"', 'study_network = "P-ResNet18"')
    head, sep, tail = text.partition("[manifestation]")
    path = tmp_path / "grid.toml"
    path.write_text(head + sep + tail.replace("folds = [0, 1]", "folds = [0]"))
    return path


def test_reproduce_writes_every_table_and_figure_and_exports(smoke_data: SmokeData,
                                                               tmp_path: Path) -> None:
    d = smoke_data
    out = tmp_path / "grid"
    args = ["train", "reproduce", str(_grid_config(tmp_path)), "--manifest", str(d.recognition),
            "--manifestation-manifest", str(d.manifestation), "--cache-dir", str(d.cache),
            "--out", str(out), "--pretrained", f"resnet18={d.weights}"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 6 runs, 0 already done" in result.output
    report = out / "report"
    for name in ("table1", "table2", "table3", "table4", "table5", "auc"):
        assert (report / f"{name}.md").is_file() and (report / f"{name}.csv").is_file()
    for name in ("fig4-roc.png", "fig6-threshold.png", "fig7-confusion.png"):
        with Image.open(report / name) as img:
            assert img.size[0] > 200
    with (report / "table2.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0][-1] == "P value (UP-ResNet18 vs P-ResNet18)"
    assert [r[1] for r in rows[1:]] == ["COVID-19", "other pneumonia", "normal", ""]
    table5 = (report / "table5.md").read_text()
    assert "P-ResNet18 (5% threshold)" in table5 and "Radiologists" in table5
    assert "ctdx train reproduce" in (report / "README.md").read_text()
    curve = list(csv.DictReader((report / "fig6-threshold.csv").open()))
    assert len(curve) == 51 and curve[0]["threshold"] == "0.0000"

    # everything is done: a second call trains nothing
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "trained 0 runs, 6 already done" in again.output

    # export -> the worker's loader, with the run's predictions reproduced exactly
    model_file = tmp_path / "model.pt"
    exported = runner.invoke(app, ["train", "export", str(out), "--out", str(model_file),
                                   "--network", "P-ResNet18", "--model-version", "0.1"])
    assert exported.exit_code == 0, exported.output
    loaded = load_checkpoint(model_file, task="recognition")
    meta = loaded.meta
    assert meta.arch == "resnet18" and meta.model_version == "0.1"
    assert meta.preprocess.size == 32
    assert meta.training_data["pretrained"] is True
    run = choose_run(out, "recognition", "P-ResNet18")
    assert str(run) in exported.output
    result_json = json.loads((run / "result.json").read_text())
    assert meta.training_data["fold"] == result_json["fold"]
    config = _config(d)
    split = task_folds(config, "recognition", task_rows(config, "recognition"))[
        result_json["fold"]]
    data = load_task_data(config, "recognition", split, task_rows(config, "recognition"),
                          config.preprocess_params(), study_manifest(config))
    classifier = SliceClassifier(loaded, device="cpu", precision="fp32")
    assert data.test_studies is not None
    x = to_network_input(gray_from_uint8(data.test_studies.gray, meta.preprocess),
                         meta.preprocess)
    probs = classifier.predict(x)
    with (run / "predictions-test-studies.csv").open() as fh:
        expected = np.array([[float(r["p_covid19"]), float(r["p_other_pneumonia"]),
                              float(r["p_normal"])] for r in csv.DictReader(fh)])
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    # --int8: calibrated on the run's training slices, checked on its held-out slices
    q_file = tmp_path / "model-int8.pt"
    q_export = runner.invoke(app, ["train", "export", str(out), "--out", str(q_file),
                                   "--network", "P-ResNet18", "--int8",
                                   "--int8-min-agreement", "0"])
    assert q_export.exit_code == 0, q_export.output
    q_loaded = load_checkpoint(q_file, task="recognition")
    assert q_loaded.int8 is not None
    q_report = q_loaded.int8.report
    held_out = len(data.validation) + len(data.test)
    assert q_report.evaluation_slices == held_out
    assert f"fold {result_json['fold']}" in q_report.calibration_source
    assert q_report.calibration_slices == min(len(data.train), 256)
    served = SliceClassifier(q_loaded, device="cpu", precision="auto")
    assert served.precision == "int8"
    held_x = to_network_input(gray_from_uint8(
        torch.cat([data.validation.gray, data.test.gray]), meta.preprocess), meta.preprocess)
    same = (served.predict(held_x).argmax(1) == classifier.predict(held_x).argmax(1)).mean()
    # auto serves the faster int8 runtime here (ONNX Runtime's where installed): its own report
    assert served.int8_report is not None
    assert float(same) == pytest.approx(served.int8_report.argmax_agreement, abs=1e-6)
    if q_loaded.onnx_int8 is not None:  # same slices, same gate
        assert q_loaded.onnx_int8.report.evaluation_slices == held_out
        assert q_loaded.onnx_int8.report.calibration_slices == q_report.calibration_slices
    # a second export is a new model: new UID
    runner.invoke(app, ["train", "export", str(out), "--out", str(tmp_path / "m2.pt"),
                        "--network", "P-ResNet18"])
    assert load_checkpoint(tmp_path / "m2.pt", task="recognition").meta.model_uid != (
        meta.model_uid)


def test_resume_continues_as_if_never_stopped(smoke_data: SmokeData, tmp_path: Path) -> None:
    base = _config(smoke_data)
    rows = task_rows(base, "recognition")
    params = base.preprocess_params()
    ensure_cached(base, study_manifest(base), params)
    split = task_folds(base, "recognition", rows)[0]
    data = load_task_data(base, "recognition", split, rows, params)
    spec = RunSpec("recognition", base.recognition.network_specs()[0], 0)
    two = with_overrides(base, train={"epochs": 2})

    straight = run_training(two, spec, data, tmp_path / "straight")
    run_training(base, spec, data, tmp_path / "stopped")  # stops after epoch 0
    resumed = run_training(two, spec, data, tmp_path / "stopped", resume=True)
    assert resumed.epochs_run == straight.epochs_run == 2
    h1 = (tmp_path / "straight" / "history.csv").read_text().splitlines()
    h2 = (tmp_path / "stopped" / "history.csv").read_text().splitlines()
    for a, b in zip(h1, h2, strict=True):  # same losses and accuracies (timings differ)
        assert a.split(",")[:5] == b.split(",")[:5]
    w1 = load_train_checkpoint(tmp_path / "straight" / "checkpoint-last.pt")["model"]
    w2 = load_train_checkpoint(tmp_path / "stopped" / "checkpoint-last.pt")["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k])


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # a wide terminal: the error box elides long lines
    (tmp_path / "m.csv").write_text("subject,study,path\n")
    result = CliRunner().invoke(app, ["train", "reproduce", "smoke", "--manifest",
                                      str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "missing column(s) class" in result.output
    assert "Traceback" not in result.output
