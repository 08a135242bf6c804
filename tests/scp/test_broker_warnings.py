"""Say it once, loudly: a broker that does not answer is a warning at start, and studies
waiting in the outbox longer than CTDX_OUTBOX_ALERT_SECONDS are a warning once, not at
every retry; `ctdx results stats` shows them waiting.

The broker is a real Redis URL on a port nobody listens on (a wrong CTDX_BROKER_URL).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ctdx.scp.outbox import CelerySender
from tests.cli.conftest import ctdx
from tests.conftest import free_port
from tests.scp.conftest import Running, phantom, send_files, wait_for


def _count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_wrong_broker_url_is_said_once_at_start_and_the_backlog_once(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path, sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    broker = f"redis://127.0.0.1:{free_port()}/0"
    overrides = dict(broker_url=broker, outbox_alert_seconds=1.0, claim_timeout=5,
                     queued_timeout=5, database_url=sqlite_url)
    from tests.scp.conftest import make_settings

    sender = CelerySender(make_settings(tmp_path, sqlite_url, **overrides))
    try:
        scp = start_scp_sqlite(sender=sender, **overrides)
        wait_for(lambda: _count(caplog, "broker unreachable at start") == 1, timeout=60,
                 message="the start-up warning")
        study = phantom(tmp_path, n_slices=2)
        assert send_files(scp.port, study.paths) == [0x0000] * 2  # the listener still receives
        wait_for(lambda: _count(caplog, "wait in the outbox, the oldest") == 1, timeout=60,
                 message="the backlog warning")
        # more rounds go by (one per second here): no second warning of either kind
        deadline = time.monotonic() + 4
        wait_for(lambda: time.monotonic() > deadline, timeout=10, message="a few rounds")
        assert _count(caplog, "wait in the outbox, the oldest") == 1
        assert _count(caplog, "broker unreachable at start") == 1
        assert _count(caplog, "stays in the outbox") == 0  # said at start; retries are debug
        assert "CTDX_BROKER_URL" in caplog.text

        stats = ctdx("results", "stats", "-f", "json", "--database-url", sqlite_url)
        assert stats.exit_code == 0, stats.output
        waiting = json.loads(stats.stdout)["waiting"]
        assert (waiting["outbox"], waiting["queued"], waiting["processing"]) == (1, 0, 0)
        assert waiting["oldest_outbox_seconds"] >= 1.0
        table = ctdx("results", "stats", "--database-url", sqlite_url, columns=200)
        assert "Waiting now: 1 in the outbox (not yet handed to the broker)" in table.stdout
    finally:
        sender.close()


def test_a_broker_that_comes_up_later_is_noticed_without_any_study(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path, sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reconciliation needs the broker: the listener looks again, not only when it sends."""
    from tests.scp.conftest import make_settings
    from tests.worker.services import PrivateRedis

    caplog.set_level(logging.INFO)
    redis = PrivateRedis(tmp_path / "redis")  # its port is chosen; the server starts later
    overrides = dict(broker_url=redis.url, claim_timeout=5, queued_timeout=5)
    sender = CelerySender(make_settings(tmp_path, sqlite_url, **overrides))
    try:
        start_scp_sqlite(sender=sender, **overrides)
        wait_for(lambda: _count(caplog, "broker unreachable at start") == 1, timeout=60,
                 message="the start-up warning")
        redis.start()
        wait_for(lambda: "broker reachable again" in caplog.text, timeout=60,
                 message="the listener to notice the broker")
        assert _count(caplog, "broker unreachable at start") == 1
    finally:
        sender.close()
        redis.stop()
