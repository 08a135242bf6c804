"""int8 weights: calibrated, checked against fp32, stored in the checkpoint, then served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctdx.model_train.method.checkpoint import (
    CheckpointError,
    Int8Weights,
    load_checkpoint,
    save_checkpoint,
)
from ctdx.model_train.method.inference import SliceClassifier, cpu_has_native_bf16
from ctdx.model_train.method.quantize import (
    Int8Report,
    QuantizationError,
    compare,
    load_int8,
    make_int8,
)
from tests.method.test_inference import PARAMS, batch, checkpoint  # noqa: F401 (fixtures)


def _int8_checkpoint(source: Path, out: Path, x: torch.Tensor) -> Int8Weights:
    loaded = load_checkpoint(source, "recognition")
    state, report = make_int8(loaded.model, [x[:8], x[8:]], [x], PARAMS.size, PARAMS.channels,
                              "phantom slices", "the same phantom slices", min_agreement=0.9)
    weights = Int8Weights(state, report)
    save_checkpoint(out, loaded.model, loaded.meta, int8=weights)
    return weights


@pytest.fixture(scope="module")
def int8_checkpoint(checkpoint: Path, batch: tuple[torch.Tensor, torch.Tensor],  # noqa: F811
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Int8Weights]:
    out = tmp_path_factory.mktemp("int8") / "r18-int8.pt"
    return out, _int8_checkpoint(checkpoint, out, batch[0])


def test_int8_weights_round_trip_and_follow_fp32(
    int8_checkpoint: tuple[Path, Int8Weights], checkpoint: Path,  # noqa: F811
    batch: tuple[torch.Tensor, torch.Tensor],  # noqa: F811
) -> None:
    path, weights = int8_checkpoint
    x, y = batch
    report = weights.report
    assert report.backend == "x86" and report.calibration_slices == len(y)
    assert report.evaluation_slices == len(y) and report.argmax_agreement >= 0.9
    assert report.torch_version == str(torch.__version__)

    loaded = load_checkpoint(path, "recognition")
    assert loaded.int8 is not None and loaded.int8.report == report
    served = SliceClassifier(loaded, device="cpu", precision="int8")
    assert served.precision == "int8" and served.int8_report == report
    assert "int8 x86 (agreement" in served.device_description
    probs = served.predict(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the same int8 graph rebuilt from the file gives exactly what the stored state gives
    rebuilt = load_int8("resnet18", 3, PARAMS.size, PARAMS.channels, weights.state_dict)
    with torch.inference_mode():
        direct = torch.softmax(rebuilt(x), dim=1).numpy()
    np.testing.assert_allclose(probs, direct, atol=1e-6)
    # and it calls the phantom kinds as the fp32 network does
    fp32 = SliceClassifier.from_checkpoint(checkpoint, "recognition", "cpu", precision="fp32")
    agreement = float((fp32.predict(x).argmax(1) == probs.argmax(1)).mean())
    assert agreement == pytest.approx(report.argmax_agreement)


def test_auto_precision_prefers_checked_int8_on_the_cpu(
    int8_checkpoint: tuple[Path, Int8Weights], checkpoint: Path,  # noqa: F811
) -> None:
    with_int8 = SliceClassifier.from_checkpoint(int8_checkpoint[0], "recognition", "cpu")
    assert with_int8.precision == "int8"
    without = SliceClassifier.from_checkpoint(checkpoint, "recognition", "cpu")
    assert without.int8_report is None
    if not cpu_has_native_bf16():
        assert without.precision == "fp32"
    forced = SliceClassifier.from_checkpoint(int8_checkpoint[0], "recognition", "cpu",
                                             precision="fp32")
    assert forced.precision == "fp32" and "fp32" in forced.device_description


def test_int8_without_int8_weights_is_refused_with_the_fix(checkpoint: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match=r"no int8 weights: export it with .*--int8"):
        SliceClassifier.from_checkpoint(checkpoint, "recognition", "cpu", precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        SliceClassifier.from_checkpoint(checkpoint, "recognition", "cpu",
                                        precision="fp16")  # type: ignore[arg-type]


def test_int8_below_the_minimum_agreement_is_not_made(
    checkpoint: Path, batch: tuple[torch.Tensor, torch.Tensor],  # noqa: F811
) -> None:
    x, _ = batch
    model = load_checkpoint(checkpoint, "recognition").model
    with pytest.raises(QuantizationError, match=r"below the minimum 1\.01: not exported"):
        make_int8(model, [x], [x], PARAMS.size, 3, "a", "b", min_agreement=1.01)
    with pytest.raises(QuantizationError, match="no calibration slices"):
        make_int8(model, [], [x], PARAMS.size, 3, "a", "b", min_agreement=0.0)


def test_a_network_that_int8_cannot_follow_is_caught(
    batch: tuple[torch.Tensor, torch.Tensor],  # noqa: F811
) -> None:
    """One channel with activations 10^4 times the others: per-tensor uint8 activations
    crush the small channels, which alone carry the call; the check must see it."""
    torch.manual_seed(0)
    x, y = batch
    mix = nn.Conv2d(8, 8, 1)
    features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), mix, nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        mix.weight.zero_()
        nn.init.zeros_(mix.bias)
        mix.weight[0, 0] = 1e4  # the outlier channel
        for c in range(1, 8):
            mix.weight[c, c] = 1.0
        f = features(x)
    head = nn.Linear(8, 3)
    opt = torch.optim.Adam(head.parameters(), lr=5e-2)
    mean, std = f[:, 1:].mean(0), f[:, 1:].std(0) + 1e-6
    for _ in range(300):  # a head that reads only the small channels
        opt.zero_grad()
        with torch.no_grad():
            head.weight[:, 0] = 0.0
        nn.functional.cross_entropy(head(torch.cat([f[:, :1], (f[:, 1:] - mean) / std], 1)),
                                    y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    with torch.no_grad():
        head.weight[:, 0] = 0.0
        head.weight[:, 1:] /= std
        head.bias.sub_(head.weight[:, 1:] @ mean)
    model = nn.Sequential(features, head).eval()
    with torch.no_grad():
        assert len(set(model(x).argmax(1).tolist())) == 3  # fp32 tells the kinds apart
    from ctdx.model_train.method.quantize import quantize_int8

    int8 = quantize_int8(model, [x], PARAMS.size)
    n, agreement, worst = compare(model, int8, [x])
    assert n == len(x) and agreement < 0.9 and worst > 0.1
    with pytest.raises(QuantizationError, match="below the minimum 0.99"):
        make_int8(model, [x], [x], PARAMS.size, 3, "a", "b", min_agreement=0.99)


def test_a_malformed_int8_entry_is_refused(checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    payload = torch.load(checkpoint, weights_only=True)
    payload["int8"] = {"state_dict": {}, "report": {"backend": "x86"}}
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="int8 report is incomplete"):
        load_checkpoint(bad, "recognition")


def test_report_round_trips_as_plain_data() -> None:
    report = Int8Report("x86", 10, "c", 5, "e", 0.998, 0.02, "2.14.1")
    assert Int8Report.from_dict(report.to_dict()) == report
    assert "0.998 agreement with fp32 on 5 held-out slices" in report.summary()
