"""Importers on the real shared data (skipped where absent) and on generated layouts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctdx.model_train.importers.common import DataImportError, parse_class_map
from ctdx.model_train.importers.dicom_table import import_dicom_table, import_dicom_tree
from ctdx.model_train.importers.image_folders import import_image_folders
from ctdx.model_train.importers.medseg import dominant_manifestation, import_medseg
from ctdx.model_train.phantom import write_phantom_series


def test_covid_ct_md_table(shared_data: Path) -> None:
    rows = import_dicom_table(shared_data / "covid-ct-md")
    assert len(rows) == 470
    assert Counter(r.label for r in rows) == {"covid19": 148, "other_pneumonia": 168,
                                              "normal": 154}
    assert Counter((r.label, r.slice_label) for r in rows) == {
        ("covid19", True): 80, ("covid19", False): 68,
        ("other_pneumonia", True): 86, ("other_pneumonia", False): 82,
        ("normal", None): 154,
    }
    # one study per subject, identified by its StudyInstanceUID
    assert {r.subject: r.study for r in rows}["P001"] == (
        "1.3.12.2.1107.5.1.4.93005.30000020030507283104800000079")
    assert len({r.study for r in rows}) == 3


def test_medseg_layout(shared_data: Path) -> None:
    rows = import_medseg(shared_data / "medseg-covid19-ggo-consolidation")
    assert len(rows) == 50
    assert Counter(r.manifestation for r in rows) == {"ground_glass_opacity": 36,
                                                      "consolidation": 14}
    assert all(r.rotate == 90 and r.cropped and r.label == "covid19" for r in rows)
    assert len({r.subject for r in rows}) == 50  # no patient ids: one subject per image


def test_dominant_manifestation() -> None:
    assert dominant_manifestation(10, 5) == "ground_glass_opacity"
    assert dominant_manifestation(5, 10) == "consolidation"
    assert dominant_manifestation(5, 5) == "ground_glass_opacity"
    assert dominant_manifestation(1, 2, 3) == "fibrotic_streaks"
    assert dominant_manifestation(0, 0) is None


def test_medseg_counts_from_masks_without_table(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, (ggo, cons) in enumerate([(30, 5), (2, 40), (0, 0)]):
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        mask = np.zeros(100, np.uint8)
        mask[:ggo] = 1
        mask[ggo : ggo + cons] = 2
        Image.fromarray(mask.reshape(10, 10)).save(tmp_path / "masks" / f"{i}.png")
    rows = import_medseg(tmp_path)
    assert [r.manifestation for r in rows] == ["ground_glass_opacity", "consolidation"]


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)


def test_image_folders_cc_ccii_and_flat_layouts(tmp_path: Path) -> None:
    _png(tmp_path / "NCP" / "p1" / "scan1" / "0001.png")
    _png(tmp_path / "NCP" / "p1" / "scan2" / "0001.png")
    _png(tmp_path / "CP" / "p2" / "scanA" / "0001.png")
    _png(tmp_path / "Normal" / "p3" / "0001.png")
    _png(tmp_path / "CT_NonCOVID" / "x.png")
    _png(tmp_path / "Unknown" / "y.png")
    rows = import_image_folders(tmp_path, parse_class_map(["CT_NonCOVID=normal"]))
    got = {(r.label, r.subject, r.study) for r in rows}
    assert got == {
        ("covid19", "p1", "p1/scan1"), ("covid19", "p1", "p1/scan2"),
        ("other_pneumonia", "p2", "p2/scanA"), ("normal", "p3", "p3"),
        ("normal", "CT_NonCOVID/x", "CT_NonCOVID/x"),
    }
    assert all(r.window == (-600.0, 1500.0) for r in rows)
    with pytest.raises(DataImportError, match="not one of"):
        parse_class_map(["X=flu"])


def test_dicom_tree(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "COVID-19" / "s1" / "series", "covid19", n_slices=3,
                                 size=32, seed=1)
    write_phantom_series(tmp_path / "Normal" / "s2", "normal", n_slices=2, size=32, seed=2)
    rows = import_dicom_tree(tmp_path)
    assert [(r.subject, r.label, r.is_series) for r in rows] == [
        ("s1", "covid19", True), ("s2", "normal", True)]
    assert rows[0].study == study.study_instance_uid
    assert rows[0].series == study.series_instance_uid


def test_dicom_table_rejects_unknown_class(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "x", "normal", n_slices=1, size=32, seed=1)
    (tmp_path / "slice_labels.csv").write_text(
        f"subject,class,file,infection\ns,Influenza,{study.paths[0].relative_to(tmp_path)},\n")
    with pytest.raises(DataImportError, match="Influenza"):
        import_dicom_table(tmp_path)


def test_import_command_writes_a_readable_manifest(shared_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ctdx.cli import app
    from ctdx.model_train.manifest import read_manifest

    monkeypatch.setattr("ctdx.model_train.cli._configure_logging", lambda: None)
    out = tmp_path / "medseg.csv"
    result = CliRunner().invoke(app, ["train", "import", "medseg",
                                      str(shared_data / "medseg-covid19-ggo-consolidation"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "50 rows, 50 subjects" in result.output
    manifest = read_manifest(out)
    assert manifest.summary()["rows_per_manifestation"] == {
        "ground_glass_opacity": 36, "consolidation": 14, "fibrotic_streaks": 0}
