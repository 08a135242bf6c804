"""Fixtures of the report tests: an analysed phantom study in a real spool and database.

Analyses are written with the ORM directly (the worker is not needed): a
phantom CT series is written into the spool, the listener's rows point at it,
and an ``analyses`` row with per-slice results says what a model would have
found (lesion slices called COVID-19 with high probability).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Instance,
    Series,
    SliceResult,
    Study,
    StudyVersion,
    VersionState,
    utcnow,
)
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings, load_settings
from ctdx.model_train.phantom import PhantomKind, phantom_labels, write_phantom_series
from tests.conftest import free_port, require_tool, wait_for

MODEL_UID = "1.2.826.0.1.3680043.8.498.1234567890.1"
MANIFESTATIONS = ("ground_glass_opacity", "consolidation", "fibrotic_streaks")


@dataclass(frozen=True)
class AnalysedStudy:
    analysis_id: int
    study_instance_uid: str
    series_instance_uid: str
    study_version: int
    sop_instance_uids: tuple[str, ...]
    image_paths: tuple[Path, ...]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def report_engine(sqlite_url: str) -> Iterator[Engine]:
    eng = make_engine(sqlite_url)
    yield eng
    eng.dispose()


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "export_backoff_seconds": 0.05,
        "export_backoff_max_seconds": 0.2,
        "export_max_attempts": 3,
        # one object per analysis unless a test names the outputs (the default adds `sc`)
        "report_outputs": "sr",
    }
    values.update(overrides)
    return load_settings(**values)


def add_analysis(
    engine: Engine,
    data_dir: Path,
    kind: PhantomKind = "covid19",
    n_slices: int = 12,
    size: int = 64,
    study_instance_uid: str | None = None,
    model_uid: str = MODEL_UID,
    model_name: str = "ctdx-resnet50",
    manifestations: bool = True,
) -> AnalysedStudy:
    """A phantom series in the spool plus the rows the listener and the worker would write.

    A second call with the same ``study_instance_uid`` opens the next study
    version with a new series (late instances), analysed as well.
    """
    study_uid = study_instance_uid or str(generate_uid())
    out_dir = data_dir / "spool" / study_uid / f"series-{generate_uid()}"
    phantom = write_phantom_series(
        out_dir, kind=kind, n_slices=n_slices, size=size, seed=3, study_instance_uid=study_uid
    )
    return record_analysis(
        engine,
        data_dir,
        list(phantom.paths),
        lesions=list(phantom_labels(kind, n_slices)),
        kind=kind,
        model_uid=model_uid,
        model_name=model_name,
        manifestations=manifestations,
    )


def record_analysis(
    engine: Engine,
    data_dir: Path,
    paths: list[Path],
    lesions: list[bool],
    kind: PhantomKind = "covid19",
    model_uid: str = MODEL_UID,
    model_name: str = "ctdx-resnet50",
    manifestations: bool = True,
    frame_numbers: list[int | None] | None = None,
) -> AnalysedStudy:
    """Listener and worker rows for one series in the spool (``paths`` in slice order).

    Apex and base slice are skipped (too little lung); lesion slices are
    called ``kind`` (COVID-19 with p growing along the series), the others
    normal. With ``frame_numbers`` the slices are frames: ``paths[i]`` is the
    multi-frame file holding slice ``i`` as frame ``frame_numbers[i]``.
    """
    frames = frame_numbers or [None] * len(paths)
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid = str(headers[0].StudyInstanceUID)
    series_uid = str(headers[0].SeriesInstanceUID)
    sop_uids = tuple(str(h.SOPInstanceUID) for h in headers)
    n_slices = len(paths)
    with session_scope(engine) as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            study = Study(study_instance_uid=study_uid, patient_id=str(headers[0].PatientID))
            s.add(study)
            s.flush()
        previous = s.scalars(select(StudyVersion).where(StudyVersion.study_id == study.id)).all()
        version = StudyVersion(
            study_id=study.id,
            version=len(previous) + 1,
            state=VersionState.ANALYSED,
            instance_count=len(set(sop_uids)),
        )
        series = Series(
            study_id=study.id, series_instance_uid=series_uid, modality="CT", series_number=2
        )
        s.add_all([version, series])
        s.flush()
        added: set[str] = set()
        for header, path in zip(headers, paths, strict=True):
            if str(header.SOPInstanceUID) in added:  # frames of one instance
                continue
            added.add(str(header.SOPInstanceUID))
            data = path.read_bytes()
            s.add(
                Instance(
                    series_id=series.id,
                    study_version_id=version.id,
                    sop_instance_uid=str(header.SOPInstanceUID),
                    sop_class_uid=str(header.SOPClassUID),
                    transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
                    path=str(path.relative_to(data_dir / "spool")),
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        skipped = {0, n_slices - 1}  # apex and base: too little lung
        calls: list[tuple[str, float] | None] = []
        for index in range(n_slices):
            if index in skipped:
                calls.append(None)
            elif lesions[index]:
                p_covid = min(0.70 + 0.02 * index, 0.99) if kind == "covid19" else 0.02
                calls.append((kind, p_covid))
            else:
                calls.append(("normal", 0.01))
        analysed = [c for c in calls if c is not None]
        fractions = {
            name: sum(c[0] == name for c in analysed) / len(analysed)
            for name in ("covid19", "other_pneumonia", "normal")
        }
        decision = "covid19" if fractions["covid19"] > 0.05 else kind
        finished = utcnow()
        analysis = Analysis(
            study_version_id=version.id,
            state=AnalysisState.ANALYSED,
            model_name=model_name,
            model_version="1.0.0",
            model_uid=model_uid,
            manifestation_model_uid="1.2.826.0.1.3680043.8.498.99.2" if manifestations else None,
            claimed_at=finished - timedelta(seconds=5),
            heartbeat_at=finished,
            finished_at=finished,
            series_instance_uid=series_uid,
            slices_total=n_slices,
            slices_analysed=len(analysed),
            slices_skipped=len(skipped),
            fraction_covid19=fractions["covid19"],
            fraction_other_pneumonia=fractions["other_pneumonia"],
            fraction_normal=fractions["normal"],
            decision=decision,
            threshold=0.05,
            device="cpu (2 threads), int8 x86 (agreement 0.998), channels-last, torch 2.14.1",
        )
        s.add(analysis)
        s.flush()
        for index, (sop, frame, call) in enumerate(zip(sop_uids, frames, calls, strict=True)):
            predicted = call[0] if call else None
            manifestation = (
                MANIFESTATIONS[index % 3] if manifestations and predicted == "covid19" else None
            )
            s.add(
                SliceResult(
                    analysis_id=analysis.id,
                    sop_instance_uid=sop,
                    frame_number=frame,
                    slice_index=index,
                    lung_fraction=0.0 if call is None else 0.2,
                    skipped=call is None,
                    p_covid19=call[1] if call else None,
                    p_other_pneumonia=(0.9 if predicted == "other_pneumonia" else 0.01)
                    if call
                    else None,
                    p_normal=(0.9 if predicted == "normal" else 0.05) if call else None,
                    predicted_class=predicted,
                    manifestation=manifestation,
                )
            )
        return AnalysedStudy(
            analysis_id=analysis.id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            study_version=version.version,
            sop_instance_uids=sop_uids,
            image_paths=tuple(paths),
        )


@pytest.fixture
def analysed(report_engine: Engine, data_dir: Path) -> AnalysedStudy:
    return add_analysis(report_engine, data_dir)


class StoreSCP:
    """dcmtk's ``storescp`` as the PACS: every received object becomes a file in ``directory``."""

    def __init__(self, directory: Path, port: int, ae_title: str = "PACS") -> None:
        self.directory = directory
        self.port = port
        self.ae_title = ae_title
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = require_tool("storescp")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [exe, "-aet", self.ae_title, "-od", str(self.directory), "-uf", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(self._listening, timeout=10, message="storescp listening")

    def _listening(self) -> bool:
        import socket

        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"storescp exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("*") if p.is_file())

    def sop_instance_uids(self) -> list[str]:
        return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files()]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[[], StoreSCP]]:
    """A factory: the test decides when the PACS comes up (``.start()``); stopped at teardown."""
    made: list[StoreSCP] = []
    port = free_port()

    def make() -> StoreSCP:
        scp = StoreSCP(tmp_path / f"pacs-{len(made)}", port)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()


def dsrdump(path: Path) -> str:
    exe = require_tool("dsrdump")
    # +U8: text in the object's Specific Character Set is converted, so that must work too
    done = subprocess.run(
        [exe, "-Ec", "+U8", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "E: " not in done.stderr, done.stderr
    return done.stdout


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines of dicom3tools' IOD validator."""
    exe = require_tool("dciodvfy")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None
