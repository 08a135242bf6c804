"""Per-process state: torch threads and the models loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctdx.db.settings import load_settings
from ctdx.worker import runtime
from ctdx.worker.errors import WorkerNotReady
from tests.worker.conftest import Checkpoints, analysis_settings


def test_torch_threads_share_the_cores_unless_set() -> None:
    cores = len(os.sched_getaffinity(0))
    auto = load_settings(torch_threads=0)
    assert runtime.torch_threads(auto, concurrency=1) == cores
    assert runtime.torch_threads(auto, concurrency=cores * 2) == 1
    assert runtime.torch_threads(load_settings(torch_threads=1), concurrency=1) == 1


def test_models_load_once_per_process(tmp_path: Path, sqlite_url: str,
                                      checkpoints: Checkpoints) -> None:
    settings = analysis_settings(tmp_path / "data", sqlite_url, checkpoints, None)
    first = runtime.get_models(settings)
    again = runtime.get_models(settings.model_copy(update={"batch_size": 4}))
    assert again is first  # another task, same models: not reloaded
    assert first.identity.model_name == "test-recognition"
    assert first.manifestation is not None and first.device.startswith("cpu")


def test_a_precision_the_checkpoint_cannot_serve_stops_the_worker_with_the_fix(
        tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints) -> None:
    settings = analysis_settings(tmp_path / "data", sqlite_url, checkpoints, None)
    with pytest.raises(WorkerNotReady, match=r"no int8 weights: export it with .*--int8"):
        runtime.get_models(settings.model_copy(update={"precision": "int8"}))
