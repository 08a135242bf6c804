"""Class vocabularies of the two tasks, and the version of the method.

The order of each tuple is the order of the networks' outputs: a checkpoint
stores its ``class_names`` and loading refuses one whose names differ from
these, so a reordered or relabelled model can never be served silently.

``METHOD_VERSION`` names the segmentation and preprocessing code. Bump it
whenever either changes what a slice becomes: the training cache keys on it,
and a checkpoint trained under another method version is refused at load time
(it was trained on differently preprocessed images).
"""

from __future__ import annotations

import logging
from typing import Final, Literal

logger = logging.getLogger(__name__)

Task = Literal["recognition", "manifestation"]
TASKS: Final[tuple[Task, ...]] = ("recognition", "manifestation")

RecognitionClass = Literal["covid19", "other_pneumonia", "normal"]
ManifestationClass = Literal["ground_glass_opacity", "consolidation", "fibrotic_streaks"]

RECOGNITION_CLASSES: Final[tuple[RecognitionClass, ...]] = ("covid19", "other_pneumonia", "normal")
MANIFESTATION_CLASSES: Final[tuple[ManifestationClass, ...]] = (
    "ground_glass_opacity",
    "consolidation",
    "fibrotic_streaks",
)

DISPLAY_NAMES: Final[dict[str, str]] = {
    "covid19": "COVID-19",
    "other_pneumonia": "other pneumonia",
    "normal": "normal",
    "ground_glass_opacity": "ground-glass opacity",
    "consolidation": "consolidation",
    "fibrotic_streaks": "fibrotic streaks",
}

METHOD_VERSION: Final[str] = "1"


def classes_for(task: Task) -> tuple[str, ...]:
    """The output classes of ``task``, in network output order."""
    if task == "recognition":
        return RECOGNITION_CLASSES
    if task == "manifestation":
        return MANIFESTATION_CLASSES
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def display_name(class_name: str) -> str:
    """Human-readable name for reports and the CLI (``covid19`` -> ``COVID-19``)."""
    try:
        return DISPLAY_NAMES[class_name]
    except KeyError:
        raise ValueError(f"unknown class name {class_name!r}") from None
