"""``ctdx train export``: a trained run -> the checkpoint format the worker loads.

The exported file is written with :func:`ctdx.model_train.method.checkpoint.save_checkpoint`
and carries the model name and version, a **new model UID** (a DICOM UID that
the SR reports as the algorithm identity: each export is a distinct model), the
task's class names, the preprocessing parameters the run was trained with, the
method version, and a summary of the training data (counts per set and class,
the manifest's file name, fold, epochs; no subject identifiers).

With ``int8=True`` the checkpoint also carries int8 weights for CPU serving
(``ctdx.model_train.method.quantize``): calibrated on the run's training slices and
checked against fp32 on its validation and test slices (read from the run's
preprocessing cache); the export fails when they agree less than
``min_agreement``. Where ``onnx`` and ``onnxruntime`` are installed, an ONNX Runtime
int8 model is made from the same slices and checked by the same gate
(``ctdx.model_train.method.onnx_runtime``); the worker serves whichever is faster on
its host. The split is the one the run recorded (``split.json``), never
rebuilt from the configuration (``split_file`` overrides it).

``RUN`` is either one run folder (``.../<task>/<network>/fold-<k>``) or the root
of a reproduction. From a root, the network is the one given, else the one with
the best mean validation accuracy over folds; the fold is the one with the best
validation accuracy. Test results never choose the model.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctdx.model_train.config import Config, NetworkSpec, config_from_dict
from ctdx.model_train.method.checkpoint import (
    CheckpointMeta,
    Int8Weights,
    OnnxInt8,
    save_checkpoint,
)
from ctdx.model_train.method.classes import Task
from ctdx.model_train.method.networks import build_resnet
from ctdx.model_train.metrics import mean_sd
from ctdx.model_train.report import collect_runs
from ctdx.model_train.splits import Split, read_split
from ctdx.model_train.train import load_train_checkpoint

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Nothing exportable at the given path; the message says what is missing."""


@dataclass(frozen=True)
class Exported:
    path: Path
    meta: CheckpointMeta
    run: Path


def _run_config(run: Path) -> Config:
    raw = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    return config_from_dict(raw, run)


def choose_run(root: Path, task: Task, network: str | None = None) -> Path:
    """The run folder to export from a reproduction root (see the module doc)."""
    runs = [r for r in collect_runs(root) if r.task == task]
    if network is not None:
        name = NetworkSpec.parse(network).name
        runs = [r for r in runs if r.network == name]
    if not runs:
        raise ExportError(f"no finished {task} runs{' of ' + network if network else ''} "
                          f"under {root}")
    if network is None:
        by_net: dict[str, list[float]] = {}
        for r in runs:
            by_net.setdefault(r.network, []).append(_val_accuracy(r.result))
        best_net = max(by_net, key=lambda n: mean_sd(by_net[n])[0])
        runs = [r for r in runs if r.network == best_net]
    best = max(runs, key=lambda r: (_val_accuracy(r.result), -r.fold))
    return best.path


def _val_accuracy(result: dict[str, Any]) -> float:
    """Validation accuracy for choosing a run; -inf without a validation set."""
    v = _overall(result, "validation")
    return -math.inf if v is None else float(v)


def export_run(
    run: Path,
    out: Path,
    model_name: str | None = None,
    model_version: str = "1.0",
    task: Task = "recognition",
    network: str | None = None,
    int8: bool = False,
    min_agreement: float = 0.99,
    split_file: Path | None = None,
) -> Exported:
    """Write the worker checkpoint of ``run`` (a run folder or a reproduction root) to ``out``."""
    run = Path(run)
    if not (run / "result.json").is_file():
        run = choose_run(run, task, network)
    result = json.loads((run / "result.json").read_text())
    best = run / "checkpoint-best.pt"
    if not best.is_file():
        raise ExportError(f"{run}: no checkpoint-best.pt")
    config = _run_config(run)
    spec = NetworkSpec.parse(result["network"])
    run_task = typing.cast(Task, result["task"])
    model = build_resnet(spec.arch, num_classes=3)
    model.load_state_dict(load_train_checkpoint(best)["model"])
    name = model_name or f"ctdx {spec.name} {run_task}"
    manifest = config.data.manifest if run_task == "recognition" else (
        config.data.manifestation_manifest or config.data.manifest)
    training_data: dict[str, Any] = {
        "run": result["run"],
        "fold": result["fold"],
        "epochs": result["epochs"],
        "best_epoch": result["best_epoch"],
        "manifest": manifest.name if manifest else None,
        "split_seed": config.split.seed,
        "slice_policy": config.data.slice_policy,
        "sets": result["data"],
        "validation_overall_accuracy": _overall(result, "validation"),
        "test_overall_accuracy": _overall(result, "test"),
        "selection": result.get("selection"),
        "pretrained": spec.pretrained,
    }
    meta = CheckpointMeta.new(
        task=run_task, arch=spec.arch, model_name=name, model_version=model_version,
        training_data=_plain(training_data), preprocess=config.preprocess_params(),
    )
    weights8, onnx8 = _run_int8(model, config, run_task,
                                run_split(run, split_file, config, run_task),
                                min_agreement) if int8 else (None, None)
    save_checkpoint(out, model, meta, int8=weights8, onnx_int8=onnx8)
    logger.info("exported %s as %s %s (uid %s)", run, name, model_version, meta.model_uid)
    return Exported(Path(out), meta, run)


def _overall(result: dict[str, Any], name: str) -> float | None:
    part = result.get(name)
    return None if part is None else typing.cast(float | None, part["overall_accuracy"])


def run_split(run: Path, split_file: Path | None, config: Config, task: Task) -> Split:
    """The split a run used: its ``split.json`` (written by every run), or, when given, fold
    ``result.fold`` of a split file; rebuilt from the config only for runs without one."""
    from ctdx.model_train.data import task_folds, task_manifest

    fold = int(json.loads((run / "result.json").read_text())["fold"])
    if split_file is not None:
        config = replace(config, split=replace(config.split, file=Path(split_file)))
    elif (run / "split.json").is_file():
        return read_split(run / "split.json")
    folds = task_folds(config, task, task_manifest(config, task))
    if not 0 <= fold < len(folds):
        raise ExportError(f"{run}: fold {fold} is not in the split (folds 0..{len(folds) - 1})")
    return folds[fold]


def _run_int8(model: nn.Module, config: Config, task: Task, split: Split,
              min_agreement: float) -> tuple[Int8Weights, OnnxInt8 | None]:
    """int8 weights from the run's own split: train slices calibrate, held-out slices check
    (the training slices when the split has no validation or test set). The ONNX Runtime
    model is made likewise where ``onnx`` and ``onnxruntime`` are installed, else None."""
    from ctdx.model_train.data import SliceSet, load_task_data, task_manifest
    from ctdx.model_train.int8 import int8_weights, onnx_int8_weights
    from ctdx.model_train.method.onnx_runtime import onnx_int8_available
    from ctdx.model_train.method.quantize import QuantizationError

    params = config.preprocess_params()
    manifest = task_manifest(config, task)
    data = load_task_data(config, task, split, manifest, params)
    fold = split.fold
    if len(data.validation) + len(data.test) == 0:
        held_out = data.train
        evaluation_source = (f"training set of fold {fold} (no held-out set in the split; "
                             f"{len(data.train)} slices)")
    else:
        held_out = SliceSet(
            torch.cat([data.validation.gray, data.test.gray]),
            torch.cat([data.validation.labels, data.test.labels]),
            data.validation.subjects + data.test.subjects,
            data.validation.studies + data.test.studies,
            data.validation.paths + data.test.paths,
        )
        evaluation_source = f"validation and test sets of fold {fold} ({len(held_out)} slices)"
    weights = int8_weights(model, params, data.train, held_out,
                           calibration_source=f"training set of fold {fold}",
                           evaluation_source=evaluation_source,
                           min_agreement=min_agreement, seed=config.split.seed)
    if not onnx_int8_available():
        logger.info("no ONNX Runtime int8 model: onnx / onnxruntime are not installed")
        return weights, None
    try:
        onnx = onnx_int8_weights(model, params, data.train, held_out,
                                 calibration_source=f"training set of fold {fold}",
                                 evaluation_source=evaluation_source,
                                 min_agreement=min_agreement, seed=config.split.seed)
    except QuantizationError as exc:  # optional: the checked torch int8 weights still serve
        logger.warning("ONNX Runtime int8 model not exported: %s", exc)
        return weights, None
    return weights, onnx


def _plain(value: Any) -> Any:
    """Only plain types for the checkpoint (NaN, which JSON viewers reject, becomes None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
