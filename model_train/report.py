"""The report of a reproduction run: the paper's Tables 1-5 and Figures 4, 6 and 7.

Reads the run folders written by :mod:`ctdx.model_train.train`
(``<root>/<task>/<network>/fold-<k>/``) and writes ``<root>/report/``:

- ``table1`` (recognition, sensitivity and specificity per class),
  ``table2`` (recognition, accuracy per class and total accuracy, p-values),
  ``table3`` / ``table4`` (the same for the manifestation task),
  ``table5`` (study level at the configured threshold), and ``auc`` (the AUC
  values of Fig. 4 as numbers), each as ``.md`` and ``.csv``;
- ``fig4-roc.png``, ``fig6-threshold.png``, ``fig7-confusion.png``;
- ``README.md``: an index with the exact command, the config, the data summary
  and which data every number comes from.

Image-level tables are "mean (sd)" over the folds' test sets, in percent, as
in the paper. P-values compare every network with the task's **last** network
(the paper's reference: P-ResNet50 in Table 2, whose columns are UP-ResNet18,
UP-ResNet50 and P-ResNet18 versus P-ResNet50; P-ResNet18 versus P-ResNet50 in
Table 4) by a paired t-test over folds (:mod:`ctdx.model_train.metrics`).
ROC curves (Fig. 4) and the study-level results (Table 5, Figs. 6 and 7) pool
the test sets of all folds; they are disjoint (:mod:`ctdx.model_train.splits`), so
every subject counts once. Table 5 also gives mean (sd) over folds.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctdx.model_train.config import Config, dump_toml
from ctdx.model_train.method.classes import Task, classes_for, display_name
from ctdx.model_train.metrics import (
    StudyMetrics,
    StudyPredictions,
    format_mean_sd,
    group_by_study,
    mean_sd,
    paired_p_value,
    roc_per_class,
    study_metrics,
    threshold_curve,
)

logger = logging.getLogger(__name__)

TASK_TABLES = {"recognition": ("table1", "table2"), "manifestation": ("table3", "table4")}
TASK_TITLES = {"recognition": "COVID-19 recognition task", "manifestation":
               "COVID-19 manifestation classification task"}


def _classes(task: str) -> tuple[str, ...]:
    return classes_for(typing.cast(Task, task))


class ReportError(RuntimeError):
    """No finished runs to report on, or unreadable run files."""


@dataclass(frozen=True)
class RunRecord:
    task: str
    network: str
    fold: int
    path: Path
    result: dict[str, Any]


@dataclass(frozen=True)
class Predictions:
    labels: NDArray[np.int64]
    probs: NDArray[np.float32]
    studies: tuple[str, ...]
    label_names: tuple[str, ...]


def collect_runs(root: Path) -> list[RunRecord]:
    """Every finished run (a ``result.json``) under ``root``."""
    out = []
    for path in sorted(root.glob("*/*/fold-*/result.json")):
        result = json.loads(path.read_text())
        out.append(RunRecord(result["task"], result["network"], int(result["fold"]),
                             path.parent, result))
    return out


def read_predictions(path: Path, classes: Sequence[str]) -> Predictions:
    index = {c: i for i, c in enumerate(classes)}
    labels, probs, studies, names = [], [], [], []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            labels.append(index[row["label"]])
            names.append(row["label"])
            studies.append(row["study"])
            probs.append([float(row[f"p_{c}"]) for c in classes])
    return Predictions(np.asarray(labels, dtype=np.int64),
                       np.asarray(probs, dtype=np.float32).reshape(-1, len(classes)),
                       tuple(studies), tuple(names))


def _networks_in_order(runs: Sequence[RunRecord], config: Config, task: str) -> list[str]:
    configured = list(config.task(task).networks)
    present = {r.network for r in runs if r.task == task}
    return [n for n in configured if n in present] + sorted(present - set(configured))


def _per_fold(runs: Sequence[RunRecord], task: str, network: str,
              metric: str, cls: str | None) -> list[float]:
    vals = []
    for r in sorted((r for r in runs if r.task == task and r.network == network),
                    key=lambda r: r.fold):
        v = r.result["test"][metric]
        v = v[cls] if cls is not None else v
        vals.append(math.nan if v is None else float(v))
    return vals


# --- tables ----------------------------------------------------------------------------


def _write_table(out: Path, name: str, title: str, header: list[str], rows: list[list[str]],
                 notes: Sequence[str] = ()) -> None:
    with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += [""] + [f"{n}" for n in notes]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}"


def sens_spec_table(runs: Sequence[RunRecord], config: Config, task: str, out: Path) -> None:
    """Tables 1 and 3."""
    name = TASK_TABLES[task][0]
    nets = _networks_in_order(runs, config, task)
    classes = _classes(task)
    rows = []
    for metric in ("sensitivity", "specificity"):
        for cls in classes:
            rows.append([f"{metric.capitalize()}, mean (sd) (%)", display_name(cls)]
                        + [format_mean_sd(_per_fold(runs, task, n, metric, cls)) for n in nets])
    folds = sorted({r.fold for r in runs if r.task == task})
    _write_table(out, name, f"Sensitivity and specificity, {TASK_TITLES[task]}, image basis",
                 ["Metric", "Class", *nets], rows,
                 [f"Mean (sample sd) over the test sets of folds {folds}, in percent."])


def accuracy_table(runs: Sequence[RunRecord], config: Config, task: str, out: Path) -> None:
    """Tables 2 and 4, with p-values of each network against the task's last network."""
    name = TASK_TABLES[task][1]
    nets = _networks_in_order(runs, config, task)
    classes = _classes(task)
    ref = nets[-1]
    others = nets[:-1]
    header = ["Metric", "Class", *nets, *[f"P value ({n} vs {ref})" for n in others]]
    rows = []
    for cls in [*classes, None]:
        metric = "accuracy" if cls else "overall_accuracy"
        label = "Accuracy, mean (sd) (%)" if cls else "Total accuracy, mean (sd) (%)"
        per = {n: _per_fold(runs, task, n, metric, cls) for n in nets}
        pvals = [_fmt_p(paired_p_value(per[n], per[ref])) if len(per[n]) == len(per[ref])
                 else "n/a" for n in others]
        rows.append([label, display_name(cls) if cls else "", *[format_mean_sd(per[n])
                                                                  for n in nets], *pvals])
    _write_table(out, name, f"Accuracy and total accuracy, {TASK_TITLES[task]}, image basis",
                 header, rows,
                 ["Mean (sample sd) over folds, in percent. P values: two-sided paired t-test "
                  f"over folds of each network against {ref} (the paper does not name its test)."])


def auc_table(runs: Sequence[RunRecord], config: Config, out: Path) -> None:
    rows = []
    for task in ("recognition", "manifestation"):
        classes = _classes(task)
        for n in _networks_in_order(runs, config, task):
            pooled = _pooled(runs, task, n, "predictions-test.csv")
            curves = roc_per_class(pooled.labels, pooled.probs) if pooled else ()
            for i, cls in enumerate(classes):
                per = _per_fold(runs, task, n, "auc", cls)
                pooled_auc = curves[i].auc if curves else math.nan
                m, s = mean_sd(per)
                rows.append([task, n, display_name(cls),
                             "n/a" if math.isnan(pooled_auc) else f"{pooled_auc:.3f}",
                             "n/a" if math.isnan(m) else f"{m:.3f}",
                             "n/a" if math.isnan(s) else f"{s:.3f}"])
    _write_table(out, "auc", "AUC per class (one versus rest), image basis (Fig. 4)",
                 ["Task", "Network", "Class", "AUC pooled test sets", "AUC mean over folds",
                  "sd"], rows)


def _pooled(runs: Sequence[RunRecord], task: str, network: str,
            file: str) -> Predictions | None:
    classes = _classes(task)
    parts = [read_predictions(r.path / file, classes) for r in runs
             if r.task == task and r.network == network and (r.path / file).is_file()]
    if not parts:
        return None
    return Predictions(np.concatenate([p.labels for p in parts]),
                       np.concatenate([p.probs for p in parts]),
                       tuple(s for p in parts for s in p.studies),
                       tuple(s for p in parts for s in p.label_names))


def _studies_of(pred: Predictions) -> tuple[StudyPredictions, ...]:
    return group_by_study(pred.studies, pred.label_names, pred.probs)


def study_level(runs: Sequence[RunRecord], config: Config,
                out: Path) -> tuple[StudyMetrics, tuple[StudyMetrics, ...]] | None:
    """Table 5 and the data of Figs. 6 and 7 for the study network (pooled folds)."""
    net = config.evaluation.study_network
    classes = classes_for("recognition")
    rec = [r for r in runs if r.task == "recognition" and r.network == net]
    if not rec:
        logger.warning("no recognition runs of %s: no study-level results", net)
        return None
    file = "predictions-test-studies.csv"
    th = config.evaluation.threshold
    per_fold = []
    for r in sorted(rec, key=lambda r: r.fold):
        studies = _studies_of(read_predictions(r.path / file, classes))
        per_fold.append(study_metrics(studies, th, classes))
    pooled_pred = _pooled(runs, "recognition", net, file)
    assert pooled_pred is not None
    pooled_studies = _studies_of(pooled_pred)
    pooled = study_metrics(pooled_studies, th, classes)
    curve = threshold_curve(pooled_studies, config.evaluation.thresholds, classes)

    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100 * v:.2f}"

    keys = ("sensitivity", "specificity", "accuracy", "overall_accuracy")
    rows = [
        [f"{net} ({th:.0%} threshold), pooled test studies of folds "
         f"{[r.fold for r in sorted(rec, key=lambda r: r.fold)]} (n = {pooled.n})",
         *[pct(getattr(pooled, k)) for k in keys]],
        [f"{net}, mean (sd) over folds",
         *[format_mean_sd([getattr(m, k) for m in per_fold]) for k in keys]],
        ["Radiologists", "n/a", "n/a", "n/a", "n/a"],
    ]
    counts = {c: sum(1 for s in pooled_studies if s.true_label == c) for c in classes}
    _write_table(out, "table5", "COVID-19 diagnosis on patient (study) basis",
                 ["Method", "Sensitivity (%)", "Specificity (%)", "Accuracy (%)",
                  "Overall accuracy (%)"], rows,
                 ["Sensitivity, specificity and accuracy: COVID-19 versus the rest; overall "
                  "accuracy: three classes (decide_study, share-of-slices rule).",
                  "Test studies: " + ", ".join(f"{display_name(c)} {n}" for c, n in
                                               counts.items()) + ".",
                  "Radiologists: no radiologist reads are part of this data, so the paper's "
                  "comparison row cannot be reproduced."])
    with (out / "fig6-threshold.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["threshold", *keys])
        for m in curve:
            w.writerow([f"{m.threshold:.4f}", *[f"{getattr(m, k):.6f}" for k in keys]])
    return pooled, curve


# --- figures --------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig4_roc(runs: Sequence[RunRecord], config: Config, out: Path) -> Path:
    plt = _pyplot()
    panels = [(t, n) for t in ("recognition", "manifestation")
              for n in _networks_in_order(runs, config, t)]
    cols = min(4, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    letters = "abcdefghijklmnop"
    for i, (task, net) in enumerate(panels):
        ax = axes.ravel()[i]
        pred = _pooled(runs, task, net, "predictions-test.csv")
        classes = _classes(task)
        if pred is not None:
            for cls, curve in zip(classes, roc_per_class(pred.labels, pred.probs), strict=True):
                if curve.fpr.size:
                    ax.plot(curve.fpr, curve.tpr, label=f"{display_name(cls)} ({curve.auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
        ax.set_title(f"({letters[i]}) {net}, {task}", fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right", title="class (AUC)", title_fontsize=7)
        else:  # e.g. a split file's test set of one class: no class has both outcomes
            ax.text(0.5, 0.5, "no ROC: the test set\nlacks positives or negatives",
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
    fig.suptitle("ROC curves on image basis, pooled test sets (Fig. 4)", fontsize=10)
    fig.tight_layout()
    path = out / "fig4-roc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig6_threshold(curve: Sequence[StudyMetrics], config: Config, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [100 * m.threshold for m in curve]
    for key, label in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                       ("accuracy", "accuracy (COVID-19 vs rest)"),
                       ("overall_accuracy", "overall accuracy (3 classes)")):
        ax.plot(x, [100 * getattr(m, key) for m in curve], label=label, marker=".",
                markersize=3)
    ax.axvline(100 * config.evaluation.threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("threshold: share of slices called COVID-19 (%)")
    ax.set_ylabel("%")
    ax.set_title(f"{config.evaluation.study_network} on patient basis vs threshold (Fig. 6)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fig6-threshold.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig7_confusion(metrics: StudyMetrics, config: Config, out: Path) -> Path:
    plt = _pyplot()
    classes = [display_name(c) for c in classes_for("recognition")]
    cm = metrics.confusion
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{config.evaluation.study_network}, threshold "
                 f"{config.evaluation.threshold:.0%}, test studies (Fig. 7)", fontsize=9)
    fig.tight_layout()
    path = out / "fig7-confusion.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the whole report -------------------------------------------------------------------


def _data_summary(runs: Sequence[RunRecord], data_summary: dict[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    for task, summary in data_summary.items():
        lines += [f"### {task}", "", "```", json.dumps(summary, indent=1), "```", ""]
    lines += ["### Per fold (slices used: after the slice policy and the lung-fraction filter)",
              "", "| task | network | fold | train | validation | test | best epoch |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        d = r.result.get("data", {})
        lines.append(f"| {r.task} | {r.network} | {r.fold} | "
                     + " | ".join(str(d.get(s, {}).get("slices", "?"))
                                  for s in ("train", "validation", "test"))
                     + f" | {r.result.get('best_epoch')} |")
    return lines + [""]


def epochs_table(runs: Sequence[RunRecord], out: Path) -> Path:
    """``epochs.md``: each run's ``history.csv`` (train mode vs eval mode, the kept epoch)."""

    def cell(row: dict[str, str], key: str) -> str:
        v = row.get(key, "")
        try:
            f = float(v)
        except ValueError:
            return "n/a"
        return "n/a" if math.isnan(f) else f"{f:.3f}"

    lines = ["# Per epoch: train mode vs eval mode", "",
             "train mode: accuracy during the epoch's training pass (batch statistics, "
             "augmented); eval mode: accuracy on a fixed sample of training slices in eval "
             "mode after the batch-norm re-estimate (`ctdx.model_train.bn`); the epoch kept is the "
             "last of the best moving average of validation accuracy (`train.select_window`).",
             ""]
    for r in runs:
        hist = r.path / "history.csv"
        if not hist.is_file():
            continue
        with hist.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        rule = (r.result.get("selection") or {}).get("rule", "best validation accuracy")
        lines += [f"## {r.task} {r.network} fold {r.fold}", "", f"Kept: epoch "
                  f"{r.result.get('best_epoch')} ({rule}).", "",
                  "| epoch | train mode | eval mode (training slices) | validation | "
                  "validation, moving average | kept |", "|---|---|---|---|---|---|"]
        for row in rows:
            kept = "yes" if str(row.get("epoch")) == str(r.result.get("best_epoch")) else ""
            lines.append(f"| {row.get('epoch')} | {cell(row, 'train_accuracy')} | "
                         f"{cell(row, 'train_eval_accuracy')} | {cell(row, 'val_accuracy')} | "
                         f"{cell(row, 'val_accuracy_window')} | {kept} |")
        lines.append("")
    path = out / "epochs.md"
    path.write_text("\n".join(lines))
    return path


def write_report(root: Path, config: Config, command: str = "",
                 data_summary: dict[str, Any] | None = None) -> Path:
    """Write ``<root>/report/`` from the finished runs under ``root``; returns the folder."""
    all_runs = collect_runs(root)
    if not all_runs:
        raise ReportError(f"no finished runs (result.json) under {root}")
    # runs of a split file without a test set have no test numbers; they are listed only
    runs = [r for r in all_runs if r.result.get("test") is not None]
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    epochs_table(all_runs, out)
    written = []
    for task in ("recognition", "manifestation"):
        if any(r.task == task for r in runs):
            sens_spec_table(runs, config, task, out)
            accuracy_table(runs, config, task, out)
            written += list(TASK_TABLES[task])
    figures = []
    study = None
    if runs:
        auc_table(runs, config, out)
        written.append("auc")
        fig4_roc(runs, config, out)
        figures.append("fig4-roc.png")
        study = study_level(runs, config, out)
    if study is not None:
        pooled, curve = study
        fig6_threshold(curve, config, out)
        fig7_confusion(pooled, config, out)
        written.append("table5")
        figures += ["fig6-threshold.png", "fig7-confusion.png"]
    (out / "config.toml").write_text(dump_toml(config))
    (out / "command.txt").write_text(command + "\n")
    devices = sorted({str(r.result.get("device")) for r in runs})
    lines = [
        "# Reproduction report: Chen et al. 2021, Auxiliary Diagnosis for COVID-19 with Deep "
        "Transfer Learning",
        "",
        f"Command: `{command}`" if command else "Command: (not recorded)",
        "",
        f"Config: [config.toml](config.toml). Devices: {', '.join(devices)}. "
        f"Epochs: {config.train.epochs}.",
        "",
        "Every number below comes from the manifest(s) named in the config and the runs in "
        "this folder's parent; none is copied from the paper.",
        "",
        "## Tables", "",
        *[f"- [{t}]({t}.md) ([csv]({t}.csv))" for t in written],
        *([] if runs else ["- none: no run has a test set (its split file names no test "
                           "subject)"]),
        "- [epochs](epochs.md): per epoch, train-mode and eval-mode accuracy on training "
        "slices, validation accuracy and the epoch kept",
        "",
        "## Figures", "",
        *[f"- [{f}]({f})" for f in figures],
        "",
        *_data_summary(all_runs, data_summary or {}),
    ]
    for t in written:
        if t == "auc":
            continue
        lines += [(out / f"{t}.md").read_text(), ""]
    (out / "README.md").write_text("\n".join(lines))
    logger.info("report written to %s", out)
    return out
