"""Per-process state of a worker: the models (loaded once), the engine, torch threads.

Celery's prefork pool forks its children from the main process, so the main
process loads nothing heavy: it checks the database (``on_worker_init``) and
remembers the concurrency; each child sets its torch thread count and loads
the models in ``worker_process_init`` (``on_process_init``). A process that
gets a task without that signal (``process_study.apply`` in-process, the
embedded mode) loads lazily on its first task. Either way a process loads its
models once, never per task.

The device is the GPU when ``CTDX_DEVICE=auto`` finds one (bf16, channels-last;
see ``ctdx.model_train.method.inference``), the CPU otherwise; it is reported with
every analysis, with the runtime that served (on a CPU with a checkpoint carrying
both int8 runtimes, the faster on this host: ``cpu_runtime_cache``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from ctdx.db.migrate import DatabaseNotReady, require_head
from ctdx.db.session import engine_for, make_engine
from ctdx.db.settings import Settings
from ctdx.worker.claim import ModelIdentity
from ctdx.worker.errors import WorkerNotReady

if TYPE_CHECKING:
    from ctdx.model_train.method.inference import SliceClassifier
    from ctdx.worker.segmenter import Segmenter

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_models: dict[tuple[str, str | None, str, str, str], Models] = {}
_concurrency: int | None = None


@dataclass(frozen=True)
class Models:
    """The loaded networks of one process and what the results record about them."""

    recognition: SliceClassifier
    manifestation: SliceClassifier | None
    segment: Segmenter  # the configured lung segmentation, on the classifier's device
    identity: ModelIdentity
    device: str  # reported in every analysis, e.g. "cpu (2 threads, bfloat16)"


def engine(settings: Settings) -> Engine:
    """This process's engine for the results database (created after any fork)."""
    return engine_for(settings.resolved_database_url)


def torch_threads(settings: Settings, concurrency: int | None) -> int:
    """Intra-op threads per process: ``CTDX_TORCH_THREADS``, else the cores shared among the
    pool's processes.

    On a CPU busy with other processes, torch's threads wait for each other: on the 2-core dev
    VM at load 3-4, one thread analysed a 148-slice study in 34-38 s, two threads in 54-56 s
    (``benchmarks/results/worker.md``).
    """
    if settings.torch_threads:
        return settings.torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, concurrency or 1))


def on_worker_init(settings: Settings, concurrency: int | None) -> None:
    """Main process: refuse to start against a database behind the code (exits the worker)."""
    global _concurrency
    _concurrency = concurrency
    check_engine = make_engine(settings.resolved_database_url)
    try:
        require_head(check_engine)
    except (DatabaseNotReady, OperationalError) as exc:
        logger.critical("worker cannot start: %s", exc)
        raise SystemExit(3) from exc
    finally:
        check_engine.dispose()  # no pooled connections may leak into forked children


def on_process_init(settings: Settings) -> None:
    """Pool process: size torch's thread pool, then load the models (errors are retried lazily)."""
    import torch

    threads = torch_threads(settings, _concurrency)
    torch.set_num_threads(threads)
    logger.info("worker process %d: %d torch threads", os.getpid(), threads)
    try:
        get_models(settings)
    except WorkerNotReady as exc:
        logger.error("models not loaded at process start: %s", exc)


def get_models(settings: Settings) -> Models:
    """The models of ``settings``, loaded on the first call in this process."""
    key = (
        str(settings.model),
        str(settings.manifestation_model) if settings.manifestation_model else None,
        settings.device,
        settings.precision,
        settings.segmentation_backend,
    )
    with _lock:
        models = _models.get(key)
        if models is None:
            models = _load(settings)
            _models.clear()  # one set per process: the settings do not change at run time
            _models[key] = models
        return models


def cpu_runtime_cache(settings: Settings) -> Path:
    """Where ``CTDX_PRECISION=auto`` remembers which int8 runtime was faster on this host, per
    model (``ctdx.model_train.method.cpu_runtime``)."""
    return settings.data_dir / "cpu-runtime.json"


def _load(settings: Settings) -> Models:
    if settings.model is None:
        raise WorkerNotReady("no recognition model configured (CTDX_MODEL)")
    if settings.torch_threads:  # also where no worker_process_init ran (in-process, embedded)
        import torch

        torch.set_num_threads(settings.torch_threads)
    from ctdx.model_train.method.checkpoint import CheckpointError
    from ctdx.model_train.method.inference import SliceClassifier
    from ctdx.model_train.method.quantize import QuantizationError
    from ctdx.worker.segmenter import segmenter

    try:
        recognition = SliceClassifier.from_checkpoint(
            settings.model, task="recognition", device=settings.device,
            precision=settings.precision, choice_cache=cpu_runtime_cache(settings),
        )
        manifestation = (
            SliceClassifier.from_checkpoint(
                settings.manifestation_model, task="manifestation", device=settings.device,
                precision=settings.precision, choice_cache=cpu_runtime_cache(settings),
            )
            if settings.manifestation_model
            else None
        )
        segment = segmenter(settings.segmentation_backend, recognition.device)
    except (CheckpointError, QuantizationError, ValueError) as exc:  # ValueError: no CUDA device,
        # or a precision this device or checkpoint cannot serve
        raise WorkerNotReady(str(exc)) from exc
    except ImportError as exc:  # a segmentation backend whose dependencies are missing
        raise WorkerNotReady(f"segmentation backend {settings.segmentation_backend!r}: {exc}") \
            from exc
    from ctdx.worker.report.warmup import warm_up

    warm_up()  # the first study's reports then cost what every later study's do
    meta = recognition.meta
    identity = ModelIdentity(
        model_name=meta.model_name,
        model_version=meta.model_version,
        model_uid=meta.model_uid,
        manifestation_model_uid=manifestation.meta.model_uid if manifestation else None,
    )
    logger.info("models loaded: %s %s (uid %s)%s on %s", meta.model_name, meta.model_version,
                meta.model_uid, " + manifestations" if manifestation else "",
                recognition.device_description)
    return Models(recognition, manifestation, segment, identity, recognition.device_description)
