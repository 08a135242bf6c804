"""``ctdx validate run``: the truth file in, the validation's document and files out.

:func:`read_truth` parses TRUTH.csv; :func:`evaluate` turns the joined cases
into the documented JSON object (docs/cli-json.md, ``ctdx validate run``);
:func:`write_outputs` writes it with ``report.md``, CSV tables and the ROC
PNG into the output folder. The numbers all come from :mod:`ctdx.db.validation`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ctdx.db.cli.output import iso_utc
from ctdx.db.validation import (
    CLASSES,
    PAPER_THRESHOLD,
    POSITIVE,
    accuracy_3class,
    binary_table,
    confusion_3x3,
    operating_point,
    roc,
    threshold_for_sensitivity,
)
from ctdx.db.validation_db import Case, Excluded, ModelRef, TruthRow, ValidationError

logger = logging.getLogger(__name__)

JSON_NAME = "validation.json"
_KEY_COLUMNS = {"studyinstanceuid": "uid", "accessionnumber": "accession"}
_CLASS_COLUMNS = ("truth", "class", "label", "trueclass", "diagnosis")
_CLASS_SPELLINGS = {
    "covid19": "covid19", "covid-19": "covid19", "covid": "covid19",
    "other_pneumonia": "other_pneumonia", "other pneumonia": "other_pneumonia",
    "other-pneumonia": "other_pneumonia", "otherpneumonia": "other_pneumonia",
    "cap": "other_pneumonia", "community-acquired pneumonia": "other_pneumonia",
    "normal": "normal",
}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def read_truth(path: Path) -> tuple[list[TruthRow], str]:
    """Rows of TRUTH.csv and the file's SHA-256 (recorded with an adopted operating point).

    The header names a key column (``study_instance_uid`` or
    ``accession_number``; spelling and case are free, e.g. ``StudyInstanceUID``)
    and a class column (``truth``, ``class`` or ``label``); other columns are
    ignored. Raises :class:`ValidationError` naming the line of a bad value.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read the truth file {path}: {exc.strerror}") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationError(f"{path} is not UTF-8 text") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise ValidationError(f"{path} is empty: it needs a header line")
    names = [_norm(h) for h in header]
    keys = [i for i, n in enumerate(names) if n in _KEY_COLUMNS]
    classes = [i for i, n in enumerate(names) if n in _CLASS_COLUMNS]
    if not keys:
        raise ValidationError(
            f"{path}: no study_instance_uid or accession_number column in the header "
            f"({', '.join(header)})")
    if not classes:
        raise ValidationError(
            f"{path}: no truth (or class, label) column in the header ({', '.join(header)})")
    rows: list[TruthRow] = []
    for line, record in enumerate(reader, start=2):
        if not any(cell.strip() for cell in record):
            continue
        key = next((record[i].strip() for i in keys if i < len(record) and record[i].strip()),
                   "")
        value = record[classes[0]].strip().lower() if classes[0] < len(record) else ""
        if not key:
            raise ValidationError(f"{path} line {line}: no Study Instance UID or accession "
                                  "number")
        truth = _CLASS_SPELLINGS.get(value)
        if truth is None:
            raise ValidationError(f"{path} line {line}: class {value!r} is not one of "
                                  f"{', '.join(CLASSES)}")
        rows.append(TruthRow(line=line, key=key, truth=truth))
    if not rows:
        raise ValidationError(f"{path} has no studies")
    return rows, digest


def _point(truth: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, Any]:
    if threshold is None:
        return {"threshold": None, "table_2x2": None, "sensitivity": None,
                "specificity": None, "accuracy": None, "positive_rate": None}
    return operating_point(truth, scores, threshold).as_dict()


def evaluate(
    cases: Sequence[Case], excluded: Sequence[Excluded], model: ModelRef, *,
    truth_path: Path, truth_sha256: str, truth_rows: int, target_sensitivity: float,
    validated_at: datetime,
) -> dict[str, Any]:
    """The validation document (see docs/cli-json.md). Needs at least one usable study."""
    if not cases:
        reasons = Counter(str(e.reason) for e in excluded)
        raise ValidationError(
            f"none of the {truth_rows} studies in the truth file is analysed by "
            f"{model.label()}; excluded: "
            + ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())))
    truth = np.array([c.truth == POSITIVE for c in cases])
    scores = np.array([c.fraction_covid19 for c in cases], dtype=np.float64)
    reported = binary_table(truth, np.array([c.decision == POSITIVE for c in cases]))
    matrix = confusion_3x3([c.truth for c in cases], [c.decision for c in cases])
    used = Counter(c.threshold for c in cases)
    current = used.most_common(1)[0][0]
    curve = roc(truth, scores)
    target = threshold_for_sensitivity(truth, scores, target_sensitivity)
    return {
        "validated_at": iso_utc(validated_at),
        "model": {"model_name": model.model_name, "model_version": model.model_version,
                  "model_uid": model.model_uid},
        "truth": {"path": str(truth_path), "sha256": truth_sha256, "rows": truth_rows},
        "n_studies": len(cases),
        "n_positive": int(truth.sum()),
        "n_negative": int((~truth).sum()),
        "n_excluded": len(excluded),
        "target_sensitivity": target_sensitivity,
        "paper_threshold": PAPER_THRESHOLD,
        "current_threshold": current,
        "thresholds_used": sorted(used),
        "confusion_3x3": {"labels": list(CLASSES), "matrix": matrix.tolist()},
        "as_reported": {
            "table_2x2": reported.as_dict(),
            "sensitivity": reported.sensitivity.as_dict(),
            "specificity": reported.specificity.as_dict(),
            "accuracy": reported.accuracy.as_dict(),
            "accuracy_3class": accuracy_3class(matrix).as_dict(),
            "positive_rate": reported.positive_rate,
        },
        "roc": {"auc": curve.auc, "auc_low": curve.auc_low, "auc_high": curve.auc_high,
                "bootstrap_samples": curve.bootstrap_samples,
                "bootstrap_seed": curve.bootstrap_seed},
        "at_target_sensitivity": _point(truth, scores, target),
        "at_paper_threshold": _point(truth, scores, PAPER_THRESHOLD),
        "excluded": [
            {"line": e.line, "key": e.key, "truth": e.truth, "reason": str(e.reason),
             "detail": e.detail, "study_instance_uid": e.study_instance_uid}
            for e in excluded
        ],
    }


# --- files --------------------------------------------------------------------------------


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _prop(p: dict[str, Any] | None) -> str:
    if not p or p["value"] is None:
        return "- (no studies)"
    return f"{_pct(p['value'])} ({p['k']}/{p['n']}; 95% CI {_pct(p['low'])}–{_pct(p['high'])})"


def _roc_png(path: Path, doc: dict[str, Any], cases: Sequence[Case]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    truth = np.array([c.truth == POSITIVE for c in cases])
    scores = np.array([c.fraction_covid19 for c in cases], dtype=np.float64)
    curve = roc(truth, scores, samples=1)
    fig = Figure(figsize=(5.5, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.8", linestyle=":", label="chance")
    if curve.auc is not None:
        ax.plot(curve.fpr, curve.tpr, color="C0",
                label=f"ROC, AUC {doc['roc']['auc']:.3f} "
                      f"({doc['roc']['auc_low']:.3f}–{doc['roc']['auc_high']:.3f})")
    marks = (("current threshold", doc["current_threshold"], "C3", "o", 15),
             ("paper's 5%", PAPER_THRESHOLD, "C2", "s", 8),
             (f"sensitivity {doc['target_sensitivity']:g}",
              doc["at_target_sensitivity"]["threshold"], "C1", "^", 8))
    for name, threshold, color, marker, size in marks:
        if threshold is None:
            continue
        table = operating_point(truth, scores, threshold).table
        sens, spec = table.sensitivity.value, table.specificity.value
        if sens is None or spec is None:
            continue
        ax.plot([1 - spec], [sens], marker=marker, color=color, linestyle="none",
                markersize=size, markerfacecolor="none" if size > 10 else color,
                markeredgewidth=2, label=f"{name}: > {100 * threshold:.3g}% of slices")
    model = doc["model"]
    ax.set_title(f"{model['model_name']} {model['model_version']}: "
                 f"{doc['n_positive']} COVID-19, {doc['n_negative']} not", fontsize=10)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _report_md(doc: dict[str, Any]) -> str:
    model = doc["model"]
    rep, target, paper = doc["as_reported"], doc["at_target_sensitivity"], doc[
        "at_paper_threshold"]
    matrix = doc["confusion_3x3"]
    lines = [
        f"# Local validation of {model['model_name']} {model['model_version']}",
        "",
        f"- Model UID: {model['model_uid']}",
        f"- Validated: {doc['validated_at']}",
        f"- Truth file: {doc['truth']['path']} (SHA-256 {doc['truth']['sha256']}, "
        f"{doc['truth']['rows']} studies)",
        f"- Studies used: {doc['n_studies']} ({doc['n_positive']} COVID-19, "
        f"{doc['n_negative']} other pneumonia or normal); excluded: {doc['n_excluded']}",
        f"- Threshold the analyses were made at: {_pct(doc['current_threshold'])} of analysed "
        "slices" + ("" if len(doc["thresholds_used"]) == 1 else
                    f" (several were used: {', '.join(_pct(t) for t in doc['thresholds_used'])})"),
        "",
        "Intervals are 95% Wilson score intervals; the AUC interval is a percentile "
        f"bootstrap over studies ({doc['roc']['bootstrap_samples']} resamples, seed "
        f"{doc['roc']['bootstrap_seed']}).",
        "",
        "## Study calls as reported",
        "",
        "Truth in rows, ctdx's call in columns:",
        "",
        "| truth \\ call | " + " | ".join(matrix["labels"]) + " |",
        "|---|" + "---:|" * len(matrix["labels"]),
        *[f"| {label} | " + " | ".join(str(v) for v in row) + " |"
          for label, row in zip(matrix["labels"], matrix["matrix"], strict=True)],
        "",
        "| COVID-19 vs not | called COVID-19 | called not |",
        "|---|---:|---:|",
        f"| COVID-19 | {rep['table_2x2']['tp']} | {rep['table_2x2']['fn']} |",
        f"| not COVID-19 | {rep['table_2x2']['fp']} | {rep['table_2x2']['tn']} |",
        "",
        f"- Sensitivity: {_prop(rep['sensitivity'])}",
        f"- Specificity: {_prop(rep['specificity'])}",
        f"- Accuracy (COVID-19 vs not): {_prop(rep['accuracy'])}",
        f"- Accuracy (3 classes): {_prop(rep['accuracy_3class'])}",
        "",
        "## ROC of the study's COVID-19 slice share",
        "",
        "![ROC](roc.png)",
        "",
        "- AUC: " + ("- (needs COVID-19 and non-COVID-19 studies)" if doc["roc"]["auc"] is None
                     else f"{doc['roc']['auc']:.3f} (95% CI {doc['roc']['auc_low']:.3f}–"
                          f"{doc['roc']['auc_high']:.3f})"),
        "",
        "## Operating points",
        "",
        "| threshold (share of slices) | sensitivity | specificity |",
        "|---|---|---|",
    ]
    if target["threshold"] is None:
        lines.append(f"| target sensitivity {doc['target_sensitivity']:g}: not reachable | - | - |")
    else:
        lines.append(f"| > {_pct(target['threshold'])} (reaches sensitivity "
                     f"{doc['target_sensitivity']:g}) | {_prop(target['sensitivity'])} | "
                     f"{_prop(target['specificity'])} |")
    lines += [
        f"| > {_pct(paper['threshold'])} (the paper's) | {_prop(paper['sensitivity'])} | "
        f"{_prop(paper['specificity'])} |",
        "",
        "Adopt one with `ctdx validate adopt DIR` (`--choice target`, the default, or "
        "`--choice paper`).",
        "",
        "## Studies left out",
        "",
    ]
    if not doc["excluded"]:
        lines.append("None: every study in the truth file was used.")
    else:
        lines += ["| line | study | truth | reason | detail |", "|---:|---|---|---|---|"]
        lines += [f"| {e['line']} | {e['key']} | {e['truth']} | {e['reason']} | "
                  f"{e['detail'].replace('|', '/')} |" for e in doc["excluded"]]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, doc: dict[str, Any], cases: Sequence[Case]) -> list[str]:
    """Write the validation's files into ``out_dir``; returns their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    def name(filename: str) -> Path:
        files.append(filename)
        return out_dir / filename

    _csv(name("cases.csv"),
         ["line", "study_instance_uid", "accession_number", "version", "analysis_id", "truth",
          "decision", "fraction_covid19", "threshold"],
         [[c.line, c.study_instance_uid, c.accession_number, c.version, c.analysis_id, c.truth,
           c.decision, c.fraction_covid19, c.threshold] for c in cases])
    _csv(name("excluded.csv"), ["line", "key", "truth", "reason", "detail", "study_instance_uid"],
         [[e["line"], e["key"], e["truth"], e["reason"], e["detail"], e["study_instance_uid"]]
          for e in doc["excluded"]])
    matrix = doc["confusion_3x3"]
    _csv(name("confusion_3x3.csv"), ["truth", *matrix["labels"]],
         [[label, *row] for label, row in zip(matrix["labels"], matrix["matrix"], strict=True)])
    points = (("as_reported", doc["current_threshold"], doc["as_reported"]),
              ("target_sensitivity", doc["at_target_sensitivity"]["threshold"],
               doc["at_target_sensitivity"]),
              ("paper", PAPER_THRESHOLD, doc["at_paper_threshold"]))
    _csv(name("table_2x2.csv"), ["operating_point", "threshold", "tp", "fn", "fp", "tn"],
         [[label, threshold, *(p["table_2x2"] or {}).values()] for label, threshold, p in points])
    metrics = []
    for label, threshold, p in points:
        for metric in ("sensitivity", "specificity", "accuracy", "accuracy_3class"):
            value = p.get(metric)
            if value is not None:
                metrics.append([label, threshold, metric, value["k"], value["n"],
                                value["value"], value["low"], value["high"]])
    _csv(name("metrics.csv"),
         ["operating_point", "threshold", "metric", "k", "n", "value", "low", "high"], metrics)
    truth = np.array([c.truth == POSITIVE for c in cases])
    scores = np.array([c.fraction_covid19 for c in cases], dtype=np.float64)
    curve = roc(truth, scores, samples=1)
    _csv(name("roc.csv"), ["fpr", "tpr", "called_positive_at_or_above"],
         [[float(f), float(t), float(s)] for f, t, s in
          zip(curve.fpr, curve.tpr, curve.thresholds, strict=True)])
    _roc_png(name("roc.png"), doc, cases)
    name("report.md").write_text(_report_md(doc), encoding="utf-8")
    name(JSON_NAME).write_text(json.dumps({**doc, "files": sorted(files)}, indent=2) + "\n",
                               encoding="utf-8")
    return sorted(files)


def read_validation(out_dir: Path) -> dict[str, Any]:
    """The document a ``validate run`` wrote into ``out_dir`` (for ``validate adopt``)."""
    path = out_dir / JSON_NAME
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(
            f"no {JSON_NAME} in {out_dir}: give the --out folder of `ctdx validate run`") from None
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict) or "model" not in value or "at_target_sensitivity" not in value:
        raise ValidationError(f"{path} is not a `ctdx validate run` result")
    return value
