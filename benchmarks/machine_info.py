"""What machine a benchmark ran on: shared by the benchmark scripts."""

from __future__ import annotations

import platform
from pathlib import Path

#: CPU flags that change which precision is fastest (int8 VNNI, native bf16, AMX).
_FEATURES = (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_tile", "AMX"))


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_features() -> str:
    """The instruction sets that matter for inference speed, e.g. ``AVX-512, VNNI``."""
    flags: set[str] = set()
    for line in _cpuinfo():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    found = [label for flag, label in _FEATURES if flag in flags]
    if found:
        return ", ".join(found)
    return "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else what ``platform`` knows) and its relevant ISA."""
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo()
                 if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{name} ({cpu_features()})"
