"""Checkpoint round trip and every refusal, on small checkpoints the tests create."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ctdx.model_train.method.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from ctdx.model_train.method.classes import (
    MANIFESTATION_CLASSES,
    METHOD_VERSION,
    RECOGNITION_CLASSES,
)
from ctdx.model_train.method.networks import build_resnet
from ctdx.model_train.method.preprocess import PreprocessParams

Saved = tuple[Path, torch.nn.Module, CheckpointMeta]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    torch.manual_seed(0)
    model = build_resnet("resnet18", num_classes=3).eval()
    meta = CheckpointMeta.new(
        "recognition", "resnet18", "ctdx-test", "0.0.1",
        training_data={"dataset": "phantom", "subjects": 3, "classes": {"covid19": 1}},
    )
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, meta)
    return path, model, meta


def _rewrite(src: Path, dst: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    payload = torch.load(src, map_location="cpu", weights_only=True)
    change(payload)
    torch.save(payload, dst)
    return dst


def test_round_trip_gives_same_outputs_and_meta(saved: Saved) -> None:
    path, model, meta = saved
    loaded = load_checkpoint(path, task="recognition", device="cpu")
    assert loaded.meta == meta
    assert loaded.meta.class_names == RECOGNITION_CLASSES
    assert loaded.meta.method_version == METHOD_VERSION
    assert loaded.meta.training_data["classes"] == {"covid19": 1}
    assert not loaded.model.training
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert read_checkpoint_meta(path) == meta


def test_meta_device_checks_without_weights_and_auto_picks_a_device(saved: Saved) -> None:
    on_meta = load_checkpoint(saved[0], task="recognition", device="meta")
    assert all(p.device.type == "meta" for p in on_meta.model.parameters())
    auto = load_checkpoint(saved[0], task="recognition", device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(auto.model.parameters()).device.type == expected


def test_payload_holds_only_plain_types(saved: Saved) -> None:
    path, _, meta = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "ctdx-checkpoint"
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["model_uid"] == meta.model_uid and payload["model_uid"].startswith("2.25.")
    assert payload["preprocess"] == PreprocessParams().to_dict()
    assert all(v.dtype != torch.bfloat16 for v in payload["state_dict"].values())


def test_new_meta_gets_a_fresh_uid() -> None:
    a = CheckpointMeta.new("manifestation", "resnet18", "m", "1")
    b = CheckpointMeta.new("manifestation", "resnet18", "m", "1")
    assert a.model_uid != b.model_uid
    assert a.class_names == MANIFESTATION_CLASSES


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt", task="recognition")


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a ctdx checkpoint"):
        load_checkpoint(path, task="recognition")


def test_plain_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(build_resnet("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError, match="ctdx train export"):
        load_checkpoint(path, task="recognition")


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("code ran",))


def test_pickled_objects_are_refused_without_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "ctdx-checkpoint", "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="Python objects besides tensors"):
        load_checkpoint(path, task="recognition")
    assert "code ran" not in capsys.readouterr().out


def test_wrong_task(saved: Saved) -> None:
    with pytest.raises(CheckpointError, match="'recognition' model; a 'manifestation' model"):
        load_checkpoint(saved[0], task="manifestation")


def test_other_format_version(saved: Saved, tmp_path: Path) -> None:
    path = _rewrite(saved[0], tmp_path / "v2.pt", lambda p: p.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path, task="recognition")


def test_reordered_class_names(saved: Saved, tmp_path: Path) -> None:
    names = ["normal", "other_pneumonia", "covid19"]
    path = _rewrite(saved[0], tmp_path / "c.pt", lambda p: p.update(class_names=names))
    with pytest.raises(CheckpointError, match="class names .*order matters"):
        load_checkpoint(path, task="recognition")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(crop_to_lung=True), "unknown \\['crop_to_lung'\\]"),
        (lambda d: d.pop("hu_min"), "missing \\['hu_min'\\]"),
        (lambda d: d.update(normalisation="zscore"), "normalisation"),
    ],
)
def test_preprocess_not_applicable(
    saved: Saved, tmp_path: Path,
    change: Callable[[dict[str, Any]], None], message: str,
) -> None:
    path = _rewrite(saved[0], tmp_path / "p.pt", lambda p: change(p["preprocess"]))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, task="recognition")


def test_other_method_version(saved: Saved, tmp_path: Path) -> None:
    path = _rewrite(saved[0], tmp_path / "m.pt", lambda p: p.update(method_version="0-old"))
    with pytest.raises(CheckpointError, match="method version '0-old'"):
        load_checkpoint(path, task="recognition")


def test_weights_of_another_architecture(saved: Saved, tmp_path: Path) -> None:
    path = _rewrite(saved[0], tmp_path / "a.pt", lambda p: p.update(arch="resnet50"))
    with pytest.raises(CheckpointError, match="do not match resnet50 .* missing \\[.*unexpected"):
        load_checkpoint(path, task="recognition")


def test_save_refuses_a_model_with_other_outputs(tmp_path: Path) -> None:
    model = build_resnet("resnet18", num_classes=2)
    meta = CheckpointMeta.new("recognition", "resnet18", "m", "1")
    with pytest.raises(CheckpointError, match="wrong shape \\[fc.bias, fc.weight\\]"):
        save_checkpoint(tmp_path / "x.pt", model, meta)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_uid": "not-a-uid"}, "valid DICOM UID"),
        ({"training_data": {"when": object()}}, "training_data.when holds a object"),
        ({"arch": "vgg16"}, "arch must be one of"),
        ({"model_name": " "}, "must not be empty"),
    ],
)
def test_meta_is_valid_once_constructed(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "task": "recognition", "arch": "resnet18", "class_names": RECOGNITION_CLASSES,
        "preprocess": PreprocessParams(), "model_name": "m", "model_version": "1",
        "model_uid": "1.2.3",
    }
    base.update(kwargs)
    with pytest.raises(CheckpointError, match=message):
        CheckpointMeta(**base)
