"""From per-slice probabilities to a study call (paper, "Results", patient basis).

The paper passes every image of a study through P-ResNet50 and calls the study
COVID-19 when "a certain proportion of images (larger than the threshold)" are
recognised as COVID-19, with the threshold at 5% for high sensitivity. It does
not spell out the three-class call; ours follows the same proportion rule:

1. each analysed slice is called by its largest probability (ties go to the
   class listed first in ``RECOGNITION_CLASSES``, i.e. towards COVID-19);
2. COVID-19 if the share of slices called COVID-19 is **strictly above**
   ``threshold``;
3. otherwise other pneumonia if the share called other pneumonia is strictly
   above the same ``threshold``;
4. otherwise normal.

A share exactly at the threshold does not count (paper: "larger than"). Shares
are compared as ``count / n`` against the threshold, so 1 slice out of 20 at
threshold 0.05 is "at", not above. A study with no analysed slices (every slice
skipped for too little lung) has no call: :class:`NoAnalysedSlicesError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctdx.model_train.method.classes import (
    MANIFESTATION_CLASSES,
    RECOGNITION_CLASSES,
    RecognitionClass,
)

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.05


class NoAnalysedSlicesError(ValueError):
    """A study decision was asked for with no analysed slice."""


@dataclass(frozen=True)
class StudyDecision:
    """The study call and the shares it was made from."""

    decision: RecognitionClass
    fractions: Mapping[str, float]  # class -> share of analysed slices called that class
    counts: Mapping[str, int]  # class -> number of analysed slices called that class
    n_slices: int
    threshold: float


def _as_probs(probs: ArrayLike, n_classes: int, name: str) -> NDArray[np.floating[Any]]:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_classes:
        raise ValueError(f"{name} must be (N, {n_classes}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def slice_calls(probs: ArrayLike) -> NDArray[np.intp]:
    """Index of the called class of each slice (argmax; ties to the first class)."""
    arr = np.asarray(probs)
    return np.asarray(np.argmax(arr, axis=1), dtype=np.intp)


def decide_study(probs: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> StudyDecision:
    """Apply the proportion rule to ``(N, 3)`` recognition probabilities (see module doc)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    arr = _as_probs(probs, len(RECOGNITION_CLASSES), "probs")
    n = int(arr.shape[0])
    if n == 0:
        raise NoAnalysedSlicesError("no analysed slices: the study cannot be called")
    calls = slice_calls(arr)
    counts: dict[str, int] = {
        c: int(np.count_nonzero(calls == i)) for i, c in enumerate(RECOGNITION_CLASSES)
    }
    fractions: dict[str, float] = {c: counts[c] / n for c in RECOGNITION_CLASSES}
    decision: RecognitionClass
    if fractions["covid19"] > threshold:
        decision = "covid19"
    elif fractions["other_pneumonia"] > threshold:
        decision = "other_pneumonia"
    else:
        decision = "normal"
    return StudyDecision(
        decision=decision, fractions=fractions, counts=counts, n_slices=n, threshold=threshold
    )


def summarise_manifestations(probs: ArrayLike) -> dict[str, int]:
    """Number of slices called each manifestation (argmax of ``(M, 3)`` probabilities)."""
    arr = _as_probs(probs, len(MANIFESTATION_CLASSES), "probs")
    calls = slice_calls(arr) if arr.shape[0] else np.zeros(0, dtype=np.intp)
    return {c: int(np.count_nonzero(calls == i)) for i, c in enumerate(MANIFESTATION_CLASSES)}
