"""The paper's evaluation: image-level per-class metrics, ROC/AUC, fold statistics, p-values,
and the study-level share-of-slices evaluation.

Definitions follow the paper's table footnotes. For class ``x`` (one versus the rest):
sensitivity ``tp / (tp + fn)``, specificity ``tn / (tn + fp)``, accuracy
``(tp + tn) / N``; total (overall) accuracy ``sum_x tp_x / N``.

Fold statistics: "mean (sd)" is the mean over folds and the *sample* standard
deviation (``ddof=1``); the paper does not say which sd it uses.

P-values: the paper reports p-values between models (Tables 2 and 4) without
naming the test. We use a **two-sided paired t-test over the folds**
(``scipy.stats.ttest_rel``) on the per-fold metric: both models are trained
and tested on the same five splits, so the fold is the pairing unit and the
mean (sd) in the tables is exactly what the test compares. With 5 folds it has
4 degrees of freedom. When every paired difference is zero the p-value is 1;
with fewer than two folds it is undefined (NaN).

Study level (paper, Results; Fig. 6, Fig. 7, Table 5): every analysed slice of a
study goes through the recognition network; :func:`ctdx.model_train.method.decision.decide_study`
turns the slice probabilities and the share threshold into the study's class.
COVID-19 versus the rest gives sensitivity, specificity and accuracy; the three
classes give the overall accuracy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.metrics import auc, roc_curve

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def confusion(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> IntArray:
    """``cm[i, j]`` = number of items of true class ``i`` predicted as ``j``."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= n_classes or p.max() >= n_classes):
        raise ValueError(f"labels must be in 0..{n_classes - 1}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class (one versus rest) metrics of one confusion matrix; fractions, not percent."""

    sensitivity: tuple[float, ...]
    specificity: tuple[float, ...]
    accuracy: tuple[float, ...]
    overall_accuracy: float
    n: int


def class_metrics(cm: ArrayLike) -> ClassMetrics:
    """Sensitivity, specificity and accuracy of each class, and the overall accuracy.

    A class with no positives has NaN sensitivity (undefined, not zero).
    """
    m = np.asarray(cm, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    n = int(m.sum())
    sens, spec, acc = [], [], []
    for x in range(m.shape[0]):
        tp = int(m[x, x])
        fn = int(m[x].sum()) - tp
        fp = int(m[:, x].sum()) - tp
        tn = n - tp - fn - fp
        sens.append(_ratio(tp, tp + fn))
        spec.append(_ratio(tn, tn + fp))
        acc.append(_ratio(tp + tn, n))
    return ClassMetrics(tuple(sens), tuple(spec), tuple(acc), _ratio(float(np.trace(m)), n), n)


@dataclass(frozen=True)
class RocCurve:
    """One class versus the rest."""

    fpr: FloatArray
    tpr: FloatArray
    auc: float


def roc_per_class(y_true: ArrayLike, probs: ArrayLike) -> tuple[RocCurve, ...]:
    """ROC curve and AUC for each class (column of ``probs``) versus the rest.

    A class that is absent (or the only one present) has an undefined curve:
    empty arrays and NaN AUC.
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != t.size:
        raise ValueError(f"probs must be (N, C) with N = {t.size}, got {p.shape}")
    curves = []
    for x in range(p.shape[1]):
        positive = t == x
        if positive.all() or not positive.any():
            curves.append(RocCurve(np.empty(0), np.empty(0), math.nan))
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, x])
        curves.append(RocCurve(fpr.astype(np.float64), tpr.astype(np.float64),
                               float(auc(fpr, tpr))))
    return tuple(curves)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over folds, ignoring NaN."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test over folds (see the module doc); NaN when undefined."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan
    d = x - y
    if np.allclose(d, 0.0):
        return 1.0
    if np.allclose(d, d[0]):
        return 0.0  # a constant non-zero difference: zero variance, the t statistic is infinite
    return float(stats.ttest_rel(x, y).pvalue)


def format_mean_sd(values: Sequence[float], digits: int = 2) -> str:
    """``"97.11 (1.05)"`` in percent, as the paper's tables print it."""
    m, s = mean_sd(values)
    if math.isnan(m):
        return "n/a"
    sd = "n/a" if math.isnan(s) else f"{100 * s:.{digits}f}"
    return f"{100 * m:.{digits}f} ({sd})"


# --- study level ----------------------------------------------------------------------

Decide = Callable[[NDArray[np.float32], float], str]
"""``(slice probabilities (N, 3), threshold) -> recognition class name`` of the study."""


def default_decide() -> Decide:
    """The serving rule: :func:`ctdx.model_train.method.decision.decide_study`."""
    from ctdx.model_train.method.decision import decide_study

    def decide(probs: NDArray[np.float32], threshold: float) -> str:
        return str(decide_study(probs, threshold).decision)

    return decide


@dataclass(frozen=True)
class StudyPredictions:
    """Slice probabilities of one study (the slices the worker would analyse)."""

    study: str
    true_label: str
    probs: NDArray[np.float32]  # (N, 3), recognition class order


@dataclass(frozen=True)
class StudyMetrics:
    """COVID-19 versus rest, and the three-class overall accuracy, at one threshold."""

    threshold: float
    sensitivity: float
    specificity: float
    accuracy: float
    overall_accuracy: float
    confusion: IntArray  # 3 x 3, recognition class order
    n: int


def study_metrics(
    studies: Sequence[StudyPredictions],
    threshold: float,
    classes: Sequence[str],
    decide: Decide | None = None,
    positive: str = "covid19",
) -> StudyMetrics:
    """Decide every study at ``threshold`` and score it (paper's Table 5 / Fig. 7)."""
    rule = decide or default_decide()
    index = {c: i for i, c in enumerate(classes)}
    t = [index[s.true_label] for s in studies]
    p = [index[rule(s.probs, threshold)] for s in studies]
    cm = confusion(t, p, len(classes))
    k = index[positive]
    per = class_metrics(cm)
    return StudyMetrics(
        threshold=threshold,
        sensitivity=per.sensitivity[k],
        specificity=per.specificity[k],
        accuracy=per.accuracy[k],
        overall_accuracy=per.overall_accuracy,
        confusion=cm,
        n=len(studies),
    )


def threshold_curve(
    studies: Sequence[StudyPredictions],
    thresholds: Sequence[float],
    classes: Sequence[str],
    decide: Decide | None = None,
) -> tuple[StudyMetrics, ...]:
    """:func:`study_metrics` at each threshold (paper's Fig. 6)."""
    rule = decide or default_decide()
    return tuple(study_metrics(studies, th, classes, rule) for th in thresholds)


def group_by_study(
    study_ids: Sequence[str], true_labels: Sequence[str], probs: NDArray[np.float32]
) -> tuple[StudyPredictions, ...]:
    """Collect per-slice predictions into studies (order of first appearance)."""
    rows: dict[str, list[int]] = {}
    label: dict[str, str] = {}
    for i, (s, lab) in enumerate(zip(study_ids, true_labels, strict=True)):
        rows.setdefault(s, []).append(i)
        if label.setdefault(s, lab) != lab:
            raise ValueError(f"study {s!r} has slices of two classes")
    return tuple(StudyPredictions(s, label[s], probs[idx]) for s, idx in rows.items())


def per_fold(values: Mapping[int, float]) -> list[float]:
    """Values ordered by fold index (for :func:`mean_sd` and :func:`paired_p_value`)."""
    return [values[k] for k in sorted(values)]
