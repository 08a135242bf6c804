"""Train one network on one fold, in the shape of torchvision's classification reference.

``get_args_parser()`` / ``main(args)`` / ``train_one_epoch`` / ``evaluate``, as in
``references/classification/train.py``. The paper's settings ("Methods"): the
network's last layer has three outputs, cross-entropy loss, Adam with learning
rate 1e-4 (manifestation task: 5e-4 on the last layer, 5e-5 on the rest), 50
epochs, random crop and horizontal flip (the method's ``train_augment``), and
the model kept is the one with the best validation accuracy (ties: lower
validation loss).

Before every validation the batch-norm running statistics are re-estimated on a
fixed sample of training slices (:mod:`ctdx.model_train.bn`), so eval mode matches
train mode; ``history.csv`` records both accuracies per epoch
(``train_accuracy``: train mode, during the epoch; ``train_eval_accuracy``: eval
mode on the training sample).

One run writes to its folder:

- ``config.toml``: the effective config; ``split.json``: the fold's item keys;
- ``checkpoint-last.pt``: model, optimizer, epoch, history, best-so-far and the
  config as a plain dict, written after every epoch (``--resume`` continues from
  it; random draws are derived from (seed, epoch), so a resumed run sees the
  same batches as an uninterrupted one);
- ``checkpoint-best.pt``: the weights of the kept epoch: the last epoch of the best
  ``train.select_window``-epoch moving average of validation accuracy (ties: lower
  validation loss), or the last epoch when a split file leaves no validation set;
- ``history.csv``; ``predictions-test.csv`` / ``predictions-validation.csv``:
  per slice, the subject, study, true class and class probabilities of the best
  model; recognition also ``predictions-test-studies.csv``: every slice the worker
  would analyse of the test studies (no slice policy), for the study-level
  evaluation; ``result.json``: the metrics (also the marker that the run is done).

On a GPU it uses bfloat16 autocast (configurable); on the CPU float32, because
bf16 is emulated (slower) on CPUs without native bf16. Channels-last memory
format on both (configurable): it speeds up fp32 convolutions on the CPU as well.
Checkpoints hold tensors and plain types only and are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ctdx.model_train.bn import recalibrate_bn, sample_indices, subset
from ctdx.model_train.config import (
    Config,
    ConfigError,
    NetworkSpec,
    dump_toml,
    load_config,
    to_dict,
)
from ctdx.model_train.data import SliceSet, TaskData
from ctdx.model_train.method.classes import Task
from ctdx.model_train.method.networks import backbone_parameters, build_resnet, head_parameters
from ctdx.model_train.method.preprocess import (
    AugmentParams,
    PreprocessParams,
    gray_from_uint8,
    to_network_input,
    train_augment,
)
from ctdx.model_train.metrics import class_metrics, confusion, roc_per_class
from ctdx.model_train.splits import write_split

logger = logging.getLogger(__name__)

TRAIN_CHECKPOINT_FORMAT = "ctdx-train-checkpoint"


class TrainError(RuntimeError):
    """A run that cannot start or continue (e.g. a resume checkpoint of another run)."""


@dataclass(frozen=True)
class RunSpec:
    """Which cell of the grid: task, network and fold."""

    task: Task
    network: NetworkSpec
    fold: int

    @property
    def name(self) -> str:
        return f"{self.task}/{self.network.name}/fold-{self.fold}"


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    probs: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    out_dir: Path
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float
    epochs_run: int


# --- devices, seeds -------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch and numpy; with ``deterministic`` also force deterministic kernels."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's shuffling and augmentation (resumable by design)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# --- model and optimizer ----------------------------------------------------------------


def build_model(spec: RunSpec, config: Config) -> nn.Module:
    pretrained: bool | Path = False
    if spec.network.pretrained:
        pretrained = config.pretrained.for_arch(spec.network.arch) or True
    model: nn.Module = build_resnet(spec.network.arch, num_classes=3, pretrained=pretrained)
    return model


def build_optimizer(model: nn.Module, spec: RunSpec, config: Config) -> torch.optim.Optimizer:
    """Adam; two parameter groups when the task sets head_lr / backbone_lr (paper, Methods)."""
    tc = config.task(spec.task)
    if tc.head_lr is not None and tc.backbone_lr is not None:
        from torchvision.models import ResNet

        assert isinstance(model, ResNet)
        groups = [
            {"params": backbone_parameters(model), "lr": tc.backbone_lr},
            {"params": head_parameters(model), "lr": tc.head_lr},
        ]
        return torch.optim.Adam(groups)
    return torch.optim.Adam(model.parameters(), lr=tc.lr)


# --- the loops ------------------------------------------------------------------------


def _autocast(device: torch.device, amp: bool) -> Any:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _inputs(gray_u8: Tensor, params: PreprocessParams, device: torch.device,
            channels_last: bool) -> Tensor:
    x = to_network_input(gray_from_uint8(gray_u8.to(device, non_blocking=True), params), params)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SliceSet,
    params: PreprocessParams,
    augment: AugmentParams,
    device: torch.device,
    batch_size: int,
    generator: torch.Generator,
    amp: bool = True,
    channels_last: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over the training slices in a seeded random order, with augmentation."""
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(data), generator=generator)
    total_loss, correct, seen = 0.0, 0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        x = _inputs(data.gray[idx], params, device, False)
        x = train_augment(x, generator, augment)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.labels[idx].to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(y.shape[0])
        total_loss += float(loss.detach()) * n
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += n
        if on_batch:
            on_batch(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen,
                      time.perf_counter() - start)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    data: SliceSet,
    params: PreprocessParams,
    device: torch.device,
    batch_size: int,
    amp: bool = True,
    channels_last: bool = True,
) -> Evaluation:
    """Class probabilities of every slice (no augmentation), loss and accuracy."""
    model.eval()
    probs: list[Tensor] = []
    total_loss = 0.0
    for i in range(0, len(data), batch_size):
        x = _inputs(data.gray[i : i + batch_size], params, device, channels_last)
        y = data.labels[i : i + batch_size].to(device)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        total_loss += float(criterion(logits, y)) * int(y.shape[0])
        probs.append(torch.softmax(logits, dim=1).cpu())
    p = torch.cat(probs).numpy().astype(np.float32) if probs else np.zeros((0, 3), np.float32)
    labels = data.labels.numpy()
    acc = float((p.argmax(axis=1) == labels).mean()) if len(labels) else math.nan
    return Evaluation(total_loss / max(len(labels), 1), acc, p, labels)


# --- checkpoints ------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _state_cpu(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def load_train_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or foreign file: many exception types
        raise TrainError(f"{path}: not a readable training checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a ctdx training checkpoint")
    return ckpt


# --- one run ---------------------------------------------------------------------------


def _write_predictions(path: Path, data: SliceSet, ev: Evaluation,
                       classes: tuple[str, ...]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "subject", "study", "label", *[f"p_{c}" for c in classes]])
        for i in range(len(data)):
            w.writerow([data.paths[i], data.subjects[i], data.studies[i],
                        classes[int(ev.labels[i])], *[f"{v:.6f}" for v in ev.probs[i]]])


def _metrics_dict(ev: Evaluation, classes: tuple[str, ...]) -> dict[str, Any]:
    cm = confusion(ev.labels, ev.probs.argmax(axis=1), len(classes))
    m = class_metrics(cm)
    aucs = [c.auc for c in roc_per_class(ev.labels, ev.probs)]
    return {
        "n": m.n,
        "loss": ev.loss,
        "overall_accuracy": m.overall_accuracy,
        "sensitivity": dict(zip(classes, m.sensitivity, strict=True)),
        "specificity": dict(zip(classes, m.specificity, strict=True)),
        "accuracy": dict(zip(classes, m.accuracy, strict=True)),
        "auc": dict(zip(classes, aucs, strict=True)),
        "confusion": cm.tolist(),
    }


def run_training(
    config: Config,
    spec: RunSpec,
    data: TaskData,
    out_dir: Path,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``spec`` on ``data`` into ``out_dir``; evaluate the best model on the test set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = config.train
    device = resolve_device(tcfg.device)
    seed_everything(tcfg.seed, tcfg.deterministic)
    params = config.preprocess_params()
    augment = AugmentParams(min_crop=tcfg.min_crop, flip_p=tcfg.flip_p)
    (out_dir / "config.toml").write_text(dump_toml(config))
    write_split(data.split, out_dir / "split.json")

    model = build_model(spec, config).to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, spec, config)
    criterion = nn.CrossEntropyLoss()

    history: list[dict[str, float]] = []
    start_epoch = 0
    best = {"epoch": -1, "accuracy": -math.inf, "loss": math.inf, "score": -math.inf}
    # fixed training sample: batch-norm re-estimate and eval-mode accuracy on training slices
    bn_sample = subset(data.train, sample_indices(len(data.train), tcfg.bn_slices, tcfg.seed))
    has_validation = len(data.validation) > 0
    last_path, best_path = out_dir / "checkpoint-last.pt", out_dir / "checkpoint-best.pt"
    if resume and last_path.is_file():
        ckpt = load_train_checkpoint(last_path)
        if ckpt.get("run") != spec.name:
            raise TrainError(f"{last_path} belongs to run {ckpt.get('run')!r}, not {spec.name!r}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        best.setdefault("score", best["accuracy"])
        logger.info("%s: resuming after epoch %d", spec.name, start_epoch - 1)
    elif resume:
        logger.info("%s: nothing to resume, starting at epoch 0", spec.name)

    for epoch in range(start_epoch, tcfg.epochs):
        gen = epoch_generator(tcfg.seed, epoch)
        stats = train_one_epoch(model, criterion, optimizer, data.train, params, augment, device,
                                tcfg.batch_size, gen, tcfg.amp, tcfg.channels_last, on_batch)
        if tcfg.bn_recalibration:
            recalibrate_bn(model, bn_sample.gray, params, device, tcfg.batch_size,
                           tcfg.channels_last)
        on_train = evaluate(model, criterion, bn_sample, params, device, tcfg.eval_batch_size,
                            tcfg.amp, tcfg.channels_last)
        val = (evaluate(model, criterion, data.validation, params, device,
                        tcfg.eval_batch_size, tcfg.amp, tcfg.channels_last)
               if has_validation else None)
        row = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "train_eval_accuracy": on_train.accuracy,
               "val_loss": val.loss if val else math.nan,
               "val_accuracy": val.accuracy if val else math.nan,
               "seconds": stats.seconds, "images_per_second": stats.images_per_second}
        history.append(row)
        score = selection_score(history, tcfg.select_window)
        row["val_accuracy_window"] = score
        if val is None:
            improved = True  # no validation set: the last epoch is kept
        else:
            improved = (score > best["score"]
                        or (score == best["score"] and val.loss < best["loss"]))
        if improved:
            best = {"epoch": epoch, "accuracy": val.accuracy if val else math.nan,
                    "loss": val.loss if val else math.nan, "score": score}
            _atomic_save({"format": TRAIN_CHECKPOINT_FORMAT, "run": spec.name, "epoch": epoch,
                          "model": _state_cpu(model), "config": to_dict(config)}, best_path)
        _atomic_save({
            "format": TRAIN_CHECKPOINT_FORMAT, "run": spec.name, "epoch": epoch,
            "model": _state_cpu(model), "optimizer": optimizer.state_dict(),
            "history": history, "best": best, "config": to_dict(config),
        }, last_path)
        logger.info("%s epoch %d: loss %.4f acc %.4f (eval mode %.4f) | val loss %.4f acc %.4f "
                    "| %.1f img/s", spec.name, epoch, stats.loss, stats.accuracy,
                    on_train.accuracy, row["val_loss"], row["val_accuracy"],
                    stats.images_per_second)
        if on_epoch:
            on_epoch(epoch, row)

    _write_history(out_dir / "history.csv", history)
    if not best_path.is_file():
        raise TrainError(f"{spec.name}: no best checkpoint (no epoch ran)")
    model.load_state_dict(load_train_checkpoint(best_path)["model"])
    results: dict[str, Any] = {"run": spec.name, "task": spec.task, "network": spec.network.name,
                               "fold": spec.fold, "best_epoch": best["epoch"],
                               "epochs": tcfg.epochs, "device": str(device)}
    for name in ("validation", "test"):
        part: SliceSet = getattr(data, name)
        if len(part) == 0:  # a split file without this set
            results[name] = None
            continue
        ev = evaluate(model, criterion, part, params, device, tcfg.eval_batch_size,
                      tcfg.amp, tcfg.channels_last)
        _write_predictions(out_dir / f"predictions-{name}.csv", part, ev, data.classes)
        results[name] = _metrics_dict(ev, data.classes)
    if data.test_studies is not None:
        ev = evaluate(model, criterion, data.test_studies, params, device, tcfg.eval_batch_size,
                      tcfg.amp, tcfg.channels_last)
        _write_predictions(out_dir / "predictions-test-studies.csv", data.test_studies, ev,
                           data.classes)
    results["data"] = data.summary()
    results["selection"] = {
        "rule": (f"best {tcfg.select_window}-epoch moving average of validation accuracy"
                 if has_validation else "no validation set: last epoch"),
        "bn_recalibration": tcfg.bn_recalibration,
    }
    (out_dir / "result.json").write_text(json.dumps(results, indent=1, default=_json_default))
    test_accuracy = (float(results["test"]["overall_accuracy"]) if results["test"] is not None
                     else math.nan)
    return RunResult(spec, out_dir, int(best["epoch"]), float(best["accuracy"]),
                     test_accuracy, len(history))


def selection_score(history: list[dict[str, float]], window: int) -> float:
    """Mean validation accuracy of the last ``window`` epochs (fewer at the start).

    The model kept is the epoch where this is highest (ties: lower validation loss):
    one lucky epoch between poor ones does not win, a stretch of good ones does.
    """
    vals = [float(h["val_accuracy"]) for h in history[-window:]]
    return float(np.mean(vals)) if vals else math.nan


def _json_default(value: Any) -> Any:
    if isinstance(value, float | np.floating) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        names = list(dict.fromkeys(k for h in history for k in h))  # resumed old runs
        w = csv.DictWriter(fh, fieldnames=names, restval="")
        w.writeheader()
        w.writerows(history)


def run_is_done(out_dir: Path) -> bool:
    return (out_dir / "result.json").is_file()


def run_dir(root: Path, spec: RunSpec) -> Path:
    return root / spec.task / spec.network.name / f"fold-{spec.fold}"


# --- command line (torchvision reference shape) -----------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train one network on one fold (Chen et al. 2021 protocol)", add_help=add_help
    )
    parser.add_argument("--config", default="paper", help="TOML config file, or 'paper'/'smoke'")
    parser.add_argument("--manifest", type=Path, help="manifest CSV (overrides data.manifest)")
    parser.add_argument("--cache-dir", type=Path, help="preprocessing cache folder")
    parser.add_argument("--task", default="recognition", choices=["recognition", "manifestation"])
    parser.add_argument("--network", default="P-ResNet50",
                        help="UP-ResNet18, P-ResNet18, UP-ResNet50 or P-ResNet50")
    parser.add_argument("--fold", type=int, default=0, help="fold index (0..folds-1)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/train"),
                        help="run folder root; the run writes <root>/<task>/<network>/fold-<k>")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic algorithms (slower)")
    parser.add_argument("--weights", type=Path,
                        help="local ImageNet weights file for the network's architecture")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint-last.pt")
    parser.add_argument("--split-file", type=Path,
                        help="CSV subject,role[,fold] instead of the 70/15/15 five-fold split")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The effective config: the file, then command-line overrides (args are not modified)."""
    from ctdx.model_train.config import with_overrides

    config = load_config(Path(args.config))
    network = NetworkSpec.parse(args.network)
    pretrained: dict[str, Any] = {network.arch: args.weights.absolute()} if args.weights else {}
    return with_overrides(
        config,
        data={"manifest": args.manifest.absolute() if args.manifest else None,
              "cache_dir": args.cache_dir.absolute() if args.cache_dir else None},
        train={"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device,
               "seed": args.seed, "deterministic": args.deterministic},
        pretrained=pretrained,
        split={"file": args.split_file.absolute() if args.split_file else None},
    )


def main(args: argparse.Namespace) -> RunResult:
    """Build the cache if needed, load the fold, train, evaluate."""
    from ctdx.model_train.data import (
        ensure_cached,
        load_task_data,
        study_manifest,
        task_folds,
        task_manifest,
    )

    config = config_from_args(args)
    spec = RunSpec(task=args.task, network=NetworkSpec.parse(args.network), fold=args.fold)
    params = config.preprocess_params()
    manifest = task_manifest(config, spec.task)
    folds = task_folds(config, spec.task, manifest)
    if not 0 <= spec.fold < len(folds):
        raise ConfigError(f"fold {spec.fold} outside 0..{len(folds) - 1}")
    studies = study_manifest(config) if spec.task == "recognition" else None
    ensure_cached(config, studies or manifest, params, progress=sys.stderr.isatty())
    data = load_task_data(config, spec.task, folds[spec.fold], manifest, params, studies)
    return run_training(config, spec, data, run_dir(args.output_dir, spec), resume=args.resume)


if __name__ == "__main__":
    from ctdx.db.logs import configure_logging

    configure_logging()
    main(get_args_parser().parse_args())
