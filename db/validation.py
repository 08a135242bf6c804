"""Local validation of the study call: metrics on arrays, no database, no files.

The study call (``ctdx.model_train.method.decision``) is COVID-19 when the share of
analysed slices called COVID-19 is **strictly above** a threshold; that share
is the study's score here. Every number comes from scipy / scikit-learn:

- proportions (sensitivity, specificity, accuracy) with Wilson 95% intervals
  (``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``): unlike the
  normal approximation, sensible at 0 or n successes and for small n;
- the ROC curve and AUC (``sklearn.metrics.roc_curve`` / ``roc_auc_score``)
  with a percentile bootstrap 95% interval over studies (seeded, so a rerun
  gives the same interval);
- the operating threshold for a target sensitivity: the largest threshold
  ``t`` (with "share > t") whose sensitivity on the validation set still
  reaches the target. ``t`` is an observed share (or 0), so it is exactly a
  point of scikit-learn's ROC curve (its thresholds use ">=", the next share
  up); every threshold from ``t`` up to the next observed share classifies
  the validation set the same way, and ``t`` is the most sensitive of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

#: The study calls and true classes, in the order of the 3x3 matrix (as the method lists them).
CLASSES = ("covid19", "other_pneumonia", "normal")
POSITIVE = "covid19"
PAPER_THRESHOLD = 0.05  # Chen et al. 2021: COVID-19 when more than 5% of slices are
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20210231  # fixed: the same data give the same interval


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` with its Wilson 95% interval; ``value`` is None when ``n`` is 0."""

    k: int
    n: int
    value: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "n": self.n, "value": self.value, "low": self.low,
                "high": self.high}


def wilson(k: int, n: int) -> Proportion:
    """``k/n`` with the Wilson score interval (scipy)."""
    if n == 0:
        return Proportion(k=0, n=0, value=None, low=None, high=None)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    ci = binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Proportion(k=k, n=n, value=k / n, low=float(ci.low), high=float(ci.high))


@dataclass(frozen=True)
class BinaryTable:
    """COVID-19 vs not COVID-19: truth in rows, call in columns."""

    tp: int
    fn: int
    fp: int
    tn: int

    @property
    def sensitivity(self) -> Proportion:
        return wilson(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Proportion:
        return wilson(self.tn, self.tn + self.fp)

    @property
    def accuracy(self) -> Proportion:
        return wilson(self.tp + self.tn, self.tp + self.fn + self.fp + self.tn)

    @property
    def positive_rate(self) -> float | None:
        """Share of studies called COVID-19 (the drift baseline)."""
        n = self.tp + self.fn + self.fp + self.tn
        return (self.tp + self.fp) / n if n else None

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "fn": self.fn, "fp": self.fp, "tn": self.tn}


def _bool(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr.astype(bool)


def _scores(values: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ValueError("scores must be a one-dimensional array of finite numbers")
    return arr


def binary_table(truth_positive: ArrayLike, called_positive: ArrayLike) -> BinaryTable:
    truth = _bool(truth_positive, "truth_positive")
    called = _bool(called_positive, "called_positive")
    if truth.shape != called.shape:
        raise ValueError("truth and calls differ in length")
    return BinaryTable(
        tp=int(np.sum(truth & called)),
        fn=int(np.sum(truth & ~called)),
        fp=int(np.sum(~truth & called)),
        tn=int(np.sum(~truth & ~called)),
    )


def table_at(truth_positive: ArrayLike, scores: ArrayLike, threshold: float) -> BinaryTable:
    """The 2x2 table when a study is called COVID-19 for ``score > threshold``."""
    return binary_table(truth_positive, _scores(scores) > threshold)


def confusion_3x3(truth: Sequence[str], calls: Sequence[str]) -> NDArray[np.int64]:
    """Counts with truth in rows and the study call in columns, in :data:`CLASSES` order."""
    return np.asarray(confusion_matrix(list(truth), list(calls), labels=list(CLASSES)),
                      dtype=np.int64)


def accuracy_3class(matrix: NDArray[np.int64]) -> Proportion:
    return wilson(int(np.trace(matrix)), int(matrix.sum()))


@dataclass(frozen=True)
class Roc:
    fpr: NDArray[np.float64]
    tpr: NDArray[np.float64]
    thresholds: NDArray[np.float64]  # scikit-learn's: called positive when score >= threshold
    auc: float | None  # None when one class is absent
    auc_low: float | None
    auc_high: float | None
    bootstrap_samples: int
    bootstrap_seed: int


def bootstrap_auc(
    truth_positive: ArrayLike, scores: ArrayLike, samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile 95% interval of the AUC over studies resampled with replacement.

    Resamples holding one class only have no AUC and are drawn again (they are
    not counted). None when either class is absent.
    """
    truth = _bool(truth_positive, "truth_positive")
    score = _scores(scores)
    if truth.all() or not truth.any():
        return None
    rng = np.random.default_rng(seed)
    n = truth.size
    values: list[float] = []
    while len(values) < samples:
        idx = rng.integers(0, n, size=n)
        t = truth[idx]
        if t.all() or not t.any():
            continue
        values.append(float(roc_auc_score(t, score[idx])))
    alpha = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return float(low), float(high)


def roc(truth_positive: ArrayLike, scores: ArrayLike, samples: int = BOOTSTRAP_SAMPLES,
        seed: int = BOOTSTRAP_SEED) -> Roc:
    truth = _bool(truth_positive, "truth_positive")
    score = _scores(scores)
    if truth.all() or not truth.any():
        empty = np.zeros(0)
        return Roc(empty, empty, empty, None, None, None, samples, seed)
    fpr, tpr, thresholds = roc_curve(truth, score, drop_intermediate=False)
    interval = bootstrap_auc(truth, score, samples, seed)
    assert interval is not None
    return Roc(
        fpr=np.asarray(fpr, dtype=np.float64), tpr=np.asarray(tpr, dtype=np.float64),
        thresholds=np.asarray(thresholds, dtype=np.float64),
        auc=float(roc_auc_score(truth, score)), auc_low=interval[0], auc_high=interval[1],
        bootstrap_samples=samples, bootstrap_seed=seed,
    )


def threshold_for_sensitivity(
    truth_positive: ArrayLike, scores: ArrayLike, target: float
) -> float | None:
    """The largest ``t`` in [0, 1) with sensitivity(score > t) >= ``target`` (see module doc).

    None when no positive study is in the set, or when even ``t = 0`` misses
    the target (positives with no COVID-19 slice at all).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    truth = _bool(truth_positive, "truth_positive")
    score = _scores(scores)
    positives = score[truth]
    if positives.size == 0:
        return None
    candidates = np.unique(np.concatenate([[0.0], score[(score >= 0.0) & (score < 1.0)]]))
    for t in candidates[::-1]:  # largest first: the most specific threshold that reaches it
        # integer comparison: k/n >= target without floating-point rounding at the boundary
        hits = int(np.sum(positives > t))
        if hits >= target * positives.size - 1e-9:
            return float(t)
    return None


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does on the validation set."""

    threshold: float
    table: BinaryTable

    def as_dict(self) -> dict[str, Any]:
        t = self.table
        return {
            "threshold": self.threshold,
            "table_2x2": t.as_dict(),
            "sensitivity": t.sensitivity.as_dict(),
            "specificity": t.specificity.as_dict(),
            "accuracy": t.accuracy.as_dict(),
            "positive_rate": t.positive_rate,
        }


def operating_point(truth_positive: ArrayLike, scores: ArrayLike, threshold: float
                    ) -> OperatingPoint:
    return OperatingPoint(threshold, table_at(truth_positive, scores, threshold))


# --- drift ------------------------------------------------------------------------------

DRIFT_ALPHA = 0.01  # a period is flagged when its positive rate has p < 0.01 against the baseline


def drift_p_value(called_positive: int, studies: int, baseline_rate: float) -> float | None:
    """Two-sided exact binomial test of a period's positive rate against the validation's."""
    if studies == 0 or not 0.0 <= baseline_rate <= 1.0:
        return None
    return float(binomtest(called_positive, studies, baseline_rate).pvalue)
