"""Slice policies beyond the paper's: ``slice_labels`` keeps every slice with what it shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctdx.model_train.config import ConfigError, config_from_dict
from ctdx.model_train.importers.dicom_table import import_dicom_table
from ctdx.model_train.manifest import Manifest, apply_slice_policy
from ctdx.model_train.synthetic import write_recognition_set


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("policy")
    table = write_recognition_set(root, subjects_per_class=1, n_slices=8, size=64)
    return Manifest(import_dicom_table(table))


def test_slice_labels_relabels_lesion_free_pneumonia_slices_as_normal(manifest: Manifest) -> None:
    rows = manifest.rows
    lesion_free = [r for r in rows if r.label != "normal" and r.slice_label is False]
    assert lesion_free, "the synthetic set marks lesion-free slices of pneumonia subjects"
    relabelled = apply_slice_policy(manifest, "slice_labels")
    assert len(relabelled.rows) == len(rows)  # every slice kept
    for before, after in zip(rows, relabelled.rows, strict=True):
        if before.label != "normal" and before.slice_label is False:
            assert after.label == "normal"
        else:
            assert after == before
    # lesion_only drops exactly those slices; all keeps the study labels
    assert len(apply_slice_policy(manifest, "lesion_only").rows) == len(rows) - len(lesion_free)
    assert apply_slice_policy(manifest, "all") == manifest
    # stratification still sees each subject's study class
    assert relabelled.subject_class() == manifest.subject_class()


def test_the_config_selects_the_policy() -> None:
    cfg = config_from_dict({"data": {"slice_policy": "slice_labels"}}, Path("."))
    assert cfg.data.slice_policy == "slice_labels"
    with pytest.raises(ConfigError, match="slice_policy must be one of"):
        config_from_dict({"data": {"slice_policy": "lungs"}}, Path("."))
