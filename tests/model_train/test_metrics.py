"""Metric functions against hand-computed confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctdx.model_train.metrics import (
    StudyPredictions,
    class_metrics,
    confusion,
    format_mean_sd,
    group_by_study,
    mean_sd,
    paired_p_value,
    roc_per_class,
    study_metrics,
    threshold_curve,
)

CLASSES = ("covid19", "other_pneumonia", "normal")


def test_confusion_counts_true_rows_predicted_columns() -> None:
    cm = confusion([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 2, 2, 2, 2, 0], 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    with pytest.raises(ValueError):
        confusion([0, 3], [0, 0], 3)


def test_class_metrics_by_hand() -> None:
    # true rows, predicted columns; N = 100
    cm = np.array([[40, 5, 5],
                   [2, 26, 2],
                   [1, 1, 18]])
    m = class_metrics(cm)
    # covid19: tp 40, fn 10, fp 3, tn 47
    assert m.sensitivity[0] == pytest.approx(40 / 50)
    assert m.specificity[0] == pytest.approx(47 / 50)
    assert m.accuracy[0] == pytest.approx(87 / 100)
    # other pneumonia: tp 26, fn 4, fp 6, tn 64
    assert m.sensitivity[1] == pytest.approx(26 / 30)
    assert m.specificity[1] == pytest.approx(64 / 70)
    assert m.accuracy[1] == pytest.approx(90 / 100)
    # normal: tp 18, fn 2, fp 7, tn 73
    assert m.sensitivity[2] == pytest.approx(18 / 20)
    assert m.specificity[2] == pytest.approx(73 / 80)
    assert m.overall_accuracy == pytest.approx(84 / 100)
    assert m.n == 100


def test_absent_class_has_undefined_sensitivity() -> None:
    m = class_metrics([[3, 1, 0], [0, 0, 0], [0, 0, 2]])
    assert math.isnan(m.sensitivity[1])
    assert m.specificity[1] == pytest.approx(5 / 6)


def test_roc_auc_per_class() -> None:
    y = [0, 0, 1, 1, 2, 2]
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1],
                      [0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.1, 0.1, 0.8]])
    curves = roc_per_class(y, probs)
    # class 0 scores: positives 0.9, 0.6; negatives 0.7, 0.1, 0.2, 0.1 -> 7 of 8 pairs ordered
    assert curves[0].auc == pytest.approx(7 / 8)
    # class 1: positives 0.2, 0.8; negatives 0.05, 0.3, 0.1, 0.1 -> 7 of 8
    assert curves[1].auc == pytest.approx(7 / 8)
    assert curves[2].auc == pytest.approx(1.0)
    assert curves[0].fpr[0] == 0.0 and curves[0].tpr[-1] == 1.0
    assert math.isnan(roc_per_class([0, 0], np.array([[0.5, 0.5, 0.0]] * 2))[0].auc)


def test_mean_sd_and_paired_t_test() -> None:
    m, s = mean_sd([0.9, 0.92, 0.94])
    assert m == pytest.approx(0.92)
    assert s == pytest.approx(0.02)  # sample sd
    assert format_mean_sd([0.9, 0.92, 0.94]) == "92.00 (2.00)"
    a = [0.90, 0.92, 0.91, 0.93, 0.95]
    b = [0.88, 0.91, 0.88, 0.90, 0.94]
    # d = [.02,.01,.03,.03,.01]: mean .02, sd .01, t = .02 / (.01/sqrt(5)) = 4.4721, df 4
    assert paired_p_value(a, b) == pytest.approx(0.01106, abs=2e-5)
    assert paired_p_value(a, a) == 1.0
    assert math.isnan(paired_p_value([0.9], [0.8]))


def _study(name: str, label: str, covid: int, other: int, normal: int) -> StudyPredictions:
    rows = [[0.9, 0.05, 0.05]] * covid + [[0.05, 0.9, 0.05]] * other + [[0.05, 0.05, 0.9]] * normal
    return StudyPredictions(name, label, np.array(rows, dtype=np.float32))


def _share_rule(probs: np.ndarray, threshold: float) -> str:
    """Hand-written reference of the share rule for this test (COVID first, then pneumonia)."""
    calls = probs.argmax(axis=1)
    if (calls == 0).mean() > threshold:
        return "covid19"
    if (calls == 1).mean() > threshold:
        return "other_pneumonia"
    return "normal"


def test_study_metrics_by_hand() -> None:
    studies = [
        _study("a", "covid19", 10, 0, 90),   # 10% covid -> covid at 5%
        _study("b", "covid19", 3, 0, 97),    # 3% -> missed at 5%
        _study("c", "other_pneumonia", 0, 40, 60),
        _study("d", "other_pneumonia", 8, 40, 52),  # 8% covid -> false positive
        _study("e", "normal", 0, 0, 100),
        _study("f", "normal", 0, 2, 98),
    ]
    m = study_metrics(studies, 0.05, CLASSES, decide=_share_rule)
    assert m.confusion.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert m.sensitivity == pytest.approx(1 / 2)
    assert m.specificity == pytest.approx(3 / 4)
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.overall_accuracy == pytest.approx(4 / 6)
    curve = threshold_curve(studies, [0.0, 0.05, 0.2], CLASSES, decide=_share_rule)
    assert [c.sensitivity for c in curve] == [1.0, 0.5, 0.0]


def test_group_by_study() -> None:
    probs = np.eye(3, dtype=np.float32)[[0, 2, 2, 1]]
    groups = group_by_study(["s1", "s2", "s1", "s3"], ["covid19", "normal", "covid19", "normal"],
                            probs)
    assert [g.study for g in groups] == ["s1", "s2", "s3"]
    assert groups[0].probs.shape == (2, 3)
    with pytest.raises(ValueError):
        group_by_study(["s1", "s1"], ["covid19", "normal"], probs[:2])
