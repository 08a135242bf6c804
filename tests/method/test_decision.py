"""The study decision rule at and around its threshold."""

from __future__ import annotations

import numpy as np
import pytest

from ctdx.model_train.method.decision import (
    NoAnalysedSlicesError,
    decide_study,
    summarise_manifestations,
)

COVID, OTHER, NORMAL = np.eye(3)


def _study(n_covid: int, n_other: int, n_normal: int) -> np.ndarray:
    return np.array([COVID] * n_covid + [OTHER] * n_other + [NORMAL] * n_normal)


def test_covid_when_share_above_threshold() -> None:
    d = decide_study(_study(2, 10, 18), threshold=0.05)  # 6.7 % COVID
    assert d.decision == "covid19"
    assert d.counts == {"covid19": 2, "other_pneumonia": 10, "normal": 18}
    assert d.fractions["covid19"] == pytest.approx(2 / 30)
    assert d.n_slices == 30 and d.threshold == 0.05


def test_exactly_at_threshold_does_not_count() -> None:
    d = decide_study(_study(1, 0, 19), threshold=0.05)  # exactly 5 %
    assert d.fractions["covid19"] == 0.05
    assert d.decision == "normal"
    assert decide_study(_study(1, 0, 18), threshold=0.05).decision == "covid19"  # 5.3 %


def test_other_pneumonia_uses_the_same_rule() -> None:
    assert decide_study(_study(1, 2, 17), threshold=0.05).decision == "other_pneumonia"
    assert decide_study(_study(1, 1, 18), threshold=0.05).decision == "normal"  # both at 5 %


def test_covid_wins_over_a_larger_other_pneumonia_share() -> None:
    assert decide_study(_study(3, 30, 7), threshold=0.05).decision == "covid19"


def test_threshold_zero_means_any_slice() -> None:
    assert decide_study(_study(1, 0, 99), threshold=0.0).decision == "covid19"
    assert decide_study(_study(0, 0, 5), threshold=0.0).decision == "normal"


def test_slice_calls_use_argmax_with_ties_to_covid() -> None:
    probs = np.array([[0.4, 0.4, 0.2], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    d = decide_study(probs, threshold=0.3)
    assert d.counts == {"covid19": 1, "other_pneumonia": 1, "normal": 1}
    assert d.decision == "covid19"


def test_zero_slices_is_a_domain_error() -> None:
    with pytest.raises(NoAnalysedSlicesError):
        decide_study(np.zeros((0, 3)))


@pytest.mark.parametrize(
    "probs, threshold, message",
    [
        (np.zeros((4, 2)), 0.05, r"\(N, 3\)"),
        (np.full((2, 3), np.nan), 0.05, "non-finite"),
        (np.eye(3), 1.5, "threshold"),
    ],
)
def test_bad_inputs(probs: np.ndarray, threshold: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide_study(probs, threshold)


def test_manifestation_counts() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    assert summarise_manifestations(probs) == {
        "ground_glass_opacity": 2, "consolidation": 1, "fibrotic_streaks": 0,
    }
    assert summarise_manifestations(np.zeros((0, 3))) == {
        "ground_glass_opacity": 0, "consolidation": 0, "fibrotic_streaks": 0,
    }
