"""The two networks of the paper: torchvision ResNet18 / ResNet50 with a new last layer.

The paper ("Methods") keeps the convolutional blocks, pretrained on ImageNet or
randomly initialised, and replaces the fully connected layer by one with three
outputs. Pretrained weights come either from torchvision's weights API
(``pretrained=True``: downloads on first use, needs internet) or from a local
file holding torchvision's ImageNet state dict (``pretrained=Path(...)``: for
machines without internet, e.g. ``resnet50-11ad3fa6.pth`` copied beforehand).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final, Literal, get_args

import torch
from torch import nn
from torchvision.models import ResNet, ResNet18_Weights, ResNet50_Weights, resnet18, resnet50

logger = logging.getLogger(__name__)

Arch = Literal["resnet18", "resnet50"]
ARCHS: Final[tuple[Arch, ...]] = get_args(Arch)

#: The torchvision weights used when ``pretrained=True`` (the best ImageNet weights of each).
IMAGENET_WEIGHTS: Final = {
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V2,
}


class PretrainedWeightsError(ValueError):
    """A local pretrained-weights file is missing or does not fit the architecture."""


def build_resnet(
    arch: Arch, num_classes: int = 3, pretrained: bool | Path = False
) -> ResNet:
    """A ResNet of ``arch`` whose last layer has ``num_classes`` outputs.

    ``pretrained``: ``False`` for random initialisation (the paper's UP-ResNets),
    ``True`` for torchvision's ImageNet weights (download), or the path of a
    file with torchvision's ImageNet state dict (1000 classes). The new last
    layer is always freshly initialised.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    constructor = resnet18 if arch == "resnet18" else resnet50
    if pretrained is True:
        model = constructor(weights=IMAGENET_WEIGHTS[arch])
    else:
        model = constructor(weights=None)
        if isinstance(pretrained, Path | str) and not isinstance(pretrained, bool):
            _load_local_weights(model, Path(pretrained), arch)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _load_local_weights(model: nn.Module, path: Path, arch: Arch) -> None:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for unreadable files
        raise PretrainedWeightsError(f"cannot read pretrained weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsError(
            f"{path} does not fit torchvision {arch} (ImageNet, 1000 classes): {exc}"
        ) from exc
    logger.info("loaded pretrained %s weights from %s", arch, path)


def head_parameters(model: ResNet) -> list[nn.Parameter]:
    """Parameters of the new last layer (the paper's manifestation task trains them at 5e-4)."""
    return list(model.fc.parameters())


def backbone_parameters(model: ResNet) -> list[nn.Parameter]:
    """Every parameter except the last layer's (trained at 5e-5 in the manifestation task)."""
    head = {id(p) for p in model.fc.parameters()}
    return [p for p in model.parameters() if id(p) not in head]
