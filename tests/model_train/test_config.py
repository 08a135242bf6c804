"""TOML configs: the paper's defaults, strict keys and types, round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ctdx.model_train.config import (
    ConfigError,
    NetworkSpec,
    config_from_dict,
    dump_toml,
    load_config,
    with_overrides,
)


def test_paper_config_holds_the_papers_settings() -> None:
    c = load_config(Path("paper"))
    assert c.train.epochs == 50
    assert c.recognition.lr == pytest.approx(1e-4)
    assert c.recognition.networks == ("UP-ResNet18", "P-ResNet18", "UP-ResNet50", "P-ResNet50")
    assert (c.manifestation.head_lr, c.manifestation.backbone_lr) == pytest.approx((5e-4, 5e-5))
    assert c.manifestation.networks == ("P-ResNet18", "P-ResNet50")
    assert (c.split.folds, c.split.holdout_percent) == (5, 30)
    assert c.preprocess.size == 224
    assert c.evaluation.threshold == pytest.approx(0.05)
    assert c.evaluation.study_network == "P-ResNet50"


def test_round_trip_through_toml(tmp_path: Path) -> None:
    c = with_overrides(load_config(Path("smoke.toml")),
                       pretrained={"resnet18": tmp_path / "w.pth"})
    again = config_from_dict(tomllib.loads(dump_toml(c)), tmp_path)
    assert again == c


@pytest.mark.parametrize(("raw", "message"), [
    ({"train": {"epochz": 3}}, "unknown key.*train.epochz"),
    ({"train": {"epochs": "50"}}, "train.epochs must be an integer"),
    ({"train": {"amp": 1}}, "train.amp must be true or false"),
    ({"data": {"slice_policy": "some"}}, "data.slice_policy must be one of"),
    ({"recognition": {"networks": ["ResNet34"]}}, "network 'ResNet34'"),
    ({"manifestation": {"head_lr": 0.1, "backbone_lr": ""}}, "go together"),
    ({"recognition": {"folds": [7]}}, r"folds \[7\] outside"),
    ({"colour": {}}, "unknown key.*colour"),
])
def test_mistakes_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_network_names() -> None:
    assert NetworkSpec.parse("P-ResNet50") == NetworkSpec("resnet50", True)
    assert NetworkSpec.parse("up-resnet18").name == "UP-ResNet18"
    with pytest.raises(ConfigError):
        NetworkSpec.parse("ResNet50")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
