"""``ctdx train evaluate MODEL --manifest EXTERNAL.csv --out DIR``: an external test set.

What a site or a reviewer does with a model trained elsewhere: an exported
checkpoint (``ctdx train export``) is run on a labelled manifest it never saw,
through the same preprocessing as training and serving (the checkpoint's own
``PreprocessParams``, the same cache), and the paper's tables are written for
that set by the same report code as a reproduction (:mod:`ctdx.model_train.report`).

The set is every subject of the manifest (or the ``test`` subjects of a split
file). It becomes one run folder ``DIR/<task>/<network>/fold-0/`` whose test set
is the external set: slice-level predictions under the slice policy the model
was trained with (recorded in the checkpoint; ``lesion_only`` for old ones), and,
for recognition, every slice the worker would analyse (no slice policy) for the
study level (Table 5, Figs. 6, 7). ``DIR/report/`` then holds Tables 1-2 (or 3-4),
the AUCs, Table 5 and the figures; mean (sd) over folds is over this one set
(sd n/a), p-values need several networks and are n/a.
"""

from __future__ import annotations

import json
import logging
import math
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctdx.model_train.config import Config, NetworkSpec
from ctdx.model_train.data import SliceSet, ensure_cached, load_slice_set, task_unit
from ctdx.model_train.manifest import Manifest, apply_slice_policy, read_manifest
from ctdx.model_train.method.checkpoint import load_checkpoint, read_checkpoint_meta
from ctdx.model_train.method.classes import Task, classes_for
from ctdx.model_train.method.inference import Precision, SliceClassifier
from ctdx.model_train.method.preprocess import gray_from_uint8, to_network_input
from ctdx.model_train.report import write_report
from ctdx.model_train.splits import image_key
from ctdx.model_train.train import Evaluation, _json_default, _metrics_dict, _write_predictions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExternalResult:
    report: Path
    run: Path
    slices: int
    studies: int


def _predict(classifier: SliceClassifier, data: SliceSet, batch_size: int = 64) -> Evaluation:
    params = classifier.meta.preprocess
    parts = []
    for i in range(0, len(data), batch_size):
        x = to_network_input(gray_from_uint8(data.gray[i : i + batch_size], params), params)
        parts.append(classifier.predict(x))
    probs = (np.concatenate(parts).astype(np.float32) if parts
             else np.zeros((0, 3), np.float32))
    labels = data.labels.numpy()
    eps = 1e-12
    loss = (float(-np.log(probs[np.arange(len(labels)), labels] + eps).mean()) if len(labels)
            else math.nan)
    acc = float((probs.argmax(axis=1) == labels).mean()) if len(labels) else math.nan
    return Evaluation(loss, acc, probs, labels)


def _keys(manifest: Manifest, task: Task, split_file: Path | None) -> tuple[str, ...]:
    subjects = {r.subject for r in manifest.rows}
    if split_file is not None:
        from ctdx.model_train.split_file import read_split_file

        named = {s for roles in read_split_file(split_file).values()
                 for s, role in roles.items() if role == "test"}
        subjects &= named
    if task_unit(task) == "subject":
        return tuple(sorted(subjects))
    return tuple(image_key(r) for r in manifest.rows if r.subject in subjects)


def evaluate_external(
    model_path: Path,
    manifest_path: Path,
    out: Path,
    config: Config,
    split_file: Path | None = None,
    precision: Precision = "fp32",
    command: str = "",
) -> ExternalResult:
    """Run ``model_path`` on ``manifest_path`` and write ``out/report/`` (see the module doc).

    ``config`` supplies the cache folder, the lung-fraction filter, the device and the
    study thresholds; the preprocessing and the slice policy come from the checkpoint.
    """
    meta = read_checkpoint_meta(model_path)
    task = meta.task
    loaded = load_checkpoint(model_path, task=task, device=config.train.device)
    classifier = SliceClassifier(loaded, device=config.train.device, precision=precision)
    params = meta.preprocess
    network = NetworkSpec(arch=meta.arch,
                          pretrained=bool(meta.training_data.get("pretrained", False))).name
    policy = str(meta.training_data.get("slice_policy") or "lesion_only")
    full = read_manifest(manifest_path)
    if task == "recognition":
        rows = apply_slice_policy(full, typing.cast(Any, policy))
    else:
        rows = full.manifestation_rows()
    keys = _keys(rows, task, split_file)
    if not keys:
        raise ValueError(f"{manifest_path}: no {task_unit(task)}s to evaluate"
                         + (" (no test subject of the split file is in it)" if split_file
                            else ""))
    cfg = replace(config, data=replace(config.data, manifest=Path(manifest_path).absolute(),
                                       slice_policy=typing.cast(Any, policy)),
                  evaluation=replace(config.evaluation, study_network=network),
                  preprocess=replace(config.preprocess, size=params.size))
    tc = replace(cfg.task(task), networks=(network,), folds=())
    cfg = (replace(cfg, recognition=tc) if task == "recognition"
           else replace(cfg, manifestation=tc))
    ensure_cached(cfg, full if task == "recognition" else rows, params)

    run = out / task / network / "fold-0"
    run.mkdir(parents=True, exist_ok=True)
    classes = classes_for(task)
    data = load_slice_set(cfg, task, rows, keys, params, "external")
    ev = _predict(classifier, data)
    _write_predictions(run / "predictions-test.csv", data, ev, classes)
    studies = 0
    if task == "recognition":
        all_slices = load_slice_set(cfg, task, full, keys, params, "external studies")
        _write_predictions(run / "predictions-test-studies.csv", all_slices,
                           _predict(classifier, all_slices), classes)
        studies = len(set(all_slices.studies))
    result: dict[str, Any] = {
        "run": f"{task}/{network}/external", "task": task, "network": network, "fold": 0,
        "best_epoch": meta.training_data.get("best_epoch"), "epochs": meta.training_data.get(
            "epochs"), "device": str(classifier.device),
        "validation": None, "test": _metrics_dict(ev, classes),
        "data": {"task": task, "fold": 0, "train": {}, "validation": {},
                 "test": {"slices": len(data), "subjects": len(set(data.subjects)),
                          "studies": len(set(data.studies)),
                          "per_class": data.class_counts(classes)}},
        "external": {"model": str(Path(model_path).absolute()), "model_uid": meta.model_uid,
                     "model_name": meta.model_name, "model_version": meta.model_version,
                     "precision": classifier.precision, "manifest": str(manifest_path),
                     "slice_policy": policy},
    }
    (run / "result.json").write_text(json.dumps(result, indent=1, default=_json_default))
    summary: dict[str, Any] = {task: {"external manifest": str(manifest_path), **full.summary(),
                      "model": meta.model_name, "model_uid": meta.model_uid}}
    (out / "data-summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report = write_report(out, cfg, command, summary)
    logger.info("external evaluation of %s on %d slices: %s", meta.model_uid, len(data), report)
    return ExternalResult(report, run, len(data), studies)
