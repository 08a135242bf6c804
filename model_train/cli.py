"""``ctdx train``: import data, build the cache, train, reproduce the paper, export models.

Heavy modules (torch, the method) are imported inside the commands, so ``ctdx --help``
stays fast. Expected failures (a bad manifest or config, missing data) become a
one-line message and exit code 2 through :class:`ctdx.db.cli.UserError`.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

logger = logging.getLogger(__name__)

train_app = typer.Typer(
    help="Training: reproduce Chen et al. 2021 on a labelled data set and export models "
    "for the worker (see docs/training.md).",
    no_args_is_help=True,
)
import_app = typer.Typer(
    help="Write a manifest CSV from a data set's folder layout.", no_args_is_help=True
)
train_app.add_typer(import_app, name="import")

ConfigArg = Annotated[str, typer.Argument(
    help="TOML config file, or the name of a packaged one: 'paper' (the paper's protocol) "
    "or 'smoke' (a tiny run).")]
ManifestOpt = Annotated[Path | None, typer.Option(
    "--manifest", help="Manifest CSV (overrides data.manifest).", exists=True, dir_okay=False)]
ManManifestOpt = Annotated[Path | None, typer.Option(
    "--manifestation-manifest",
    help="Manifest CSV for the manifestation task (default: rows of --manifest with a "
    "manifestation).", exists=True, dir_okay=False)]
CacheOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Preprocessing cache folder (overrides data.cache_dir).")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="auto (GPU when present), cpu, cuda or cuda:N.")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", min=1, help="Override train.epochs.")]
WeightsOpt = Annotated[list[str] | None, typer.Option(
    "--pretrained", help="ARCH=FILE: local ImageNet weights (torchvision state dict) for "
    "resnet18 or resnet50 instead of downloading them; repeatable.")]
ClassMapOpt = Annotated[list[str] | None, typer.Option(
    "--class-map", help="NAME=CLASS: map a folder or table class name to covid19, "
    "other_pneumonia or normal; repeatable.")]
SplitFileOpt = Annotated[Path | None, typer.Option(
    "--split-file", help="CSV subject,role[,fold] (role train, val or test) instead of the "
    "70/15/15 five-fold construction: e.g. all subjects in train for a small set, or another "
    "site's subjects as test (docs/training.md).", exists=True, dir_okay=False)]


def _with_split_file(cfg: object, split_file: Path | None) -> object:
    """``cfg`` with ``split.file`` set from ``--split-file`` (unchanged without it)."""
    from ctdx.model_train.config import ConfigError, with_overrides

    try:
        return with_overrides(cfg, split={"file": split_file.absolute() if split_file else None})  # type: ignore[arg-type]
    except ConfigError as exc:
        raise _user_error(str(exc)) from None


def _user_error(message: str) -> Exception:
    from ctdx.db.cli import UserError

    return UserError(message)


def _configure_logging() -> None:
    from ctdx.db.logs import configure_logging

    configure_logging(rich=sys.stderr.isatty())


def _command_line(*parts: object) -> str:
    """The command as a user would type it again (options that were given, in order)."""
    words: list[str] = []
    i = 0
    items = list(parts)
    while i < len(items):
        word = items[i]
        if isinstance(word, str) and word.startswith("--") and i + 1 < len(items):
            value = items[i + 1]
            i += 2
            if value is None or value is False:
                continue
            if isinstance(value, list):
                for v in value:
                    words += [word, str(v)]
            else:
                words += [word] if value is True else [word, str(value)]
            continue
        words.append(str(word))
        i += 1
    return " ".join(shlex.quote(w) for w in words)


def _load(config: str, manifest: Path | None = None, manifestation_manifest: Path | None = None,
          cache_dir: Path | None = None, device: str | None = None, epochs: int | None = None,
          pretrained: list[str] | None = None) -> object:
    from ctdx.model_train.config import ConfigError, load_config, with_overrides

    try:
        weights: dict[str, object] = {}
        for pair in pretrained or []:
            arch, sep, file = pair.partition("=")
            if not sep or arch not in ("resnet18", "resnet50"):
                raise ConfigError(f"--pretrained {pair!r} is not resnet18=FILE or resnet50=FILE")
            if not Path(file).is_file():
                raise ConfigError(f"--pretrained {pair!r}: file not found")
            weights[arch] = Path(file).absolute()
        return with_overrides(
            load_config(Path(config)),
            data={"manifest": manifest.absolute() if manifest else None,
                  "manifestation_manifest": (manifestation_manifest.absolute()
                                             if manifestation_manifest else None),
                  "cache_dir": cache_dir.absolute() if cache_dir else None},
            train={"device": device, "epochs": epochs},
            pretrained=weights,
        )
    except ConfigError as exc:
        raise _user_error(str(exc)) from None


def _expected_errors() -> tuple[type[Exception], ...]:
    from ctdx.model_train.cache import CacheError
    from ctdx.model_train.config import ConfigError
    from ctdx.model_train.data import DataError
    from ctdx.model_train.export import ExportError
    from ctdx.model_train.manifest import ManifestError
    from ctdx.model_train.method.checkpoint import CheckpointError
    from ctdx.model_train.method.networks import PretrainedWeightsError
    from ctdx.model_train.method.quantize import QuantizationError
    from ctdx.model_train.report import ReportError
    from ctdx.model_train.sources import SourceError
    from ctdx.model_train.splits import SplitError
    from ctdx.model_train.train import TrainError

    return (CacheError, ConfigError, DataError, ExportError, ManifestError, CheckpointError,
            PretrainedWeightsError, QuantizationError, ReportError, SourceError, SplitError,
            TrainError, FileNotFoundError)


# --- import ------------------------------------------------------------------------------


def _write(rows: object, out: Path) -> None:
    from ctdx.model_train.manifest import Manifest, write_manifest

    assert isinstance(rows, tuple)
    write_manifest(rows, out)
    summary = Manifest(rows).summary()
    typer.echo(f"wrote {out}: {summary['rows']} rows, {summary['subjects']} subjects, "
               f"{summary['studies']} studies; per class {summary['rows_per_class']}")


@import_app.command("dicom")
def import_dicom(
    source: Annotated[Path, typer.Argument(
        help="A per-file label table (slice_labels.csv, COVID-CT-MD layout) or the folder "
        "holding it; with --tree, a folder of <class>/<subject>/ DICOM series.", exists=True)],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
    tree: Annotated[bool, typer.Option(
        "--tree", help="No label table: one row per series under <class>/<subject>/.")] = False,
    class_map: ClassMapOpt = None,
) -> None:
    """DICOM series with slice labels (COVID-CT-MD) or class folders of series."""
    from ctdx.model_train.importers.common import parse_class_map
    from ctdx.model_train.importers.dicom_table import import_dicom_table, import_dicom_tree

    try:
        mapping = parse_class_map(class_map)
        rows = import_dicom_tree(source, mapping) if tree else import_dicom_table(source, mapping)
        _write(rows, out)
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None


@import_app.command("images")
def import_images(
    root: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class "
                                         "(CC-CCII: NCP/CP/Normal; COVID-CT: CT_COVID/...).",
                                         exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
    class_map: ClassMapOpt = None,
    window_center: Annotated[float, typer.Option(help="Display window the images were "
                                                 "exported with (HU).")] = -600.0,
    window_width: Annotated[float, typer.Option(help="Window width (HU).")] = 1500.0,
) -> None:
    """Folders of 8-bit slice images per class (CC-CCII, COVID-CT)."""
    from ctdx.model_train.importers.common import parse_class_map
    from ctdx.model_train.importers.image_folders import import_image_folders

    try:
        rows = import_image_folders(root, parse_class_map(class_map),
                                    window=(window_center, window_width))
        _write(rows, out)
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None


@import_app.command("medseg")
def import_medseg_cmd(
    root: Annotated[Path, typer.Argument(help="Folder with images/, masks/ (and labels.csv), "
                                         "e.g. shared/data/medseg-covid19-ggo-consolidation.",
                                         exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
) -> None:
    """Images with GGO / consolidation masks, for the manifestation task."""
    from ctdx.model_train.importers.medseg import import_medseg

    try:
        _write(import_medseg(root), out)
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None


# --- cache, train, reproduce, evaluate, export ------------------------------------------------


@train_app.command("cache")
def cache_command(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.", exists=True, dir_okay=False)],
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Cache folder.")] = Path(
        "ctdx-train-cache"),
    size: Annotated[int, typer.Option(help="Network input size (paper: 224).")] = 224,
    workers: Annotated[int, typer.Option(min=1, help="Processes (default: 2).")] = 2,
) -> None:
    """Segment and preprocess every slice once (resumable; run again after a stop)."""
    _configure_logging()
    from ctdx.model_train.cache import build_cache, cache_root
    from ctdx.model_train.manifest import read_manifest
    from ctdx.model_train.method.preprocess import PreprocessParams
    from ctdx.model_train.sources import expand_rows

    try:
        params = PreprocessParams(size=size)
        sources = expand_rows(read_manifest(manifest).rows)
        report = build_cache(sources, cache_dir, params, workers=workers,
                             progress=sys.stderr.isatty())
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None
    typer.echo(f"{cache_root(cache_dir, params)}: {report.total} slices, {report.computed} "
               f"computed, {report.reused} already cached, {len(report.failures)} failed")


@train_app.command("train")
def train_command(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", help="Run root; the run writes "
                                      "<out>/<task>/<network>/fold-<k>/.")],
    task: Annotated[str, typer.Option(help="recognition or manifestation.")] = "recognition",
    network: Annotated[str, typer.Option(help="UP-ResNet18, P-ResNet18, UP-ResNet50 or "
                                         "P-ResNet50.")] = "P-ResNet50",
    fold: Annotated[int, typer.Option(min=0, help="Fold index.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's "
                                         "checkpoint-last.pt.")] = False,
    manifest: ManifestOpt = None,
    manifestation_manifest: ManManifestOpt = None,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    epochs: EpochsOpt = None,
    pretrained: WeightsOpt = None,
    split_file: SplitFileOpt = None,
) -> None:
    """Train one network on one fold (the unit of `reproduce`)."""
    _configure_logging()
    from ctdx.model_train.config import Config, NetworkSpec
    from ctdx.model_train.data import (
        ensure_cached,
        load_task_data,
        study_manifest,
        task_folds,
        task_manifest,
    )
    from ctdx.model_train.pretrained import ensure_pretrained
    from ctdx.model_train.train import RunSpec, run_dir, run_training

    if task not in ("recognition", "manifestation"):
        raise _user_error(f"--task must be recognition or manifestation, not {task!r}")
    cfg = _load(config, manifest, manifestation_manifest, cache_dir, device, epochs, pretrained)
    cfg = _with_split_file(cfg, split_file)
    assert isinstance(cfg, Config)
    try:
        spec = RunSpec(task=task, network=NetworkSpec.parse(network), fold=fold)  # type: ignore[arg-type]
        ensure_pretrained(cfg, [spec.network])
        params = cfg.preprocess_params()
        rows = task_manifest(cfg, spec.task)
        studies = study_manifest(cfg) if spec.task == "recognition" else None
        folds = task_folds(cfg, spec.task, rows)
        if fold >= len(folds):
            raise _user_error(f"--fold {fold} outside 0..{len(folds) - 1}")
        ensure_cached(cfg, studies or rows, params, progress=sys.stderr.isatty())
        ensure_cached(cfg, rows, params, progress=sys.stderr.isatty())
        data = load_task_data(cfg, spec.task, folds[fold], rows, params, studies)
        from ctdx.model_train.progress import ProgressBar

        bar = (ProgressBar(cfg.train.epochs * len(data.train), spec.name)
               if sys.stderr.isatty() else None)
        try:
            result = run_training(cfg, spec, data, run_dir(out, spec), resume=resume,
                                  on_batch=bar.advance if bar else None)
        finally:
            if bar:
                bar.close()
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None
    def acc(v: float, missing: str) -> str:
        return missing if v != v else f"{v:.4f}"  # NaN: the split has no such set

    typer.echo(f"{spec.name}: kept epoch {result.best_epoch}, validation accuracy "
               f"{acc(result.best_val_accuracy, 'n/a (no validation set: last epoch kept)')}, "
               f"test accuracy {acc(result.test_accuracy, 'n/a (no test set)')} "
               f"-> {result.out_dir}")


@train_app.command("reproduce")
def reproduce_command(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", help="Run root for the whole grid and its "
                                      "report (<out>/report/).")],
    manifest: ManifestOpt = None,
    manifestation_manifest: ManManifestOpt = None,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    epochs: EpochsOpt = None,
    pretrained: WeightsOpt = None,
    split_file: SplitFileOpt = None,
) -> None:
    """Run the paper's grid (4 networks x 5 folds, 2 x 5 for manifestations) and write the
    report (Tables 1-5, Figs. 4, 6, 7). Finished runs are skipped: run again to resume."""
    _configure_logging()
    from ctdx.model_train.config import Config
    from ctdx.model_train.pretrained import ensure_pretrained
    from ctdx.model_train.reproduce import reproduce

    cfg = _load(config, manifest, manifestation_manifest, cache_dir, device, epochs, pretrained)
    cfg = _with_split_file(cfg, split_file)
    assert isinstance(cfg, Config)
    try:
        ensure_pretrained(cfg)  # before any work: offline machines fail here, not mid-grid
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None

    def on_run(spec: object, state: str) -> None:
        if state == "start":
            typer.echo(f"training {getattr(spec, 'name', spec)}", err=True)

    try:
        command = _command_line(
            "ctdx", "train", "reproduce", config, "--manifest", manifest,
            "--manifestation-manifest", manifestation_manifest, "--cache-dir", cache_dir,
            "--device", device, "--epochs", epochs, "--pretrained", pretrained,
            "--split-file", split_file, "--out", out)
        result = reproduce(cfg, out, command=command, progress=sys.stderr.isatty(),
                           on_run=on_run)
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None
    typer.echo(f"trained {len(result.trained)} runs, {len(result.skipped)} already done; "
               f"report: {result.report / 'README.md'}")


@train_app.command("evaluate")
def evaluate_command(
    run: Annotated[Path, typer.Argument(
        help="Run root of `reproduce` (or of `train` runs), or an exported model file "
        "(with --manifest and --out).", exists=True)],
    config: Annotated[str | None, typer.Option(
        "--config", help="Config for the report (default: the run root's config.toml; for "
        "a model file: 'paper').")] = None,
    threshold: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Study-level threshold (share of slices called COVID-19).")] = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="With a model file: the labelled external set (manifest CSV).",
        exists=True, dir_okay=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="With a model file: folder for the run and its report/.")] = None,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    precision: Annotated[str, typer.Option(
        help="With a model file: fp32, int8 (needs int8 weights), bf16 or auto (what a "
        "worker on this machine serves).")] = "fp32",
    split_file: Annotated[Path | None, typer.Option(
        "--split-file", help="With a model file: evaluate only the test subjects of this "
        "CSV subject,role[,fold].", exists=True, dir_okay=False)] = None,
) -> None:
    """Re-write the report of finished runs (e.g. at another study threshold), or evaluate an
    exported model on an external labelled manifest: the paper's tables for that set."""
    _configure_logging()
    import json
    import tomllib

    if run.is_file():
        _evaluate_model(run, manifest, out, config, threshold, cache_dir, device, precision,
                        split_file)
        return
    if manifest is not None or out is not None or split_file is not None:
        raise _user_error("--manifest, --out and --split-file go with an exported model file, "
                          "not a run root")

    from ctdx.model_train.config import config_from_dict, load_config, with_overrides
    from ctdx.model_train.report import write_report

    try:
        if config is not None:
            cfg = load_config(Path(config))
        elif (run / "config.toml").is_file():
            cfg = config_from_dict(tomllib.loads((run / "config.toml").read_text()), run)
        else:
            raise _user_error(f"{run} has no config.toml: give --config")
        cfg = with_overrides(cfg, evaluation={"threshold": threshold})
        summary_file = run / "data-summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        report = write_report(run, cfg, _command_line(
            "ctdx", "train", "evaluate", run, "--config", config, "--threshold", threshold),
            summary)
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None
    typer.echo(f"report: {report / 'README.md'}")


def _evaluate_model(model: Path, manifest: Path | None, out: Path | None, config: str | None,
                    threshold: float | None, cache_dir: Path | None, device: str | None,
                    precision: str, split_file: Path | None) -> None:
    """``evaluate MODEL --manifest EXTERNAL.csv --out DIR`` (model_train.external)."""
    from ctdx.model_train.config import Config, with_overrides
    from ctdx.model_train.external import evaluate_external

    if manifest is None or out is None:
        raise _user_error(f"{model} is a model file: give --manifest EXTERNAL.csv and --out DIR")
    if precision not in ("fp32", "int8", "bf16", "auto"):
        raise _user_error(f"--precision must be fp32, int8, bf16 or auto, not {precision!r}")
    cfg = _load(config or "paper", cache_dir=cache_dir, device=device)
    assert isinstance(cfg, Config)
    try:
        cfg = with_overrides(cfg, evaluation={"threshold": threshold})
        result = evaluate_external(model, manifest, out, cfg, split_file,
                                   precision,  # type: ignore[arg-type]
                                   _command_line("ctdx", "train", "evaluate", model,
                                                 "--manifest", manifest, "--out", out,
                                                 "--config", config, "--threshold", threshold,
                                                 "--precision", precision,
                                                 "--split-file", split_file))
    except _expected_errors() + (ValueError,) as exc:
        raise _user_error(str(exc)) from None
    typer.echo(f"{result.slices} slices, {result.studies} studies; report: "
               f"{result.report / 'README.md'}")


@train_app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder (<task>/<network>/fold-<k>) or a "
                                        "reproduce root.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint file for the worker "
                                      "(CTDX_MODEL / CTDX_MANIFESTATION_MODEL).")],
    task: Annotated[str, typer.Option(help="From a root: recognition or manifestation.")] = (
        "recognition"),
    network: Annotated[str | None, typer.Option(
        help="From a root: the network (default: best mean validation accuracy).")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model name shown in the SR.")] = None,
    model_version: Annotated[str, typer.Option(help="Model version shown in the SR.")] = "1.0",
    int8: Annotated[bool, typer.Option(
        "--int8", help="Also store int8 weights for CPU workers: calibrated on the run's "
        "training slices, checked against fp32 on its validation and test slices (needs the "
        "run's preprocessing cache). Where onnxruntime is installed (the onnx extra), also an "
        "ONNX Runtime int8 model from the same slices and check, which CTDX_PRECISION=auto "
        "serves on hosts where it measures faster.")] = False,
    int8_min_agreement: Annotated[float, typer.Option(
        "--int8-min-agreement", min=0.0, max=1.0,
        help="Refuse the int8 weights when they call fewer held-out slices as fp32 does.")] = 0.99,
    split_file: Annotated[Path | None, typer.Option(
        "--split-file", help="Split for the int8 calibration and check instead of the one the "
        "run recorded (split.json).", exists=True, dir_okay=False)] = None,
) -> None:
    """Write the worker's checkpoint (new model UID, classes, preprocessing, data summary)."""
    _configure_logging()
    from ctdx.model_train.export import export_run

    if task not in ("recognition", "manifestation"):
        raise _user_error(f"--task must be recognition or manifestation, not {task!r}")
    try:
        exported = export_run(run, out, model_name, model_version, task,  # type: ignore[arg-type]
                              network, int8=int8, min_agreement=int8_min_agreement,
                              split_file=split_file)
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None
    m = exported.meta
    typer.echo(f"{out}: {m.model_name} {m.model_version} ({m.task}, {m.arch}), model UID "
               f"{m.model_uid}, from {exported.run}")


@train_app.command("synthetic-data")
def synthetic_data_command(
    out: Annotated[Path, typer.Option("--out", help="New (or empty) folder to write into.")],
    subjects_per_class: Annotated[int, typer.Option(
        min=3, metavar="N", help="Phantom subjects per class (COVID-19, CAP, normal).")] = 7,
    slices: Annotated[int, typer.Option(min=4, metavar="N",
                                        help="Slices per phantom series.")] = 16,
    size: Annotated[int, typer.Option(min=64, metavar="PIXELS",
                                      help="Phantom image size.")] = 128,
    manifestation_per_class: Annotated[int, typer.Option(
        min=3, metavar="N", help="Manifestation images per class (ground glass, consolidation, "
        "fibrotic streaks).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the phantoms.")] = 0,
) -> None:
    """Write synthetic labelled data to try `ctdx train` without data of one's own: phantom
    DICOM series (COVID-CT-MD layout), manifestation images (MedSeg layout) and a manifest
    for each. Computed images, no patient data; NOT FOR CLINICAL USE."""
    _configure_logging()
    from ctdx.model_train.synthetic import write_synthetic_data

    try:
        written = write_synthetic_data(out, subjects_per_class=subjects_per_class,
                                       n_slices=slices, size=size,
                                       manifestation_per_class=manifestation_per_class,
                                       seed=seed)
    except FileExistsError as exc:
        raise _user_error(str(exc)) from None
    except _expected_errors() as exc:
        raise _user_error(str(exc)) from None
    typer.echo(f"{written.recognition_manifest}: {written.recognition_rows} slices of "
               f"{3 * subjects_per_class} phantom subjects (recognition)")
    typer.echo(f"{written.manifestation_manifest}: {written.manifestation_rows} images "
               "(manifestations)")
    typer.echo("try: " + _command_line(
        "ctdx", "train", "reproduce", "smoke", "--manifest", written.recognition_manifest,
        "--manifestation-manifest", written.manifestation_manifest, "--out", "runs/smoke"))


@train_app.command("demo-model")
def demo_model_command(
    out: Annotated[Path, typer.Option("--out", help="Recognition checkpoint to write.")],
    manifestation_out: Annotated[Path | None, typer.Option(
        "--manifestation-out", help="Manifestation checkpoint (default: "
        "<out stem>-manifestation.pt).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Where the trained pair is cached (default: ~/.cache/ctdx).")] = None,
) -> None:
    """Train (once, then cached) the synthetic demonstration models: ResNet50 recognition and
    ResNet18 manifestations on synthetic phantoms. NOT FOR CLINICAL USE."""
    from ctdx.model_train.cpu import passive_omp_threads

    passive_omp_threads()
    _configure_logging()
    from ctdx.model_train.demo_model import DEMO_NOTICE, write_demo_model
    from ctdx.model_train.method.checkpoint import read_checkpoint_meta
    from ctdx.model_train.progress import ProgressLines

    with ProgressLines(lambda line: typer.echo(line, err=True)) as progress:
        paths = write_demo_model(out, manifestation_out, cache_dir, progress)
    for path in (paths.recognition, paths.manifestation):
        assert path is not None
        meta = read_checkpoint_meta(path)
        typer.echo(f"{path}: {meta.model_name} {meta.model_version} (uid {meta.model_uid})")
    typer.secho(f"{DEMO_NOTICE.upper()}: trained on synthetic phantoms only.", fg="yellow")


def register(app: typer.Typer) -> None:
    """Add ``ctdx train`` to the root app."""
    app.add_typer(train_app, name="train")
