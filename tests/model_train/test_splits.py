"""Split invariants: no subject in two sets, the 10% overlap of adjacent folds, class balance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ctdx.model_train.manifest import ManifestRow, validate_rows
from ctdx.model_train.splits import (
    SplitError,
    adjacent_overlap,
    make_folds,
    manifestation_folds,
    recognition_folds,
    ring_index,
    rows_in,
    stratified_ring,
)

CLASSES = ("covid19", "other_pneumonia", "normal")


def _strata(counts: dict[str, int]) -> dict[str, str]:
    return {f"{cls}-{i:03d}": cls for cls, n in counts.items() for i in range(n)}


@pytest.mark.parametrize("counts", [
    {"covid19": 72, "other_pneumonia": 252, "normal": 98},  # the paper's subjects
    {"covid19": 7, "other_pneumonia": 5, "normal": 9},
    {"covid19": 40, "other_pneumonia": 40, "normal": 40},
])
def test_folds_partition_and_overlap(counts: dict[str, int]) -> None:
    strata = _strata(counts)
    n = len(strata)
    folds = make_folds(strata, seed=3)
    assert len(folds) == 5
    for f in folds:
        sets = [set(f.train), set(f.validation), set(f.test)]
        # every subject in exactly one set of each fold
        assert sum(len(s) for s in sets) == n
        assert set().union(*sets) == set(strata)
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(f.validation) == ring_index(n, 20 * f.fold + 15) - ring_index(n, 20 * f.fold)
        assert abs(len(f.test) - 0.15 * n) <= 1
        assert abs(len(f.train) - 0.70 * n) <= 2
    for k in range(5):
        a, b = folds[k], folds[(k + 1) % 5]
        shared = adjacent_overlap(a, b)
        # exactly ring positions [b(20k+20), b(20k+30)): 10% of the subjects
        assert len(shared) == ring_index(n, 20 * k + 30) - ring_index(n, 20 * k + 20)
        assert abs(len(shared) - 0.10 * n) <= 1
        # the shared subjects are fold k's test and fold k+1's validation
        assert shared <= set(a.test) and shared <= set(b.validation)
        # non-adjacent folds share nothing
        assert not adjacent_overlap(a, folds[(k + 2) % 5])
    tests = [set(f.test) for f in folds]
    assert sum(len(t) for t in tests) == len(set().union(*tests))  # test sets are disjoint


def test_folds_are_class_stratified() -> None:
    counts = {"covid19": 72, "other_pneumonia": 252, "normal": 98}
    strata = _strata(counts)
    n = len(strata)
    for f in make_folds(strata, seed=11):
        for part in (f.train, f.validation, f.test):
            got = Counter(strata[k] for k in part)
            for cls, total in counts.items():
                assert abs(got[cls] - len(part) * total / n) <= 2, (f.fold, cls, got)


def test_folds_are_seeded() -> None:
    strata = _strata({"covid19": 20, "normal": 20})
    assert make_folds(strata, seed=1) == make_folds(strata, seed=1)
    assert make_folds(strata, seed=1) != make_folds(strata, seed=2)
    assert stratified_ring(strata, 5) == stratified_ring(dict(reversed(strata.items())), 5)


def test_too_few_subjects_is_a_clear_error() -> None:
    with pytest.raises(SplitError, match="too few"):
        make_folds(_strata({"covid19": 1, "normal": 2}), seed=0)


def _row(subject: str, study: str, cls: str, i: int,
         manifestation: str | None = None) -> ManifestRow:
    return ManifestRow(subject=subject, study=study, path=Path(f"/x/{subject}/{study}/{i}.dcm"),
                       label=cls, manifestation=manifestation)


def test_recognition_folds_keep_subjects_whole() -> None:
    rows = []
    for s in range(30):
        cls = CLASSES[s % 3]
        for st in range(1 + s % 3):  # several studies per subject
            rows += [_row(f"S{s}", f"S{s}-{st}", cls, i) for i in range(4)]
    manifest = validate_rows(rows)
    for f in recognition_folds(manifest, seed=0):
        subjects = {name: {r.subject for r in rows_in(manifest, getattr(f, name), "subject")}
                    for name in ("train", "validation", "test")}
        assert not subjects["train"] & subjects["validation"]
        assert not subjects["train"] & subjects["test"]
        assert not subjects["validation"] & subjects["test"]
        assert sum(len(rows_in(manifest, getattr(f, n), "subject"))
                   for n in ("train", "validation", "test")) == len(rows)


def test_manifestation_folds_split_by_image() -> None:
    kinds = ("ground_glass_opacity", "consolidation", "fibrotic_streaks")
    rows = [_row("one-patient", "one-study", "covid19", i, kinds[i % 3]) for i in range(40)]
    manifest = validate_rows(rows)
    folds = manifestation_folds(manifest, seed=0)
    f = folds[0]
    assert len(f.train) + len(f.validation) + len(f.test) == 40
    assert {len(f.test) for f in folds} == {6}
    got = Counter(r.manifestation for r in rows_in(manifest, f.test, "image"))
    assert set(got) == set(kinds)
