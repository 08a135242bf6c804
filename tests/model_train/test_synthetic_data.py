"""`ctdx train synthetic-data`: labelled data to try `ctdx train` with, in the layouts the
importers read, with manifests the training commands accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.model_train.manifest import read_manifest


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ctdx.model_train.cli._configure_logging", lambda: None)


def test_writes_both_sets_and_their_manifests(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "synthetic"
    result = CliRunner().invoke(app, ["train", "synthetic-data", "--out", str(out),
                                      "--subjects-per-class", "3", "--slices", "6",
                                      "--size", "64", "--manifestation-per-class", "3"])
    assert result.exit_code == 0, result.output
    rec = read_manifest(out / "recognition.csv")
    man = read_manifest(out / "manifestation.csv")
    summary = rec.summary()
    assert summary["subjects"] == 9
    assert set(summary["rows_per_class"]) == {"covid19", "other_pneumonia", "normal"}
    assert man.summary()["rows"] == 9
    assert {str(r.manifestation) for r in man.rows} == {
        "ground_glass_opacity", "consolidation", "fibrotic_streaks"}
    assert all(r.path.is_file() for r in (*rec.rows, *man.rows))
    assert (f"{out / 'recognition.csv'}: {len(rec.rows)} slices of 9 phantom subjects"
            in result.output)
    assert "ctdx train reproduce smoke --manifest" in result.output


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text("x\n")
    result = CliRunner().invoke(app, ["train", "synthetic-data", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not empty" in result.output
