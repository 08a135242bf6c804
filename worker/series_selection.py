"""Which series of a study to analyse: rules as data, and a reason a person can read.

A rule set has two lists (see :data:`DEFAULT_RULES`; a TOML or JSON file of
the same shape replaces it via ``CTDX_SERIES_RULES``):

- ``filters``: every one must pass, or the series is not a candidate.
  ``{attribute, in: [...]}`` (case-insensitive), ``{attribute, excludes: [...]}``
  (for multi-valued attributes such as ImageType), ``{attribute, min: x}``,
  ``{attribute, max: x}``, ``{attribute, matches: [glob, ...]}``. A missing
  attribute fails ``in``, ``min``, ``max`` and ``matches`` and passes ``excludes``.
- ``preferences``: the candidates are ranked on these in order, the first
  that tells two apart decides. ``{attribute, prefer: "lowest" | "highest"}``
  (missing values rank last) or ``{attribute, prefer_match: [glob, ...]}``
  (a match ranks first; e.g. lung or sharp reconstruction kernels).

Attributes are the fields of :class:`SeriesCandidate`, read from the series'
first instance header and its instance count. An Enhanced CT series (one
multi-frame instance whose frames are described by functional groups) is
described like a classic one: ``slice_count`` counts its frames (over all its
instances), ``slice_thickness`` comes from the Pixel Measures functional group,
``axial_cosine`` from Plane Orientation and ``convolution_kernel`` from CT
Reconstruction (per-frame groups of the first frame, else the shared groups),
so "most slices" and "thinnest slices" rank both kinds alike. ``sop_class``
names the SOP Class (``CT Image Storage``, ``Enhanced CT Image Storage``, ...);
``number_of_frames`` is the frames per instance (1 for classic CT).

The reason names series by number, UID and technical attributes only (never a
description: it may carry free text), so it can be logged.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydicom.uid import UID

from ctdx.worker.errors import NoUsableSeries
from ctdx.worker.loading import (
    frame_count,
    functional_group,
    is_localizer,
    is_multiframe,
    read_header,
    slice_normal,
)
from ctdx.worker.study import SeriesRef

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesCandidate:
    """The technical attributes of one series that the rules can test."""

    series_instance_uid: str
    series_number: int | None
    modality: str | None
    slice_count: int
    image_type: tuple[str, ...]
    convolution_kernel: str | None
    slice_thickness: float | None
    axial_cosine: float | None  # |z component of the slice normal|; 1 = exactly axial
    number_of_frames: int  # frames per instance (of the first instance): 1 for classic CT
    rows: int | None
    columns: int | None
    sop_class: str | None = None  # SOP Class name, e.g. "Enhanced CT Image Storage"

    def label(self) -> str:
        number = f"series {self.series_number}" if self.series_number is not None else "series"
        return f"{number} ({self.series_instance_uid})"

    def summary(self) -> str:
        thickness = f"{self.slice_thickness:g} mm" if self.slice_thickness else "thickness unknown"
        kernel = self.convolution_kernel or "kernel unknown"
        return f"{self.modality or '?'}, {self.slice_count} slices, {thickness}, kernel {kernel}"


ATTRIBUTES = frozenset(f.name for f in fields(SeriesCandidate))

Op = Literal["in", "excludes", "min", "max", "matches"]


@dataclass(frozen=True)
class Filter:
    attribute: str
    op: Op
    value: Any

    def failure(self, candidate: SeriesCandidate) -> str | None:
        """None when ``candidate`` passes, else why not."""
        value = getattr(candidate, self.attribute)
        if self.op == "excludes":
            present = {str(v).upper() for v in _as_tuple(value)}
            hit = sorted(present & {str(v).upper() for v in self.value})
            return f"{self.attribute} contains {', '.join(hit)}" if hit else None
        if value is None:
            return f"{self.attribute} missing"
        if self.op == "in":
            ok = str(value).upper() in {str(v).upper() for v in self.value}
            return None if ok else f"{self.attribute} {value} not in {list(self.value)}"
        if self.op == "min":
            return None if value >= self.value else f"{self.attribute} {value:g} < {self.value:g}"
        if self.op == "max":
            return None if value <= self.value else f"{self.attribute} {value:g} > {self.value:g}"
        ok = _matches(str(value), self.value)
        return None if ok else f"{self.attribute} {value} matches none of {list(self.value)}"


@dataclass(frozen=True)
class Preference:
    attribute: str
    prefer: Literal["lowest", "highest", "match"]
    patterns: tuple[str, ...] = ()

    def key(self, candidate: SeriesCandidate) -> tuple[int, float]:
        """Sort key: smaller is better."""
        value = getattr(candidate, self.attribute)
        if self.prefer == "match":
            return (0 if value is not None and _matches(str(value), self.patterns) else 1, 0.0)
        if value is None:
            return (1, 0.0)
        number = round(float(value), 3)
        return (0, number if self.prefer == "lowest" else -number)

    def explain(self, best: SeriesCandidate, loser: SeriesCandidate) -> str:
        """Why ``best`` ranks above ``loser`` on this preference."""
        name = self.attribute.replace("_", " ")
        mine, theirs = getattr(loser, self.attribute), getattr(best, self.attribute)
        if self.prefer == "match":
            return f"{name} {mine} is not a preferred one ({theirs} is)"
        return f"{name} {_show(mine)} vs {_show(theirs)} ({self.prefer} preferred)"


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SeriesRules:
    filters: tuple[Filter, ...]
    preferences: tuple[Preference, ...]


@dataclass(frozen=True)
class Selection:
    series: SeriesRef
    candidate: SeriesCandidate
    reason: str


#: Lung or sharp reconstruction kernels of the common vendors (Siemens B6x-B8x, Br6x,
#: Bl (lung); GE LUNG, BONE(PLUS); Philips L, YA-YC; Canon FC5x, FC8x; I70f and up).
LUNG_KERNELS = (
    "*LUNG*", "B6*", "B7*", "B8*", "BR6*", "BR7*", "BL*", "I6*", "I7*", "I8*",
    "BONE*", "L", "YA", "YB", "YC", "FC5*", "FC8*",
)

#: SOP Classes the loader reads (worker/loading.py): classic CT, one slice per instance, and
#: Enhanced CT, many frames per instance described by functional groups.
CT_SOP_CLASSES = (
    "CT Image Storage",
    "Enhanced CT Image Storage",
    "Legacy Converted Enhanced CT Image Storage",
)

DEFAULT_RULES: Mapping[str, Any] = {
    "filters": [
        {"attribute": "modality", "in": ["CT"]},
        {"attribute": "image_type", "excludes": ["LOCALIZER"]},
        {"attribute": "sop_class", "in": list(CT_SOP_CLASSES)},
        {"attribute": "axial_cosine", "min": 0.9},
        {"attribute": "slice_count", "min": 16},
    ],
    "preferences": [
        {"attribute": "convolution_kernel", "prefer_match": list(LUNG_KERNELS)},
        {"attribute": "slice_thickness", "prefer": "lowest"},
        {"attribute": "slice_count", "prefer": "highest"},
        {"attribute": "series_number", "prefer": "lowest"},
    ],
}


class RulesError(ValueError):
    """A rules file or mapping that does not describe a rule set."""


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _matches(value: str, patterns: Sequence[str]) -> bool:
    upper = value.upper()
    return any(fnmatch.fnmatchcase(upper, p.upper()) for p in patterns)


def rules_from_mapping(data: Mapping[str, Any]) -> SeriesRules:
    """Validate and build a rule set; errors name the offending rule."""
    unknown = set(data) - {"filters", "preferences"}
    if unknown:
        raise RulesError(f"unknown keys {sorted(unknown)}; expected filters, preferences")
    filters: list[Filter] = []
    for i, raw in enumerate(data.get("filters", [])):
        attribute = _attribute(raw, f"filters[{i}]")
        ops = [op for op in ("in", "excludes", "min", "max", "matches") if op in raw]
        if len(ops) != 1 or len(raw) != 2:
            raise RulesError(
                f"filters[{i}] needs `attribute` and exactly one of in/excludes/min/max/matches"
            )
        op: Op = ops[0]  # type: ignore[assignment]
        value = raw[op]
        if op in ("min", "max"):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise RulesError(f"filters[{i}].{op} must be a number")
        else:
            value = tuple(str(v) for v in _as_tuple(value))
        filters.append(Filter(attribute, op, value))
    preferences: list[Preference] = []
    for i, raw in enumerate(data.get("preferences", [])):
        attribute = _attribute(raw, f"preferences[{i}]")
        if "prefer_match" in raw and len(raw) == 2:
            patterns = tuple(str(p) for p in _as_tuple(raw["prefer_match"]))
            preferences.append(Preference(attribute, "match", patterns))
        elif raw.get("prefer") in ("lowest", "highest") and len(raw) == 2:
            preferences.append(Preference(attribute, raw["prefer"]))
        else:
            raise RulesError(
                f"preferences[{i}] needs `attribute` and `prefer` (lowest/highest) "
                "or `prefer_match`"
            )
    return SeriesRules(tuple(filters), tuple(preferences))


def _attribute(raw: Any, where: str) -> str:
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where} must be a table/object")
    attribute = raw.get("attribute")
    if attribute not in ATTRIBUTES:
        raise RulesError(
            f"{where}.attribute must be one of {sorted(ATTRIBUTES)}, got {attribute!r}"
        )
    return str(attribute)


def load_rules(path: Path | None) -> SeriesRules:
    """The rules in ``path`` (``.json`` or TOML), or the defaults when ``path`` is None."""
    if path is None:
        return rules_from_mapping(DEFAULT_RULES)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
    except (OSError, ValueError) as exc:
        raise RulesError(f"cannot read series rules {path}: {exc}") from exc
    return rules_from_mapping(data)


def _frame_attribute(ds: Any, macro: str, keyword: str) -> Any:
    """``keyword`` from functional group ``macro`` of the first frame, else the top level."""
    if is_multiframe(ds):
        item = functional_group(ds, 0, macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return ds.get(keyword)


def _sop_class_name(uid: str | None) -> str | None:
    if not uid:
        return None
    name = UID(uid).name
    return name if name and name != uid else uid


def describe_series(series: SeriesRef) -> SeriesCandidate:
    """Technical attributes of ``series`` from its first instance's header (the first that is
    not a localiser, when the series holds other images: see :mod:`ctdx.worker.loading`).

    For a multi-frame series the slice count is the sum of every instance's
    Number of Frames (one header per further instance is read; Enhanced CT
    series usually have a single instance).
    """
    ds = read_header(series.instances[0])
    localizers = 0  # a scanner's localiser first in the axial series: described by the next
    while is_localizer(ds) and localizers + 1 < len(series.instances):
        localizers += 1
        ds = read_header(series.instances[localizers])
    if is_localizer(ds):  # localisers only: described as one, which the filters refuse
        ds, localizers = read_header(series.instances[0]), 0
    axial: float | None = None
    orientation = _frame_attribute(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        try:
            axial = abs(float(slice_normal([float(v) for v in orientation])[2]))
        except ValueError:
            axial = None
    kernel = _frame_attribute(ds, "CTReconstructionSequence", "ConvolutionKernel")
    thickness = _frame_attribute(ds, "PixelMeasuresSequence", "SliceThickness")
    frames = frame_count(ds)
    slice_count = len(series.instances) - localizers
    if is_multiframe(ds):
        slice_count = frames + sum(
            frame_count(read_header(ref)) for ref in series.instances[1:]
        )
    return SeriesCandidate(
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        modality=series.modality or ds.get("Modality"),
        slice_count=slice_count,
        image_type=tuple(str(v).upper() for v in _as_tuple(ds.get("ImageType"))),
        convolution_kernel="\\".join(str(k) for k in _as_tuple(kernel)) or None,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        axial_cosine=axial,
        number_of_frames=frames,
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
        sop_class=_sop_class_name(
            str(ds.get("SOPClassUID", "")) or series.instances[0].sop_class_uid
        ),
    )


def choose(candidates: Sequence[SeriesCandidate], rules: SeriesRules) -> tuple[int, str]:
    """Index of the chosen candidate and the reason; :class:`NoUsableSeries` if none passes."""
    rejected: list[str] = []
    passing: list[int] = []
    for i, cand in enumerate(candidates):
        failures = [f for f in (r.failure(cand) for r in rules.filters) if f]
        if failures:
            rejected.append(f"{cand.label()}: {'; '.join(failures)}")
        else:
            passing.append(i)
    if not passing:
        detail = " | ".join(rejected) if rejected else "the study has no series"
        raise NoUsableSeries(f"no usable CT series: {detail}")

    def key(i: int) -> tuple[Any, ...]:
        return tuple(p.key(candidates[i]) for p in rules.preferences) + (
            candidates[i].series_instance_uid,
        )

    ranked = sorted(passing, key=key)
    best = candidates[ranked[0]]
    parts = [f"analysed {best.label()}: {best.summary()}"]
    others = []
    for i in ranked[1:]:
        loser = candidates[i]
        decisive = next(
            (p for p in rules.preferences if p.key(loser) != p.key(best)), None
        )
        why = decisive.explain(best, loser) if decisive else "tie, broken by Series Instance UID"
        others.append(f"{loser.label()} not chosen: {why}")
    if others:
        parts.append("; ".join(others))
    if rejected:
        parts.append("not candidates: " + " | ".join(rejected))
    return ranked[0], ". ".join(parts)


def select_series(series: Sequence[SeriesRef], rules: SeriesRules) -> Selection:
    """Pick the series to analyse from a study version's series."""
    usable = [s for s in series if s.instances]
    candidates = [describe_series(s) for s in usable]
    index, reason = choose(candidates, rules)
    logger.info("series selection: %s", reason)
    return Selection(series=usable[index], candidate=candidates[index], reason=reason)
