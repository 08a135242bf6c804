"""The outbox: completed versions reach the broker once it is there, with the stable task id."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ctdx.db.broker import TASK_PROCESS_STUDY, task_id_for
from ctdx.db.models import VersionState
from ctdx.scp.outbox import CelerySender
from tests.conftest import free_port, require_tool
from tests.scp.conftest import (
    RecordingSender,
    Running,
    make_settings,
    phantom,
    send_files,
    wait_for,
)


def _messages(url: str, queue: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def _task(message: dict[str, Any]) -> tuple[str, str, list[Any]]:
    body = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["task"], message["headers"]["id"], body[0]


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    name = f"ctdx-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()


def test_broker_down_keeps_the_study_in_the_outbox_until_it_is_back(
    start_scp: Callable[..., Running], tmp_path: Path
) -> None:
    sender = RecordingSender()
    sender.down = True
    scp = start_scp(sender=sender)
    study = phantom(tmp_path, n_slices=2)
    assert send_files(scp.port, study.paths) == [0x0000] * 2
    wait_for(lambda: any(e.attempts >= 2 for e in scp.outbox()), timeout=20,
             message="dispatch retried while the broker is down")
    (entry,) = scp.outbox()
    assert entry.dispatched_at is None and "broker down" in (entry.last_error or "")
    assert scp.versions()[0].state == VersionState.COMPLETE
    assert sender.sent == []

    sender.down = False
    wait_for(lambda: scp.versions()[0].state == VersionState.QUEUED, timeout=20,
             message="dispatched once the broker is back")
    assert sender.sent == [entry.study_version_id]  # once
    (entry,) = scp.outbox()
    assert entry.dispatched_at is not None and entry.last_error is None


def test_completed_study_reaches_redis_as_a_celery_task(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path, redis_url: str, queue: str
) -> None:
    settings = make_settings(tmp_path, "sqlite://", broker_url=f"{redis_url}/0")
    scp = start_scp_sqlite(sender=CelerySender(settings, queue=queue))
    study = phantom(tmp_path, n_slices=2)
    assert send_files(scp.port, study.paths) == [0x0000] * 2
    wait_for(lambda: _messages(redis_url, queue), timeout=20, message="task in Redis")
    (message,) = _messages(redis_url, queue)
    (version,) = scp.versions()
    assert _task(message) == (TASK_PROCESS_STUDY, task_id_for(version.id), [version.id])
    assert message["content-type"] == "application/json"
    wait_for(lambda: scp.versions()[0].state == VersionState.QUEUED, timeout=10,
             message="version marked queued")


@pytest.mark.slow
def test_unreachable_redis_then_reachable(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path, queue: str
) -> None:
    require_tool("redis-server")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = make_settings(tmp_path, "sqlite://", broker_url=url)
    scp = start_scp_sqlite(sender=CelerySender(settings, queue=queue))
    study = phantom(tmp_path, n_slices=2)
    assert send_files(scp.port, study.paths) == [0x0000] * 2
    wait_for(lambda: any(e.attempts >= 1 for e in scp.outbox()), timeout=20,
             message="a failed attempt while Redis is not there")
    assert scp.outbox()[0].dispatched_at is None
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _messages(url, queue) if _ping(url) else None, timeout=30,
                 message="task delivered after Redis came up")
        (message,) = _messages(url, queue)
        (version,) = scp.versions()
        assert _task(message)[1:] == (task_id_for(version.id), [version.id])
        wait_for(lambda: scp.outbox()[0].dispatched_at is not None, timeout=10,
                 message="outbox row marked dispatched")
    finally:
        server.terminate()
        server.wait(timeout=10)


def _ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.exceptions.ConnectionError:
        return False
