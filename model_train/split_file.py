"""Splits as data: ``--split-file FILE`` (``split.file`` in the config).

A CSV with a header and one row per subject::

    subject,role,fold
    S001,train,0
    S002,val,0
    S003,test,0

``role`` is ``train``, ``val`` (or ``validation``) or ``test``; ``fold`` is optional
(default 0) and lets one file hold several folds (a subject then has one row per
fold). Validation and test sets may be empty: with all subjects in ``train`` the
model kept is the last epoch (:mod:`ctdx.model_train.train`), and a test set may be
another site's subjects (an external test set inside the same manifest).

Subjects of the manifest that the file does not name are left out (with a log
line); a subject the file names that is not in the manifest is an error, as is a
subject in two roles of one fold. The unit is the subject for both tasks: for the
manifestation task each image goes where its subject goes.

A run folder records the split it used (``split.json``), so ``export`` and its int8
calibration read the split from there and never rebuild it.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

from ctdx.model_train.manifest import Manifest
from ctdx.model_train.splits import Split, SplitError, image_key

logger = logging.getLogger(__name__)

ROLES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def read_split_file(path: Path) -> dict[int, dict[str, str]]:
    """fold -> subject -> set name (``train`` / ``validation`` / ``test``)."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file not found: {path}")
    folds: dict[int, dict[str, str]] = defaultdict(dict)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ("subject", "role") if c not in header]
        unknown = [c for c in header if c not in ("subject", "role", "fold")]
        if missing or unknown:
            raise SplitError(f"{path}: the header must be subject,role[,fold]; "
                             f"missing {missing}, unknown {unknown}")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            subject, role = row.get("subject", ""), row.get("role", "").lower()
            if not subject:
                raise SplitError(f"{path}:{line}: empty subject")
            if role not in ROLES:
                raise SplitError(f"{path}:{line}: role {role!r} is not train, val or test")
            fold_text = row.get("fold") or "0"
            try:
                fold = int(fold_text)
            except ValueError:
                raise SplitError(f"{path}:{line}: fold {fold_text!r} is not an integer") from None
            if fold < 0:
                raise SplitError(f"{path}:{line}: fold must not be negative")
            seen = folds[fold].get(subject)
            if seen is not None and seen != ROLES[role]:
                raise SplitError(f"{path}:{line}: subject {subject!r} is in {seen} and "
                                 f"{ROLES[role]} in fold {fold}")
            folds[fold][subject] = ROLES[role]
    if not folds:
        raise SplitError(f"{path}: no rows")
    return dict(folds)


def folds_from_file(path: Path, manifest: Manifest, unit: str) -> tuple[Split, ...]:
    """The folds of a split file for a task whose unit is ``subject`` or ``image``.

    Folds are numbered as in the file and must be 0..n-1 (``--fold k`` picks one).
    """
    table = read_split_file(path)
    numbers = sorted(table)
    if numbers != list(range(len(numbers))):
        raise SplitError(f"{path}: folds must be numbered 0..{len(numbers) - 1}, got {numbers}")
    subjects = {r.subject for r in manifest.rows}
    out: list[Split] = []
    for k in numbers:
        roles = table[k]
        unknown = sorted(set(roles) - subjects)
        if unknown:
            raise SplitError(f"{path}: fold {k}: {len(unknown)} subject(s) not in the manifest "
                             f"{manifest.source or ''}, e.g. {unknown[0]!r}")
        left = subjects - set(roles)
        if left:
            logger.info("split file fold %d: %d manifest subject(s) not named, left out",
                        k, len(left))
        sets: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
        if unit == "subject":
            for subject in sorted(roles):
                sets[roles[subject]].append(subject)
        else:
            for r in manifest.rows:
                if r.subject in roles:
                    sets[roles[r.subject]].append(image_key(r))
        if not sets["train"]:
            raise SplitError(f"{path}: fold {k} has no training {unit}s")
        out.append(Split(k, tuple(sets["train"]), tuple(sets["validation"]),
                         tuple(sets["test"])))
    return tuple(out)

