"""`ctdx worker`: refuses to start with one clear line when it could not analyse anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from ctdx.cli import app
from tests.worker.conftest import Checkpoints


def _ctdx(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", **env})


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in list(__import__("os").environ):
        if key.startswith("CTDX_"):
            monkeypatch.delenv(key)
    return {"CTDX_DATA_DIR": str(tmp_path / "data"), "CTDX_DATABASE_URL": sqlite_url,
            "CTDX_BROKER_URL": "memory://"}


def test_help_lists_the_worker_options(env: dict[str, str]) -> None:
    result = _ctdx("worker", "--help", env=env)
    assert result.exit_code == 0
    for option in ("--concurrency", "--pool", "--loglevel", "--hostname", "--queues",
                   "--export-delivery"):
        assert option in result.output


def test_refuses_a_database_that_is_not_at_head(env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    result = _ctdx("worker", env={**env, "CTDX_DATABASE_URL": f"sqlite:///{empty}"})
    assert result.exit_code == 3
    assert "ctdx db upgrade" in result.output and "Traceback" not in result.output


def test_refuses_to_start_without_a_usable_model(
    env: dict[str, str], tmp_path: Path, checkpoints: Checkpoints
) -> None:
    result = _ctdx("worker", env=env)
    assert result.exit_code == 2 and "CTDX_MODEL" in result.output

    junk = tmp_path / "model.pt"
    junk.write_text("not a checkpoint")
    result = _ctdx("worker", env={**env, "CTDX_MODEL": str(junk)})
    assert result.exit_code == 2 and "not a ctdx checkpoint" in result.output

    # a manifestation checkpoint given as the recognition model
    swapped = {**env, "CTDX_MODEL": str(checkpoints.manifestation)}
    result = _ctdx("worker", env=swapped)
    assert result.exit_code == 2 and "'manifestation' model" in result.output

    result = _ctdx("worker", "--pool", "gevent", env=env)
    assert result.exit_code == 2 and "--pool must be one of" in result.output


def test_plain_celery_worker_refuses_a_database_that_is_not_at_head(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """`celery -A worker.celery_app worker` gets the same check (worker_init), and exits."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}, **env,
                   "CTDX_DATABASE_URL": f"sqlite:///{empty}"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ctdx.worker.celery_app", "worker", "--pool", "solo",
         "-Q", "ctdx-never-used"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "worker cannot start: database is at revision none (empty)" in proc.stderr
