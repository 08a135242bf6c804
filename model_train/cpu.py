"""CPU threading for the demonstration model's training on small shared machines."""

from __future__ import annotations

import os


def passive_omp_threads() -> None:
    """Let torch's OpenMP threads sleep instead of spinning while they wait (this process and
    the processes it starts), unless the user chose otherwise; effective only before torch
    is imported.

    On a 2-core machine shared with other busy processes, spinning threads wait for each
    other: 12 training steps of the demonstration ResNet50 took 67.8 s wall (35.4 s CPU) with
    spinning and 11.1 s (8.4 s CPU) with sleeping threads, at a load average of 3.4.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
