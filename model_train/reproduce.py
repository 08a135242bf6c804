"""``ctdx train reproduce``: the paper's whole grid, then one report.

Recognition: every network of ``[recognition].networks`` (the paper: UP-ResNet18,
P-ResNet18, UP-ResNet50, P-ResNet50) on every fold (5); manifestation: every
network of ``[manifestation].networks`` (P-ResNet18, P-ResNet50) on every fold.
Each fold's data is loaded once and shared by its networks. Finished runs are
skipped and an interrupted run resumes from its last epoch, so the command can
simply be run again after a stop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctdx.model_train.config import Config, dump_toml
from ctdx.model_train.data import (
    ensure_cached,
    load_task_data,
    study_manifest,
    task_folds,
    task_manifest,
)
from ctdx.model_train.method.classes import TASKS
from ctdx.model_train.progress import ProgressBar
from ctdx.model_train.report import write_report
from ctdx.model_train.train import RunSpec, run_dir, run_is_done, run_training

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridResult:
    root: Path
    report: Path
    trained: tuple[str, ...]
    skipped: tuple[str, ...]


def reproduce(
    config: Config,
    root: Path,
    command: str = "",
    progress: bool = False,
    on_run: Callable[[RunSpec, str], None] | None = None,
) -> GridResult:
    """Train every cell of the grid under ``root`` (resuming) and write the report."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(dump_toml(config))
    (root / "command.txt").write_text(command + "\n")
    params = config.preprocess_params()
    trained: list[str] = []
    skipped: list[str] = []
    summaries: dict[str, object] = {}
    for task in TASKS:
        tc = config.task(task)
        if not tc.enabled or not tc.networks:
            continue
        manifest = task_manifest(config, task)
        studies = study_manifest(config) if task == "recognition" else None
        summaries[task] = manifest.summary()
        folds = task_folds(config, task, manifest)
        ensure_cached(config, studies or manifest, params, progress=progress)
        if studies is not None:
            ensure_cached(config, manifest, params, progress=progress)
        selected = tuple(k for k in tc.folds if k < len(folds)) or tuple(range(len(folds)))
        for k in selected:
            specs = [RunSpec(task, net, k) for net in tc.network_specs()]
            todo = [s for s in specs if not run_is_done(run_dir(root, s))]
            skipped += [s.name for s in specs if s not in todo]
            if not todo:
                continue
            data = load_task_data(config, task, folds[k], manifest, params, studies)
            for spec in todo:
                if on_run:
                    on_run(spec, "start")
                bar = (ProgressBar(config.train.epochs * len(data.train), spec.name)
                       if progress else None)
                try:
                    run_training(config, spec, data, run_dir(root, spec), resume=True,
                                 on_batch=bar.advance if bar else None)
                finally:
                    if bar:
                        bar.close()
                trained.append(spec.name)
                if on_run:
                    on_run(spec, "done")
    (root / "data-summary.json").write_text(json.dumps(summaries, indent=1))
    report = write_report(root, config, command, summaries)
    return GridResult(root, report, tuple(trained), tuple(skipped))
