"""Progress lines: one per step, then a heartbeat at least every interval, for any output."""

from __future__ import annotations

import re

from ctdx.model_train.progress import ProgressLines
from tests.conftest import wait_for


def test_a_step_is_announced_and_a_silent_step_still_gets_lines() -> None:
    lines: list[str] = []
    with ProgressLines(lines.append, interval=0.05) as progress:
        progress.step("training the network, epoch 1/4", 176, "slices")
        assert re.fullmatch(r"\[ *\d+ s\] training the network, epoch 1/4: 0/176 slices",
                            lines[0]), lines
        progress.advance(16)
        # nothing else reports: the heartbeat thread writes where the job is
        wait_for(lambda: len(lines) >= 3, timeout=30, message="heartbeat lines")
    assert all(re.fullmatch(r"\[ *\d+ s\] training the network, epoch 1/4: (0|16)/176 slices",
                            line) for line in lines[1:]), lines
    assert lines[-1].endswith("16/176 slices")
    count = len(lines)
    progress.close()  # idempotent; no lines after the job
    assert len(lines) == count


def test_a_step_of_unknown_length_has_no_count() -> None:
    lines: list[str] = []
    with ProgressLines(lines.append, interval=60) as progress:
        progress.step("generating phantoms")
    assert len(lines) == 1 and lines[0].endswith("] generating phantoms")
