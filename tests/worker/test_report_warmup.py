"""The worker loads highdicom's tables of the standard with its models, not on the first report."""

from __future__ import annotations

import importlib
import subprocess
import sys

from ctdx.worker.report.warmup import STANDARD_TABLES, warm_up


def test_warm_up_loads_every_table_highdicom_caches() -> None:
    utils = importlib.import_module("highdicom._standard_utils")
    assert warm_up() == list(STANDARD_TABLES)  # this highdicom has them all: none skipped
    for name in STANDARD_TABLES:
        assert getattr(utils, name).cache_info().currsize == 1, name


def test_a_fresh_process_warmed_up_reads_no_table_when_it_builds_reports() -> None:
    """In a new process: after warm_up, loading the tables again is a cache hit only."""
    code = (
        "import highdicom._standard_utils as u\n"
        "from ctdx.worker.report.warmup import STANDARD_TABLES, warm_up\n"
        "assert all(getattr(u, n).cache_info().currsize == 0 for n in STANDARD_TABLES)\n"
        "warm_up()\n"
        "import ctdx.worker.report.publish\n"
        "for n in STANDARD_TABLES:\n"
        "    getattr(u, n)()\n"
        "    info = getattr(u, n).cache_info()\n"
        "    assert (info.misses, info.currsize) == (1, 1), (n, info)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
