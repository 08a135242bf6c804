"""Preprocessing: shape, dtype, determinism, what it is invariant to, and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctdx.model_train.method.preprocess import (
    AugmentParams,
    PreprocessParams,
    PreprocessParamsError,
    gray_from_uint8,
    gray_to_uint8,
    normalise_batch,
    preprocess_batch,
    preprocess_slice,
    to_network_input,
    train_augment,
)
from ctdx.model_train.phantom import phantom_slice

P = PreprocessParams()


def _slice(size: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic slice with a lung disc whose (integer, as in DICOM) HU stay inside the window."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    lung = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    hu = torch.full((size, size), 40.0)
    hu[lung] = -800.0 + 20.0 * torch.randn(int(lung.sum()), generator=g)
    hu[lung & (xx > size / 2) & (yy > size / 2)] = -500.0  # a ground-glass patch
    return hu.round().unsqueeze(0), lung.unsqueeze(0)


def test_shape_dtype_range_and_background() -> None:
    hu, lung = _slice()
    out = preprocess_batch(hu.repeat(3, 1, 1), lung.repeat(3, 1, 1), P)
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float32
    gray = normalise_batch(hu, lung, P)
    assert gray.shape == (1, 1, 224, 224)
    assert gray.min() == 0.0 and gray.max() == 1.0
    assert gray[0, 0, 0, 0] == P.background  # corner is outside the lung
    mean = torch.tensor(P.mean).view(3, 1, 1)
    std = torch.tensor(P.std).view(3, 1, 1)
    torch.testing.assert_close(out[0], (gray[0] - mean) / std)


def test_deterministic_and_numpy_wrapper_agrees() -> None:
    hu, lung = _slice()
    a = preprocess_batch(hu, lung, P)
    b = preprocess_batch(hu.clone(), lung.clone(), P)
    assert torch.equal(a, b)
    c = preprocess_slice(hu[0].numpy().astype(np.int16), lung[0].numpy())
    assert c.dtype == np.float32 and np.array_equal(c, a[0].numpy())


@pytest.mark.parametrize("offset", [-60.0, 45.0, 100.0])
def test_invariant_to_hu_offset_inside_the_window(offset: float) -> None:
    hu, lung = _slice()
    assert torch.equal(normalise_batch(hu, lung, P), normalise_batch(hu + offset, lung, P))


def test_outside_lung_content_does_not_matter() -> None:
    hu, lung = _slice()
    other = hu.clone()
    other[~lung] = 700.0  # bone instead of soft tissue
    assert torch.equal(preprocess_batch(hu, lung, P), preprocess_batch(other, lung, P))


def test_window_keeps_absolute_density_for_uniform_lungs() -> None:
    """A near-uniform lung is not stretched to full contrast (min_range_hu)."""
    hu, lung = _slice()
    hu = torch.where(lung, torch.full_like(hu, -850.0), hu)
    hu[0, 64, 64] = -830.0
    gray = normalise_batch(hu, lung, P)
    assert float(gray.max()) < 0.2


def test_empty_mask_gives_background() -> None:
    hu, lung = _slice()
    gray = normalise_batch(hu, torch.zeros_like(lung), P)
    assert torch.all(gray == P.background)


def test_non_square_is_padded_not_stretched() -> None:
    hu = torch.full((1, 100, 200), -850.0)
    hu[..., :100] = -400.0
    lung = torch.ones_like(hu, dtype=torch.bool)
    gray = normalise_batch(hu, lung, P)[0, 0]
    assert gray.shape == (224, 224)
    assert torch.all(gray[:40] == 0) and torch.all(gray[-40:] == 0)  # padding rows
    assert gray[112, 20] > 0.5 and gray[112, 200] == 0.0


def test_uint8_cache_is_lossless() -> None:
    hu, lung = _slice()
    gray = normalise_batch(hu, lung, P)
    stored = gray_to_uint8(gray, P)
    assert stored.dtype == torch.uint8
    assert torch.equal(gray_from_uint8(stored, P), gray)
    from_cache = to_network_input(gray_from_uint8(stored, P), P)
    assert torch.equal(from_cache, preprocess_batch(hu, lung, P))


def test_real_phantom_slice_runs() -> None:
    hu_np, _ = phantom_slice("covid19", 0.5, size=128)
    hu = torch.from_numpy(hu_np.astype(np.float32)).unsqueeze(0)
    out = preprocess_batch(hu, hu < -500, P)
    assert torch.isfinite(out).all()


def test_params_round_trip_and_validation() -> None:
    assert PreprocessParams.from_dict(P.to_dict()) == P
    with pytest.raises(PreprocessParamsError, match="hu_min must be below"):
        PreprocessParams(hu_min=100, hu_max=0)
    with pytest.raises(ValueError, match="bool"):
        preprocess_batch(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), P)


def test_augment_is_seeded_and_flips() -> None:
    x = torch.arange(224.0).view(1, 1, 1, 224).expand(4, 3, 224, 224).contiguous()
    a = train_augment(x, torch.Generator().manual_seed(3))
    b = train_augment(x, torch.Generator().manual_seed(3))
    c = train_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape
    flipped = train_augment(x, torch.Generator(), AugmentParams(min_crop=1.0, flip_p=1.0))
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-3, rtol=0)
    same = train_augment(x, torch.Generator(), AugmentParams(min_crop=1.0, flip_p=0.0))
    torch.testing.assert_close(same, x, atol=1e-3, rtol=0)
    half = AugmentParams(min_crop=0.5, flip_p=0.0)
    cropped = train_augment(x, torch.Generator().manual_seed(0), half)
    assert float(cropped.min()) >= 0.0 and float(cropped.max()) <= 223.0
