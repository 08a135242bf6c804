"""Real services for fault tests: a private Redis, `ctdx scp` and `ctdx status` as processes.

The private ``redis-server`` runs on a free port with its files in a temporary
folder and no persistence (as ``.ci/run`` starts Redis): tests may flush, kill
and restart it. The shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ctdx.db.settings import Settings
from tests.conftest import REPO_ROOT, free_port, stop_process, wait_for

CTDX = str(Path(sys.executable).with_name("ctdx"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment of a ctdx process running with ``settings`` (only what was set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        env[f"CTDX_{name.upper()}"] = text
    return env


class PrivateRedis:
    """``redis-server`` of this test alone: free port, temporary folder, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, timeout=20, interval=0.1, message="private redis-server up")
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)

    def ping(self) -> bool:
        try:
            client = self.client()
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False

    def flushall(self) -> None:
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved (there is no persistence anyway)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)


class ListenerProcess:
    """``ctdx scp`` in a process of its own session (its log is a file)."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        self.settings = settings
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [CTDX, "scp"], cwd=REPO_ROOT, env=settings_env(settings), stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for(self._ready, timeout=90, interval=0.2, message="ctdx scp listening")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"ctdx scp exited:\n{self.text()}")
        return "listening on" in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def ctdx_status(settings: Settings) -> tuple[int, dict[str, Any]]:
    """``ctdx status -f json`` as a process with ``settings``: exit code and the object."""
    result = subprocess.run(
        [CTDX, "status", "-f", "json"], cwd=REPO_ROOT, env=settings_env(settings),
        capture_output=True, text=True, timeout=120,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def problems_of(status: dict[str, Any]) -> dict[str, str]:
    return {p["check"]: p["severity"] for p in status["problems"]}


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as ``{'name{label="v",...}': value}`` (labels sorted as served)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
