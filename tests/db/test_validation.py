"""db.validation against scikit-learn and scipy on the same arrays (Hypothesis generates them)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from ctdx.db import validation as v

# studies: truth (COVID-19 or not) and the share of slices called COVID-19, as k/n of a series
studies = st.lists(
    st.tuples(st.booleans(), st.integers(0, 40), st.integers(1, 40)).map(
        lambda t: (t[0], min(t[1], t[2]) / t[2])),
    min_size=2, max_size=60,
)


def _arrays(cases: list[tuple[bool, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([c[0] for c in cases]), np.array([c[1] for c in cases])


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_is_scipys_interval(kn: tuple[int, int]) -> None:
    k, n = kn
    p = v.wilson(k, n)
    if n == 0:
        assert p.value is None and p.low is None
        return
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (p.low, p.high) == (ci.low, ci.high)
    assert p.value == k / n and p.low <= p.value <= p.high


def test_wilson_width_for_100_positives() -> None:
    """The docs' example: 95 of 100 detected gives an interval about 11 points wide."""
    p = v.wilson(95, 100)
    assert p.low == pytest.approx(0.8883, abs=1e-4) and p.high == pytest.approx(0.9785, abs=1e-4)


@given(studies, st.floats(0.0, 1.0))
def test_table_at_matches_sklearn_confusion_matrix(cases: list[tuple[bool, float]],
                                                   threshold: float) -> None:
    truth, scores = _arrays(cases)
    t = v.table_at(truth, scores, threshold)
    tn, fp, fn, tp = confusion_matrix(truth, scores > threshold, labels=[False, True]).ravel()
    assert (t.tp, t.fn, t.fp, t.tn) == (tp, fn, fp, tn)


@settings(max_examples=60, deadline=None)
@given(studies, st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]))
def test_threshold_for_sensitivity_is_the_most_specific_roc_point(
    cases: list[tuple[bool, float]], target: float
) -> None:
    truth, scores = _arrays(cases)
    t = v.threshold_for_sensitivity(truth, scores, target)
    if not truth.any():
        assert t is None
        return
    positives = scores[truth]
    if np.mean(positives > 0.0) < target - 1e-12:
        assert t is None  # positives with no COVID-19 slice cannot be reached by "share > t"
        return
    assert t is not None and 0.0 <= t < 1.0
    table = v.table_at(truth, scores, t)
    assert table.sensitivity.value is not None and table.sensitivity.value >= target - 1e-12
    # any larger observed share as threshold misses the target
    for higher in np.unique(scores[scores > t]):
        if higher < 1.0:
            assert np.mean(positives > higher) < target
    if (~truth).any():
        # it is scikit-learn's ROC point of minimal false-positive rate reaching the target
        fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
        reaching = fpr[tpr >= target - 1e-12]
        lowest = reaching.min()
        spec = table.specificity.value
        assert spec is not None
        assert 1.0 - spec == pytest.approx(lowest)


@settings(max_examples=40, deadline=None)
@given(studies)
def test_roc_and_auc_are_sklearns(cases: list[tuple[bool, float]]) -> None:
    truth, scores = _arrays(cases)
    curve = v.roc(truth, scores, samples=200)
    if truth.all() or not truth.any():
        assert curve.auc is None
        return
    fpr, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_array_equal(curve.fpr, fpr)
    np.testing.assert_array_equal(curve.tpr, tpr)
    assert curve.auc == roc_auc_score(truth, scores)
    assert curve.auc_low is not None and curve.auc_high is not None
    assert 0.0 <= curve.auc_low <= curve.auc_high <= 1.0


def test_bootstrap_is_seeded_and_brackets_the_auc() -> None:
    rng = np.random.default_rng(7)
    truth = rng.random(120) < 0.4
    scores = np.clip(rng.normal(0.25 * truth + 0.1, 0.1), 0, 1)
    first = v.bootstrap_auc(truth, scores)
    assert first == v.bootstrap_auc(truth, scores)  # same seed, same interval
    assert first is not None
    auc = roc_auc_score(truth, scores)
    assert first[0] < auc < first[1]
    assert v.bootstrap_auc(truth, scores, seed=1) != first


def test_confusion_3x3_rows_are_truth() -> None:
    truth = ["covid19", "covid19", "normal", "other_pneumonia", "normal"]
    calls = ["covid19", "normal", "normal", "covid19", "other_pneumonia"]
    m = v.confusion_3x3(truth, calls)
    np.testing.assert_array_equal(m, confusion_matrix(truth, calls, labels=list(v.CLASSES)))
    assert m[0].tolist() == [1, 0, 1] and v.accuracy_3class(m).k == 2


def test_drift_p_value_is_the_binomial_test() -> None:
    assert v.drift_p_value(30, 50, 0.2) == binomtest(30, 50, 0.2).pvalue
    assert v.drift_p_value(10, 50, 0.2) == pytest.approx(1.0)
    assert v.drift_p_value(0, 0, 0.2) is None
