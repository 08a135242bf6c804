"""From a config and a fold to the three in-memory slice sets a training run uses.

A task's rows come from the manifest (recognition: every row, filtered by the
slice policy; manifestation: the rows with a manifestation), are split by
:mod:`ctdx.model_train.splits` (subjects, or images), expanded to slices, and read
from the preprocessing cache. Slices whose lung mask covers less of the image
than ``data.min_lung_fraction`` are left out, because the worker skips them and
never asks the network about them.

The sets hold the ``uint8`` grey images (``(N, 1, S, S)``): the whole data set
of the paper (86,543 slices at 224 x 224) is 4.3 GB, so it sits in memory (or
GPU memory) and a batch is an index, with no data-loader processes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ctdx.model_train.cache import build_cache, load_cached
from ctdx.model_train.config import Config, ConfigError
from ctdx.model_train.manifest import Manifest, apply_slice_policy, read_manifest
from ctdx.model_train.method.classes import Task, classes_for
from ctdx.model_train.method.preprocess import PreprocessParams
from ctdx.model_train.sources import expand_rows
from ctdx.model_train.splits import (
    Split,
    manifestation_folds,
    recognition_folds,
    rows_in,
)

logger = logging.getLogger(__name__)

SetName = Literal["train", "validation", "test"]
SET_NAMES: tuple[SetName, ...] = ("train", "validation", "test")


class DataError(ValueError):
    """The data cannot feed this run (an empty set, a missing manifest)."""


@dataclass(frozen=True)
class SliceSet:
    """Slices of one set, aligned arrays."""

    gray: Tensor  # (N, 1, S, S) uint8
    labels: Tensor  # (N,) int64, index into the task's classes
    subjects: tuple[str, ...]
    studies: tuple[str, ...]
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, classes: tuple[str, ...]) -> dict[str, int]:
        counts = Counter(self.labels.tolist())
        return {c: counts.get(i, 0) for i, c in enumerate(classes)}


@dataclass(frozen=True)
class TaskData:
    task: Task
    split: Split
    classes: tuple[str, ...]
    train: SliceSet
    validation: SliceSet
    test: SliceSet
    test_studies: SliceSet | None = None
    """Recognition: every slice the worker would analyse of the test studies (no slice
    policy), for the study-level evaluation; None for the manifestation task."""

    def summary(self) -> dict[str, object]:
        """Counts per set and class; no identifiers (goes into exported checkpoints)."""
        out: dict[str, object] = {"task": self.task, "fold": self.split.fold}
        for name in SET_NAMES:
            s: SliceSet = getattr(self, name)
            out[name] = {
                "slices": len(s),
                "subjects": len(set(s.subjects)),
                "studies": len(set(s.studies)),
                "per_class": s.class_counts(self.classes),
            }
        return out


def task_unit(task: Task) -> str:
    """The split unit: subjects for recognition, images for manifestations (paper, Fig. 1)."""
    return "subject" if task == "recognition" else "image"


def task_manifest(config: Config, task: Task) -> Manifest:
    """The manifest rows of ``task`` (slice policy applied for recognition)."""
    if task == "recognition":
        if config.data.manifest is None:
            raise ConfigError("no manifest: give --manifest or set data.manifest")
        return apply_slice_policy(read_manifest(config.data.manifest), config.data.slice_policy)
    path = config.data.manifestation_manifest or config.data.manifest
    if path is None:
        raise ConfigError("no manifest: give --manifest or set data.manifest")
    rows = read_manifest(path).manifestation_rows()
    if not rows.rows:
        raise DataError(f"{path}: no rows with a manifestation (the manifestation task needs them)")
    return rows


def study_manifest(config: Config) -> Manifest:
    """The recognition manifest without the slice policy: what the worker sees of a study."""
    if config.data.manifest is None:
        raise ConfigError("no manifest: give --manifest or set data.manifest")
    return read_manifest(config.data.manifest)


def task_folds(config: Config, task: Task, manifest: Manifest) -> tuple[Split, ...]:
    """The folds of ``task``: from ``split.file`` when set, else the ring construction.

    The split file names subjects of the recognition manifest; a separate manifestation
    manifest (``data.manifestation_manifest``) keeps the ring construction.
    """
    own_manifest = task == "recognition" or config.data.manifestation_manifest is None
    if config.split.file is not None and own_manifest:
        from ctdx.model_train.split_file import folds_from_file

        return folds_from_file(config.split.file, manifest, task_unit(task))
    make = recognition_folds if task == "recognition" else manifestation_folds
    return make(manifest, config.split.seed, config.split.folds, config.split.holdout_percent)


def ensure_cached(config: Config, manifest: Manifest, params: PreprocessParams,
                  progress: bool = False) -> None:
    """Build the cache for every slice of the manifest (no-op when it is complete)."""
    report = build_cache(expand_rows(manifest.rows), config.data.cache_dir, params,
                         workers=config.data.cache_workers, progress=progress)
    if report.failures:
        logger.warning("%d slices could not be preprocessed and are left out",
                       len(report.failures))


def _slice_set(config: Config, task: Task, manifest: Manifest, keys: tuple[str, ...],
               params: PreprocessParams, name: str) -> SliceSet:
    """The usable slices of the rows whose unit key is in ``keys``."""
    classes = classes_for(task)
    if not keys and name != "train":  # a split file may leave validation or test empty
        return empty_slice_set(config.preprocess.size)
    rows = rows_in(manifest, keys, task_unit(task))
    sources = expand_rows(rows)
    cached = load_cached(sources, config.data.cache_dir, params)
    keep = cached.present & (cached.lung_fraction >= config.data.min_lung_fraction)
    dropped_lung = int((cached.present & ~keep).sum())
    if dropped_lung:
        logger.info("%s: %d slices left out (lung under %.0f%% of the image)",
                    name, dropped_lung, 100 * config.data.min_lung_fraction)
    labels = []
    for s in sources:
        row = rows[s.row]
        labels.append(classes.index(row.label if task == "recognition" else str(row.manifestation)))
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise DataError(f"the {name} set of task {task} has no usable slice")
    gray = torch.from_numpy(cached.gray[idx]).unsqueeze(1)
    return SliceSet(
        gray=gray,
        labels=torch.tensor([labels[i] for i in idx], dtype=torch.int64),
        subjects=tuple(rows[sources[i].row].subject for i in idx),
        studies=tuple(rows[sources[i].row].study for i in idx),
        paths=tuple(str(sources[i].path) for i in idx),
    )


def load_slice_set(config: Config, task: Task, manifest: Manifest, keys: tuple[str, ...],
                   params: PreprocessParams, name: str) -> SliceSet:
    """The usable cached slices of the rows whose unit key is in ``keys`` (one set)."""
    return _slice_set(config, task, manifest, keys, params, name)


def empty_slice_set(size: int) -> SliceSet:
    """A set with no slices (an empty validation or test set of a split file)."""
    return SliceSet(torch.zeros((0, 1, size, size), dtype=torch.uint8),
                    torch.zeros(0, dtype=torch.int64), (), (), ())


def load_task_data(config: Config, task: Task, split: Split, manifest: Manifest,
                   params: PreprocessParams, studies: Manifest | None = None) -> TaskData:
    """The three sets of one fold, read from the (already built) cache.

    ``studies`` (recognition): the manifest without slice policy; its rows of the
    test subjects become :attr:`TaskData.test_studies`.
    """
    sets = {name: _slice_set(config, task, manifest, getattr(split, name), params, name)
            for name in SET_NAMES}
    test_studies = None
    if studies is not None and task == "recognition" and split.test:
        test_studies = _slice_set(config, task, studies, split.test, params, "test studies")
    cap = config.train.max_train_slices
    if cap and len(sets["train"]) > cap:
        rng = np.random.default_rng(config.train.seed)
        pick = np.sort(rng.choice(len(sets["train"]), size=cap, replace=False))
        t = sets["train"]
        sets["train"] = SliceSet(t.gray[pick], t.labels[pick],
                                 tuple(t.subjects[i] for i in pick),
                                 tuple(t.studies[i] for i in pick),
                                 tuple(t.paths[i] for i in pick))
    data = TaskData(task, split, classes_for(task), sets["train"], sets["validation"],
                    sets["test"], test_studies)
    logger.info("task %s fold %d: %s", task, split.fold,
                {n: len(getattr(data, n)) for n in SET_NAMES})
    return data
