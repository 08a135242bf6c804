"""The batched torch segmentation agrees with the scikit-image reference (Dice >= 0.99).

Real series from ``../shared/data`` (skipped where absent) and a phantom. The
reference costs 0.1-0.3 s per 512² slice on the 2-core dev VM, so it runs on
every ``STEP``-th slice; the torch version runs on the whole series at once (its
result for a slice does not depend on the other slices) and is compared on those.
Dice is aggregated over the compared slices where the reference finds lung.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from ctdx.model_train.method.segmentation import segment_lungs
from ctdx.model_train.method.segmentation_torch import segment_lungs_torch
from ctdx.model_train.phantom import phantom_volume

STEP = 5
MIN_DICE = 0.99
Series = tuple[NDArray[np.float32], float]


def _dice(reference: NDArray[np.bool_], candidate: NDArray[np.bool_]) -> float:
    has_lung = reference.reshape(len(reference), -1).any(axis=1)
    ref, got = reference[has_lung], candidate[has_lung]
    return float(2 * (ref & got).sum() / (ref.sum() + got.sum()))


def _agreement(hu: NDArray[np.float32], spacing: float) -> tuple[float, int]:
    batched = segment_lungs_torch(torch.from_numpy(hu), spacing_mm=spacing).numpy()
    picked = range(0, len(hu), STEP)
    reference = np.stack([segment_lungs(hu[i], spacing_mm=spacing) for i in picked])
    candidate = batched[list(picked)]
    has_lung = int(reference.reshape(len(reference), -1).any(axis=1).sum())
    return _dice(reference, candidate), has_lung


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["covid19", "cap", "normal", "lung-pet-b70f"])
def test_real_series_agree(name: str, real_series: Callable[[str], Series]) -> None:
    hu, spacing = real_series(name)
    dice, slices_with_lung = _agreement(hu, spacing)
    assert slices_with_lung >= 5
    assert dice >= MIN_DICE, f"{name}: Dice {dice:.4f} over {slices_with_lung} slices"


def test_phantom_series_agrees() -> None:
    volume = phantom_volume("covid19", n_slices=12, size=256, seed=2)
    hu = np.stack([s.hu for s in volume]).astype(np.float32)
    dice, slices_with_lung = _agreement(hu, 350.0 / 256)
    assert slices_with_lung >= 2
    assert dice >= MIN_DICE
