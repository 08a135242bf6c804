"""What the importers share: class-name aliases and their error type."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ctdx.model_train.manifest import ManifestError
from ctdx.model_train.method.classes import RECOGNITION_CLASSES

logger = logging.getLogger(__name__)

DEFAULT_CLASS_MAP: Mapping[str, str] = {
    # canonical names
    "covid19": "covid19",
    "other_pneumonia": "other_pneumonia",
    "normal": "normal",
    # COVID-CT-MD
    "covid-19": "covid19",
    "cap": "other_pneumonia",
    # CC-CCII: novel coronavirus pneumonia, common pneumonia, normal control
    "ncp": "covid19",
    "cp": "other_pneumonia",
    # COVID-CT (UCSD-AI4H): only the COVID folder is unambiguous; CT_NonCOVID mixes normal and
    # other diseases, so it must be mapped explicitly (e.g. --class-map CT_NonCOVID=normal).
    "ct_covid": "covid19",
}
"""Folder or table class names (case-insensitive) -> recognition class."""


class DataImportError(ManifestError):
    """The folder does not have the expected layout; the message says what is missing."""


def parse_class_map(pairs: list[str] | None) -> dict[str, str]:
    """``["NAME=class", ...]`` from the command line on top of :data:`DEFAULT_CLASS_MAP`."""
    out = {k.lower(): v for k, v in DEFAULT_CLASS_MAP.items()}
    for pair in pairs or []:
        name, sep, cls = pair.partition("=")
        if not sep or not name.strip():
            raise DataImportError(f"class map entry {pair!r} is not NAME=CLASS")
        cls = cls.strip()
        if cls not in RECOGNITION_CLASSES:
            raise DataImportError(
                f"class map entry {pair!r}: {cls!r} is not one of {', '.join(RECOGNITION_CLASSES)}"
            )
        out[name.strip().lower()] = cls
    return out


def map_class(name: str, class_map: Mapping[str, str]) -> str | None:
    """The recognition class of ``name``, or None when the map does not know it."""
    return {k.lower(): v for k, v in class_map.items()}.get(name.strip().lower())
