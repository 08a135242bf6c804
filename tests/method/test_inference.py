"""SliceClassifier on the CPU: probabilities, precision choice, fp32 vs bf16 calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctdx.model_train.method.checkpoint import CheckpointMeta, save_checkpoint
from ctdx.model_train.method.inference import SliceClassifier, cpu_has_native_bf16, resolve_device
from ctdx.model_train.method.networks import build_resnet
from ctdx.model_train.method.preprocess import PreprocessParams, preprocess_batch
from ctdx.model_train.phantom import PHANTOM_KINDS, phantom_slice

PARAMS = PreprocessParams(size=64)  # small inputs keep the test fast; ResNets pool adaptively
PER_KIND = 5


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed phantom slices, ``PER_KIND`` of each kind, and their kind labels."""
    slices = [
        phantom_slice(kind, t, size=128, rng=np.random.default_rng(i))[0]
        for kind in PHANTOM_KINDS
        for i, t in enumerate(np.linspace(0.3, 0.7, PER_KIND))
    ]
    hu = torch.from_numpy(np.stack(slices).astype(np.float32))
    x = preprocess_batch(hu, (hu > -950) & (hu < -500), PARAMS)
    return x, torch.arange(len(PHANTOM_KINDS)).repeat_interleave(PER_KIND)


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, batch: tuple[torch.Tensor, torch.Tensor]
) -> Path:
    """A ResNet18 whose last layer is fitted to tell the phantom kinds apart.

    A randomly initialised network gives nearly the same output for every input,
    so "same argmax in bf16" would be trivially true; fitting the last layer on the
    (random) features makes the calls depend on the image.
    """
    torch.manual_seed(0)
    model = build_resnet("resnet18").eval()
    x, y = batch
    head = model.fc
    model.fc = nn.Identity()
    with torch.no_grad():
        features = model(x)
    centre = features.mean(0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(features - centre), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    with torch.no_grad():
        head.bias -= head.weight @ centre
    model.fc = head
    path = tmp_path_factory.mktemp("inf") / "r18.pt"
    meta = CheckpointMeta.new("recognition", "resnet18", "t", "1", preprocess=PARAMS)
    save_checkpoint(path, model, meta)
    return path


def test_probabilities_sum_to_one_and_calls_follow_the_image(
    checkpoint: Path, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    clf = SliceClassifier.from_checkpoint(checkpoint, "recognition", device="cpu", precision="fp32")
    x, y = batch
    probs = clf.predict(x)
    assert probs.shape == (len(y), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(axis=1), y.numpy())
    assert clf.predict(x[:0]).shape == (0, 3)
    assert clf.device_description.startswith("cpu (") and "fp32" in clf.device_description


def test_bf16_gives_the_same_calls_as_fp32(
    checkpoint: Path, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = batch
    fp32 = SliceClassifier.from_checkpoint(checkpoint, "recognition", "cpu", precision="fp32")
    bf16 = SliceClassifier.from_checkpoint(checkpoint, "recognition", "cpu", precision="bf16")
    assert bf16.precision == "bf16" and "bf16" in bf16.device_description
    p32, p16 = fp32.predict(x), bf16.predict(x)
    assert np.array_equal(p32.argmax(axis=1), p16.argmax(axis=1))
    assert float(np.abs(p32 - p16).max()) < 0.1


def test_auto_precision_on_this_cpu(checkpoint: Path) -> None:
    clf = SliceClassifier.from_checkpoint(checkpoint, "recognition", device="auto")
    assert clf.device == resolve_device("auto")
    if clf.device.type == "cpu" and not cpu_has_native_bf16():
        assert clf.precision == "fp32"  # emulated bf16 is several times slower
    assert clf.precision in ("fp32", "bf16")


def test_wrong_input_shape_is_refused(checkpoint: Path) -> None:
    clf = SliceClassifier.from_checkpoint(checkpoint, "recognition", device="cpu", precision="fp32")
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        clf.predict(torch.zeros(1, 3, 224, 224))
