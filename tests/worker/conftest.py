"""Fixtures of the worker tests: a spool + database filled like the listener does, small models.

``add_series`` stores DICOM files the way the listener does (a file under the
spool, ``studies``/``study_versions``/``series``/``instances`` rows) so the
worker can be tested before and independently of ``scp/``. Files from
``../shared/data`` are symlinked into the temporary spool, never copied into
the repository.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, select

from ctdx.db.models import Instance, Series, Study, StudyVersion, VersionState
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings, load_settings
from ctdx.worker.study import InstanceRef
from tests.conftest import REPO_ROOT


@dataclass(frozen=True)
class StoredStudy:
    study_version_id: int
    study_instance_uid: str
    series_instance_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]


def instance_refs(paths: Sequence[Path]) -> list[InstanceRef]:
    """What the worker knows of stored files, read from their headers."""
    refs = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append(InstanceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                str(ds.file_meta.TransferSyntaxUID), path))
    return refs


def store_files(
    engine: Engine, spool_dir: Path, files: Sequence[Path], version: int = 1, link: bool = True
) -> StoredStudy:
    """Put ``files`` (one study) into the spool and the listener's tables; state ``queued``."""
    sops: list[str] = []
    series_uids: list[str] = []
    with session_scope(engine) as session:
        version_row: StudyVersion | None = None
        study_uid = ""
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                study = Study(study_instance_uid=study_uid, patient_id=str(ds.get("PatientID", "")))
                session.add(study)
                session.flush()
            if version_row is None:
                version_row = StudyVersion(
                    study_id=study.id, version=version, state=VersionState.QUEUED.value
                )
                session.add(version_row)
                session.flush()
            series_uid = str(ds.SeriesInstanceUID)
            series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            if series is None:
                number = ds.get("SeriesNumber")
                series = Series(
                    study_id=study.id,
                    series_instance_uid=series_uid,
                    modality=str(ds.get("Modality", "")) or None,
                    series_number=int(number) if number not in (None, "") else None,
                )
                session.add(series)
                session.flush()
                series_uids.append(series_uid)
            sop = str(ds.SOPInstanceUID)
            relative = Path(study_uid) / series_uid / f"{sop}.dcm"
            target = spool_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.resolve() != target.resolve():
                if link:
                    target.symlink_to(path.resolve())
                else:
                    target.write_bytes(path.read_bytes())
            session.add(
                Instance(
                    series_id=series.id,
                    study_version_id=version_row.id,
                    sop_instance_uid=sop,
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=str(relative),
                    size_bytes=path.stat().st_size,
                    sha256=hashlib.sha256(str(path).encode()).hexdigest(),
                )
            )
            sops.append(sop)
        assert version_row is not None, "no files given"
        version_row.instance_count = len(sops)
        return StoredStudy(version_row.id, study_uid, tuple(series_uids), tuple(sops))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Callable[..., StoredStudy]]:
    """``store(url, files)``: put files into ``tmp_path/data/spool`` and the DB at ``url``."""
    engines: dict[str, Engine] = {}

    def _store(url: str, files: Sequence[Path], **kwargs: object) -> StoredStudy:
        engine = engines.setdefault(url, make_engine(url))
        return store_files(engine, tmp_path / "data" / "spool", files, **kwargs)  # type: ignore[arg-type]

    yield _store
    for engine in engines.values():
        engine.dispose()


@dataclass(frozen=True)
class Checkpoints:
    recognition: Path
    manifestation: Path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """Small random-weight checkpoints (fixed seed; ImageNet weights cannot be downloaded here).

    ResNet18 on 64 x 64 inputs for both tasks keeps the tests quick (the worker takes
    architecture and input size from the checkpoint; the benchmark times the paper's
    ResNet50 at 224). The recognition head is biased towards COVID-19 so every analysed
    slice is called COVID-19 and the manifestation network runs.
    """
    import torch

    from ctdx.model_train.method.checkpoint import CheckpointMeta, save_checkpoint
    from ctdx.model_train.method.networks import build_resnet
    from ctdx.model_train.method.preprocess import PreprocessParams

    small = PreprocessParams(size=64)

    out = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    recognition = build_resnet("resnet18")
    with torch.no_grad():
        recognition.fc.bias.copy_(torch.tensor([6.0, 0.0, 0.0]))
    rec_path, man_path = out / "recognition.pt", out / "manifestation.pt"
    save_checkpoint(rec_path, recognition, CheckpointMeta.new(
        "recognition", "resnet18", "test-recognition", "0.0.1",
        training_data={"note": "random weights, tests only"}, preprocess=small,
    ))
    save_checkpoint(man_path, build_resnet("resnet18"), CheckpointMeta.new(
        "manifestation", "resnet18", "test-manifestation", "0.0.1",
        training_data={"note": "random weights, tests only"}, preprocess=small,
    ))
    return Checkpoints(rec_path, man_path)


@pytest.fixture(scope="session")
def small_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default rules, but short test series (4 slices and up) are usable."""
    path = tmp_path_factory.mktemp("rules") / "rules.toml"
    path.write_text(
        '[[filters]]\nattribute = "modality"\nin = ["CT"]\n'
        '[[filters]]\nattribute = "axial_cosine"\nmin = 0.9\n'
        '[[filters]]\nattribute = "slice_count"\nmin = 4\n'
        '[[preferences]]\nattribute = "convolution_kernel"\nprefer_match = ["*LUNG*", "B7*"]\n'
        '[[preferences]]\nattribute = "slice_count"\nprefer = "highest"\n'
    )
    return path


def analysis_settings(
    data_dir: Path, database_url: str, checkpoints: Checkpoints, rules: Path | None,
    **overrides: object,
) -> Settings:
    values: dict[str, object] = dict(
        data_dir=data_dir, database_url=database_url, broker_url="memory://",
        model=checkpoints.recognition, manifestation_model=checkpoints.manifestation,
        series_rules=rules, batch_size=8, claim_timeout=30, device="cpu",
        metrics_port=0, worker_metrics_port=0,  # never the defaults: tests run in parallel
    )
    values.update(overrides)
    return load_settings(**values)


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}
    for name in ("data_dir", "database_url", "broker_url", "model", "manifestation_model",
                 "series_rules", "batch_size", "claim_timeout", "task_time_limit", "device",
                 "min_lung_fraction", "pacs_ae_title", "pacs_host", "pacs_port",
                 "metrics_port", "worker_metrics_port", "queued_timeout"):
        value = getattr(settings, name)
        if value is not None:
            env[f"CTDX_{name.upper()}"] = str(value)
    return env


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def _start(settings: Settings, queue: str, name: str, pool: str = "solo",
               command: list[str] | None = None) -> WorkerProcess:
        log = tmp_path / f"worker-{name}.log"
        argv = command or [sys.executable, "-m", "celery", "-A", "ctdx.worker.celery_app", "worker"]
        argv = [*argv, "-Q", queue, "--pool", pool, "--concurrency", "1",
                "--hostname", f"{name}@%h", "--loglevel", "INFO"]
        if command is None:
            argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with log.open("wb") as fh:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_env(settings), stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        worker = WorkerProcess(proc, log)
        workers.append(worker)
        return worker

    yield _start
    for worker in workers:
        worker.stop()


@pytest.fixture
def redis_queue(redis_url: str) -> Iterator[str]:
    """A queue of this test's own; its keys are deleted afterwards."""
    import redis

    name = f"ctdx-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name, *[f"{name}\x06\x16{p}" for p in range(10)])
    for key in client.scan_iter("_kombu.binding.*"):
        for member in client.smembers(key):
            if name.encode() in member:
                client.srem(key, member)
    client.close()
