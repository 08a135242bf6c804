"""Train / validation / test splits and the paper's overlapping five-fold cross-validation.

The paper (section "Datasets") splits subjects 70% / 15% / 15% and adds "a
fivefold cross-validation ... there will be 10% overlap in subjects between two
adjacent folds". It does not say more, so this module fixes one exact reading,
chosen because it makes every number consistent with 70/15/15:

1. **Stratified ring.** The items (subjects for recognition, images for the
   manifestation task) are put in one seeded order, the *ring*, in which the
   classes are interleaved evenly: within class ``c`` (``n_c`` items, shuffled
   with the seed) item ``j`` gets the key ``(j + u_c) / n_c`` with a seeded
   offset ``u_c`` in [0, 1); all items are sorted by key (ties by class name).
   Every stretch of the ring therefore holds each class in proportion, within
   about one item ("class-stratified where possible": a class with one subject
   can only be in one place).
2. **Boundaries.** With ``N`` items, ring position ``p`` percent is the index
   ``b(p) = floor(N * p / 100 + 1/2)``; indices at or past ``N`` wrap around.
3. **Fold k** (k = 0..4) holds out the window ``[b(20k), b(20k + 30))``, 30% of
   the ring: its first half ``[b(20k), b(20k + 15))`` is the **validation** set
   and ``[b(20k + 15), b(20k + 30))`` the **test** set. The other 70% is the
   **training** set.
4. **Overlap.** The windows of folds ``k`` and ``k + 1`` (and of fold 4 and fold 0:
   the ring closes) share exactly the items ``[b(20k + 20), b(20k + 30))``:
   10% of the items, the last two thirds of fold ``k``'s test set, which are the
   first two thirds of fold ``k + 1``'s validation set.
5. Consequences: the five test sets are disjoint (they cover 75% of the items),
   so the pooled test predictions of all folds hold every item at most once;
   the five validation sets are disjoint too; and fold 0 is the single
   70/15/15 split used when only one split is wanted.

In general, with ``n_folds`` folds and a held-out share ``h`` (validation and
test halves of it), the step is ``100 / n_folds`` and the overlap of adjacent
folds is ``h - 100 / n_folds`` percent (30 - 20 = 10 for the paper).

The unit is the subject for the recognition task (all studies and slices of a
subject land in the same set) and the image for the manifestation task, as in
the paper's Fig. 1.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ctdx.model_train.manifest import Manifest, ManifestRow

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
DEFAULT_HOLDOUT_PERCENT = 30


class SplitError(ValueError):
    """The data cannot be split as asked (too few items for non-empty sets)."""


@dataclass(frozen=True)
class Split:
    """One fold: item keys (subject ids or image keys) of each set."""

    fold: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def set_of(self, key: str) -> str | None:
        for name in ("train", "validation", "test"):
            if key in getattr(self, name):
                return name
        return None


def stratified_ring(strata: Mapping[str, str], seed: int) -> list[str]:
    """Item keys in the seeded, class-interleaved ring order (step 1 of the module doc)."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key in sorted(strata):
        by_class[strata[key]].append(key)
    keyed: list[tuple[float, int, str]] = []
    for ci, cls in enumerate(sorted(by_class)):
        members = [by_class[cls][i] for i in rng.permutation(len(by_class[cls]))]
        offset = float(rng.uniform(0.0, 1.0))
        n_c = len(members)
        keyed.extend(((j + offset) / n_c, ci, key) for j, key in enumerate(members))
    keyed.sort()
    return [key for _, _, key in keyed]


def ring_index(n: int, percent: Fraction | int) -> int:
    """``b(p) = floor(n * p / 100 + 1/2)`` (may be >= n: callers wrap it)."""
    return int(Fraction(n) * Fraction(percent) / 100 + Fraction(1, 2))


def _window(ring: Sequence[str], start: Fraction, stop: Fraction) -> tuple[str, ...]:
    n = len(ring)
    lo, hi = ring_index(n, start), ring_index(n, stop)
    return tuple(ring[i % n] for i in range(lo, hi))


def make_folds(
    strata: Mapping[str, str],
    seed: int,
    n_folds: int = DEFAULT_FOLDS,
    holdout_percent: int = DEFAULT_HOLDOUT_PERCENT,
) -> tuple[Split, ...]:
    """All folds over ``strata`` (item key -> class), as the module doc specifies."""
    if n_folds < 1:
        raise SplitError(f"n_folds must be at least 1, got {n_folds}")
    if not 0 < holdout_percent < 100:
        raise SplitError(f"holdout_percent must be between 0 and 100, got {holdout_percent}")
    step = Fraction(100, n_folds)
    if holdout_percent < step and n_folds > 1:
        logger.warning("held-out windows (%d%%) do not cover the ring with %d folds",
                       holdout_percent, n_folds)
    ring = stratified_ring(strata, seed)
    half = Fraction(holdout_percent, 2)
    folds: list[Split] = []
    for k in range(n_folds):
        start = step * k
        validation = _window(ring, start, start + half)
        test = _window(ring, start + half, start + holdout_percent)
        held = set(validation) | set(test)
        if not validation or not test:
            raise SplitError(f"fold {k}: " + too_few_message(len(ring), holdout_percent))
        train = tuple(key for key in ring if key not in held)
        if not train:
            raise SplitError(f"fold {k}: no items left for training")
        folds.append(Split(k, train, validation, test))
    return tuple(folds)


def too_few_message(n_items: int, holdout_percent: int) -> str:
    """What a researcher can do when the ring split cannot be built (small data sets)."""
    need = int(200 / holdout_percent) + 1
    return (f"{n_items} items are too few for non-empty validation and test sets "
            f"({holdout_percent / 2:g}% each); need at least {need}. With fewer, use "
            f"--split-file FILE (CSV subject,role[,fold]; role train, val or test): e.g. "
            f"all {n_items} subjects in train (the last epoch is kept), or another site's "
            f"subjects as test (docs/training.md, 'Small data sets')")


def adjacent_overlap(a: Split, b: Split) -> set[str]:
    """Items held out (validation or test) by both folds."""
    return (set(a.validation) | set(a.test)) & (set(b.validation) | set(b.test))


# --- the two tasks ------------------------------------------------------------------


def image_key(row: ManifestRow) -> str:
    """The unit of the manifestation split: one image (its path)."""
    return str(row.path)


def recognition_folds(manifest: Manifest, seed: int, n_folds: int = DEFAULT_FOLDS,
                      holdout_percent: int = DEFAULT_HOLDOUT_PERCENT) -> tuple[Split, ...]:
    """Folds over subjects, stratified by each subject's class."""
    return make_folds(manifest.subject_class(), seed, n_folds, holdout_percent)


def manifestation_folds(manifest: Manifest, seed: int, n_folds: int = DEFAULT_FOLDS,
                        holdout_percent: int = DEFAULT_HOLDOUT_PERCENT) -> tuple[Split, ...]:
    """Folds over images with a manifestation, stratified by manifestation."""
    strata = {image_key(r): str(r.manifestation) for r in manifest.rows if r.manifestation}
    if not strata:
        raise SplitError("no rows with a manifestation in the manifest")
    return make_folds(strata, seed, n_folds, holdout_percent)


def rows_in(manifest: Manifest, keys: Sequence[str], unit: str) -> tuple[ManifestRow, ...]:
    """The manifest rows whose subject (``unit='subject'``) or image (``'image'``) is in keys."""
    wanted = set(keys)
    if unit == "subject":
        return tuple(r for r in manifest.rows if r.subject in wanted)
    if unit == "image":
        return tuple(r for r in manifest.rows if image_key(r) in wanted)
    raise ValueError(f"unit must be 'subject' or 'image', got {unit!r}")


def write_split(split: Split, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(split), indent=1))


def read_split(path: Path) -> Split:
    raw = json.loads(Path(path).read_text())
    return Split(int(raw["fold"]), tuple(raw["train"]), tuple(raw["validation"]),
                 tuple(raw["test"]))
