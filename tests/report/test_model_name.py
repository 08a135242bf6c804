"""Manufacturer's Model Name (LO, at most 64 characters) is shortened at a word, and the
demonstration model's names fit whole (issue 16: it was cut inside a phrase)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine

from ctdx.model_train.demo_model import MANIFESTATION_NAME, RECOGNITION_NAME
from tests.report.conftest import add_analysis
from tests.report.test_sr import build

OLD_DEMO_NAME = ("ctdx demo ResNet50 recognition (synthetic demonstration model - not for "
                 "clinical use)")


def test_a_long_model_name_is_shortened_at_a_word(report_engine: Engine, data_dir: Path
                                                  ) -> None:
    study = add_analysis(report_engine, data_dir, model_name=OLD_DEMO_NAME)
    ds = pydicom.dcmread(build(report_engine, data_dir, study.analysis_id)["sr"])
    shown = str(ds.ManufacturerModelName)
    assert len(shown) <= 64
    assert shown.endswith("...")
    kept = shown.removesuffix("...").rstrip()
    assert OLD_DEMO_NAME.startswith(kept)
    assert OLD_DEMO_NAME[len(kept)] == " "  # the cut is between words


@pytest.mark.parametrize("name", [RECOGNITION_NAME, MANIFESTATION_NAME])
def test_the_demo_model_names_fit_whole(report_engine: Engine, data_dir: Path, name: str
                                        ) -> None:
    assert len(name) <= 64
    study = add_analysis(report_engine, data_dir, model_name=name)
    ds = pydicom.dcmread(build(report_engine, data_dir, study.analysis_id)["sr"])
    assert ds.ManufacturerModelName == name
