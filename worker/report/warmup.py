"""What the first report of a worker process would otherwise pay: imports and the standard's tables.

highdicom reads its tables of the standard (SOP class to IOD, IOD to modules, module to
attributes: JSON files of several MB) on first use and keeps them for the process. Without
this, the first study a worker process analyses waits about a second longer for its
reports than every later one (measured in ``benchmarks/bench_worker.py``'s fresh process:
0.7 s of imports and 0.5 s of JSON on the 2-core dev VM). The worker loads its models at
process start (``worker_process_init``); it warms this up at the same time.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["STANDARD_TABLES", "warm_up"]

#: highdicom's cached loaders of its tables of the standard (private, so looked up by name:
#: a highdicom without one of them only makes the first report slower, never fails it)
STANDARD_TABLES = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")


def warm_up() -> list[str]:
    """Import the report builders and load highdicom's tables; the tables loaded."""
    importlib.import_module("ctdx.worker.report.publish")
    try:
        utils = importlib.import_module("highdicom._standard_utils")
    except ImportError:
        return []
    loaded = []
    for name in STANDARD_TABLES:
        loader: Callable[[], object] | None = getattr(utils, name, None)
        if loader is not None:
            loader()
            loaded.append(name)
    logger.debug("report tables loaded: %s", ", ".join(loaded) or "none")
    return loaded
