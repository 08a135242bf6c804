"""The synthetic demonstration models: what ``ctdx demo`` runs when no model is configured.

**Not for clinical use.** They are trained from scratch (unpretrained) on
synthetic chest phantoms (:mod:`ctdx.model_train.phantom`), so that the whole product
can be tried on a fresh machine without patient data or downloaded weights:
about 40 s wall and 55 s CPU on the quiet 2-core dev VM (see the README for the
numbers under load). Their names say so (``model_name`` carries
:data:`NAME_NOTICE` and fits DICOM LO; the checkpoint's training data carries
:data:`DEMO_NOTICE`), which the worker's SR and the CLI show.

- Recognition: ResNet50 (the paper's serving network), 3 classes, trained on
  phantom slices of COVID-19, other pneumonia and normal chests (lesion slices
  of the pneumonia phantoms; every slice of the normal ones), through the
  shared segmentation and preprocessing, at a reduced network input size
  (:attr:`DemoSettings.size`, stored in the checkpoint's preprocessing
  parameters, which the worker applies), a few epochs. Cheaper recipes were
  tried and dropped: 48 px, 3 epochs (also with twice the learning rate) or
  30% fewer slices all called the normal phantoms other pneumonia.
- Manifestations: ResNet18 on synthetic ground-glass / consolidation / fibrotic
  streak slices (:func:`ctdx.model_train.synthetic.write_manifestation_set`'s images).
- Both get int8 weights, checked against fp32 on held-out phantoms of other
  seeds, so the demo's worker serves int8 as a production CPU worker does.

The pair is cached under ``<cache_dir>/demo-<key>/`` (and the user cache,
``$XDG_CACHE_HOME/ctdx`` or ``~/.cache/ctdx``), ``key`` hashing the settings, the
method version and the checkpoint format, so a second call is instant and a
change of method retrains. Training reports to a
:class:`~model_train.progress.ProgressLines` when given one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctdx.model_train.cache import prepare_slices
from ctdx.model_train.data import SliceSet
from ctdx.model_train.int8 import int8_weights
from ctdx.model_train.method.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMeta,
    Int8Weights,
    read_checkpoint_meta,
    save_checkpoint,
)
from ctdx.model_train.method.classes import METHOD_VERSION, RECOGNITION_CLASSES, Task, classes_for
from ctdx.model_train.method.hu import MIN_HU
from ctdx.model_train.method.networks import build_resnet
from ctdx.model_train.method.preprocess import (
    AugmentParams,
    PreprocessParams,
    gray_from_uint8,
    to_network_input,
)
from ctdx.model_train.method.quantize import QuantizationError
from ctdx.model_train.phantom import PHANTOM_KINDS, phantom_volume
from ctdx.model_train.progress import ProgressLines
from ctdx.model_train.sources import LoadedSlice
from ctdx.model_train.train import epoch_generator, evaluate, train_one_epoch

logger = logging.getLogger(__name__)

# ASCII only: it goes into DICOM LO/ST text of the SR
DEMO_NOTICE = "synthetic demonstration model - not for clinical use"
#: What the model names say; with it each name fits Manufacturer's Model Name (LO, 64 chars)
NAME_NOTICE = "synthetic, not for clinical use"
RECOGNITION_NAME = f"demo ResNet50 recognition ({NAME_NOTICE})"
MANIFESTATION_NAME = f"demo ResNet18 manifestations ({NAME_NOTICE})"
DEMO_VERSION = "demo-2"
# bump when the training recipe below changes (3: int8 weights; 4: batch-norm statistics
# from shuffled batches, so the recognition network's int8 weights pass their check;
# 5: always one training thread, so the models do not depend on the machine's load)
_CODE_REVISION = 5
#: int8 calibration slices: a sample of the training phantoms is enough and saves seconds
_CALIBRATION_SLICES = 64


@dataclass(frozen=True)
class DemoSettings:
    """The reduced recipe (the paper's is 224 px, 50 epochs, real data)."""

    size: int = 64
    phantom_size: int = 128
    subjects_per_class: int = 4
    n_slices: int = 20
    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    manifestation_per_class: int = 12
    manifestation_epochs: int = 4
    min_lung_fraction: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class DemoModelPaths:
    recognition: Path
    manifestation: Path | None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctdx"


def demo_key(settings: DemoSettings) -> str:
    ident = {"settings": asdict(settings), "method": METHOD_VERSION, "format": FORMAT_VERSION,
             "revision": _CODE_REVISION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# --- data -------------------------------------------------------------------------------


def _slice_set(gray: np.ndarray, labels: list[int]) -> SliceSet:
    n = len(labels)
    names = tuple(f"synthetic-{i}" for i in range(n))
    return SliceSet(torch.from_numpy(gray).unsqueeze(1), torch.tensor(labels, dtype=torch.int64),
                    names, names, names)


def recognition_data(s: DemoSettings, params: PreprocessParams) -> SliceSet:
    """Phantom slices of every class through the shared segmentation and preprocessing."""
    spacing = 350.0 / s.phantom_size  # the phantom's PixelSpacing
    slices: list[LoadedSlice] = []
    labels: list[int] = []
    for ci, kind in enumerate(PHANTOM_KINDS):
        for j in range(s.subjects_per_class):
            volume = phantom_volume(kind, n_slices=s.n_slices, size=s.phantom_size,
                                    seed=1_000 + s.seed * 100 + ci * 10 + j)
            for sl in volume:
                if kind != "normal" and not sl.lesion:
                    continue  # the lesion_only slice policy (docs/training.md)
                hu = np.maximum(sl.hu.astype(np.float32), MIN_HU)
                slices.append(LoadedSlice(hu, spacing))
                labels.append(RECOGNITION_CLASSES.index(kind))
    prepared = prepare_slices(slices, params)
    keep = [i for i, (_, f) in enumerate(prepared) if f >= s.min_lung_fraction]
    gray = np.stack([prepared[i][0] for i in keep])
    return _slice_set(gray, [labels[i] for i in keep])


def manifestation_data(s: DemoSettings, params: PreprocessParams, work: Path) -> SliceSet:
    """Synthetic manifestation slices, imported like MedSeg (8-bit, rotated, cropped)."""
    from ctdx.model_train.importers.medseg import import_medseg
    from ctdx.model_train.sources import expand_rows, load_slice
    from ctdx.model_train.synthetic import write_manifestation_set

    root = write_manifestation_set(work / "manifestations", per_class=s.manifestation_per_class,
                                   size=s.phantom_size, seed=s.seed)
    rows = import_medseg(root)
    sources = expand_rows(rows)
    prepared = prepare_slices([load_slice(src) for src in sources], params)
    classes = classes_for("manifestation")
    gray = np.stack([g for g, _ in prepared])
    return _slice_set(gray, [classes.index(str(rows[src.row].manifestation))
                             for src in sources])


# --- training ---------------------------------------------------------------------------


def _train(model: nn.Module, data: SliceSet, params: PreprocessParams, epochs: int,
           s: DemoSettings, what: str, progress: ProgressLines | None = None) -> None:
    torch.manual_seed(s.seed)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    criterion = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    for epoch in range(epochs):
        if progress:
            progress.step(f"training the {what} network, epoch {epoch + 1}/{epochs}",
                          len(data), "slices")
        stats = train_one_epoch(model, criterion, optimizer, data, params, AugmentParams(),
                                device, s.batch_size, epoch_generator(s.seed, epoch),
                                amp=False, channels_last=True,
                                on_batch=progress.advance if progress else None)
        logger.info("demo %s epoch %d: loss %.3f acc %.3f (%.0f img/s)", what, epoch,
                    stats.loss, stats.accuracy, stats.images_per_second)
    if progress:
        progress.step(f"batch-norm statistics and a check of the {what} network")
    recalibrate_batchnorm(model, data, params, s.batch_size, s.seed)
    ev = evaluate(model, criterion, data, params, device, s.batch_size, amp=False)
    logger.info("demo %s: accuracy on its training slices in eval mode %.3f", what, ev.accuracy)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: SliceSet, params: PreprocessParams,
                          batch_size: int, seed: int = 0) -> None:
    """Replace BatchNorm running statistics by their exact average over ``data``.

    A few dozen optimisation steps leave the running averages (momentum 0.1) far
    from the statistics the final weights produce, and an eval-mode network then
    calls nearly everything one class. One forward pass in train mode with a
    cumulative average (``momentum=None``) fixes that without changing a weight.
    The batches are drawn in a seeded random order, as in training: in the data's
    own order (one class after another) every batch's variance is that of one
    class, their average underestimates the variance of the mixed data, and the
    eval-mode network's logits reach the thousands (fine for the argmax, but int8
    activation ranges cannot hold them and its int8 weights were refused).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(data), batch_size):
        idx = order[i : i + batch_size]
        x = to_network_input(gray_from_uint8(data.gray[idx], params), params)
        model(x.contiguous(memory_format=torch.channels_last))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def _int8(model: nn.Module, params: PreprocessParams, train: SliceSet, held_out: SliceSet,
          what: str) -> Int8Weights | None:
    """int8 weights checked on held-out phantoms, or None (fp32 only) if they disagree."""
    try:
        return int8_weights(model, params, train, held_out,
                            calibration_slices=_CALIBRATION_SLICES,
                            calibration_source=f"demo {what} training phantoms",
                            evaluation_source=f"held-out demo {what} phantoms "
                                              f"({len(held_out)} slices, other seeds)")
    except QuantizationError as exc:
        logger.info("demo %s model served in fp32 (its int8 weights were refused: %s)", what, exc)
        return None


def _save(path: Path, model: nn.Module, task: Task, arch: str, name: str,
          params: PreprocessParams, summary: dict[str, object],
          int8: Int8Weights | None) -> None:
    meta = CheckpointMeta.new(task=task, arch=arch, model_name=name,  # type: ignore[arg-type]
                              model_version=DEMO_VERSION, training_data=summary,
                              preprocess=params)
    save_checkpoint(path, model, meta, int8=int8)


#: Torch threads for training the demo models: one, always. The models must come out the
#: same wherever and whenever they are built: with the thread count chosen from the machine's
#: load (2 threads when quiet, 1 when busy), the quiet build's manifestation network differed
#: enough that its int8 weights agreed with fp32 on 11 of 12 held-out slices and were refused,
#: so the demo served fp32 on quiet machines only (1 thread: 12 of 12, both networks). One
#: thread also costs least while other processes keep the cores busy (12 training steps:
#: 7.5 s with 1 thread, 11.1 s with 2 at a load average of 3.4 on 2 cores).
TRAINING_THREADS = 1


def build_demo_models(folder: Path, s: DemoSettings = DemoSettings(),
                      progress: ProgressLines | None = None) -> DemoModelPaths:
    """Train both demonstration models into ``folder`` (no cache check); ``progress`` gets
    a line per step and per epoch."""
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)  # the same models on every machine and load
    logger.info("training the demo models with %d torch thread(s)", torch.get_num_threads())
    try:
        return _build(folder, s, progress, start)
    finally:
        torch.set_num_threads(saved_threads)


def _build(folder: Path, s: DemoSettings, progress: ProgressLines | None,
           start: float) -> DemoModelPaths:
    params = PreprocessParams(size=s.size)
    key = demo_key(s)
    common = {"synthetic": True, "notice": DEMO_NOTICE, "demo_key": key,
              "source": "ctdx.model_train.phantom / model_train.synthetic (no patient data)",
              "recipe": asdict(s)}
    if progress:
        progress.step("generating synthetic chest phantoms for the recognition network")
    rec_data = recognition_data(s, params)
    rec = build_resnet("resnet50", num_classes=3)
    _train(rec, rec_data, params, s.epochs, s, "recognition (ResNet50)", progress)
    held = replace(s, seed=s.seed + 1, subjects_per_class=1, manifestation_per_class=4)
    if progress:
        progress.step("calibrating and checking int8 weights of the recognition network")
    rec8 = _int8(rec, params, rec_data, recognition_data(held, params), "recognition")
    if progress:
        progress.step("generating synthetic manifestation images")
    with tempfile.TemporaryDirectory(prefix="ctdx-demo-") as tmp:
        man_data = manifestation_data(s, params, Path(tmp))
        man_held = manifestation_data(held, params, Path(tmp) / "held-out")
    man = build_resnet("resnet18", num_classes=3)
    _train(man, man_data, params, s.manifestation_epochs, s, "manifestation (ResNet18)",
           progress)
    if progress:
        progress.step("calibrating and checking int8 weights of the manifestation network")
    man8 = _int8(man, params, man_data, man_held, "manifestation")
    folder.mkdir(parents=True, exist_ok=True)
    paths = DemoModelPaths(folder / "recognition.pt", folder / "manifestation.pt")
    _save(paths.recognition, rec, "recognition", "resnet50", RECOGNITION_NAME, params,
          {**common, "slices_per_class": rec_data.class_counts(classes_for("recognition"))},
          rec8)
    assert paths.manifestation is not None
    _save(paths.manifestation, man, "manifestation", "resnet18", MANIFESTATION_NAME, params,
          {**common, "slices_per_class": man_data.class_counts(classes_for("manifestation"))},
          man8)
    logger.info("demo models trained in %.1f s", time.perf_counter() - start)
    return paths


def _valid(path: Path, key: str) -> bool:
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError:
        return False
    return meta.method_version == METHOD_VERSION and meta.training_data.get("demo_key") == key


def _cached_pair(folder: Path, key: str) -> DemoModelPaths | None:
    paths = DemoModelPaths(folder / "recognition.pt", folder / "manifestation.pt")
    assert paths.manifestation is not None
    if _valid(paths.recognition, key) and _valid(paths.manifestation, key):
        return paths
    return None


def _install(src: Path, folder: Path) -> None:
    """Copy a trained pair into ``folder`` atomically (rename of whole files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("recognition.pt", "manifestation.pt"):
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, folder / name)


def ensure_demo_models(cache_dir: Path | None = None,
                       settings: DemoSettings = DemoSettings(),
                       progress: ProgressLines | None = None) -> DemoModelPaths:
    """The cached demonstration models in ``cache_dir``, trained first if absent or stale.

    A valid pair in the user cache (:func:`default_cache_dir`) is copied instead of
    retraining, and a freshly trained pair is also left there (best effort), so a
    second call is instant whichever folder it names.
    """
    key = demo_key(settings)
    user_folder = default_cache_dir() / f"demo-{key}"
    folder = (cache_dir or default_cache_dir()) / f"demo-{key}"
    found = _cached_pair(folder, key)
    if found is not None:
        return found
    if folder != user_folder and _cached_pair(user_folder, key) is not None:
        _install(user_folder, folder)
        logger.info("demo models copied from the user cache %s", user_folder)
        found = _cached_pair(folder, key)
        assert found is not None
        return found
    logger.info("training the synthetic demonstration models into %s", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".demo-{key}-", dir=folder.parent))
    try:
        build_demo_models(staging, settings, progress)
        _install(staging, folder)
        if folder != user_folder:
            try:
                _install(staging, user_folder)
            except OSError as exc:
                logger.info("demo models not copied to the user cache: %s", exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = _cached_pair(folder, key)
    assert found is not None
    return found


def write_demo_model(out: Path, manifestation_out: Path | None = None,
                     cache_dir: Path | None = None,
                     progress: ProgressLines | None = None) -> DemoModelPaths:
    """``ctdx train demo-model --out FILE``: copy the cached models to the given files."""
    cached = ensure_demo_models(cache_dir, progress=progress)
    man_out = manifestation_out or out.with_name(f"{out.stem}-manifestation{out.suffix or '.pt'}")
    for src, dst in ((cached.recognition, out), (cached.manifestation, man_out)):
        assert src is not None
        if Path(dst).absolute() != src.absolute():
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return DemoModelPaths(out, man_out)
