"""Which int8 runtime serves on this CPU: measured on the host once, then remembered.

A checkpoint may carry two checked int8 models: PyTorch's ``x86`` weights and an
ONNX Runtime QDQ model (``ctdx.model_train.method.onnx_runtime``). Which is faster
depends on the CPU (VNNI or not, AVX-512 or AVX2 only), the thread count and the
library versions, not on ISA flags alone, so ``CTDX_PRECISION=auto`` times both on
a small batch at worker start and keeps the faster. The answer is cached in a JSON
file in the data directory, keyed by host and model, so later worker processes on
the same host start without the probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Int8Runtime = Literal["torch", "onnxruntime"]
INT8_RUNTIMES: tuple[Int8Runtime, ...] = ("torch", "onnxruntime")

#: Environment variables that change which CPU kernels run (part of the host key).
_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: Int8Runtime
    ms_per_slice: dict[str, float]  # as measured (possibly by an earlier process)
    cached: bool


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def host_key(threads: int | None = None) -> str:
    """What makes a measurement valid: host, CPU, threads, kernel limits, library versions."""
    versions: list[str] = [str(torch.__version__)]
    try:
        import onnxruntime

        versions.append(str(onnxruntime.__version__))
    except ImportError:
        versions.append("no onnxruntime")
    parts = [platform.node(), _cpu_model(), str(threads or torch.get_num_threads()),
             *(f"{v}={os.environ.get(v, '')}" for v in _ISA_VARIABLES), *versions]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _seconds_per_slice(model: nn.Module, probe: torch.Tensor, repeats: int = 2) -> float:
    with torch.inference_mode():
        model(probe)  # warm-up: first runs pack weights and allocate
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(probe)
            best = min(best, time.perf_counter() - start)
    return best / int(probe.shape[0])


def measure(models: Mapping[Int8Runtime, nn.Module], size: int, channels: int,
            batch_size: int = 8) -> dict[str, float]:
    """Milliseconds per slice of each model on the same random batch (channels-last)."""
    probe = torch.randn((batch_size, channels, size, size),
                        generator=torch.Generator().manual_seed(0))
    probe = probe.contiguous(memory_format=torch.channels_last)
    return {name: round(1e3 * _seconds_per_slice(m, probe), 3) for name, m in models.items()}


def _read(cache: Path) -> dict[str, dict[str, object]]:
    try:
        raw = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _write(cache: Path, entries: Mapping[str, object]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", dir=cache.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh, indent=1, sort_keys=True)
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only data directory costs a probe per process, no more
        logger.warning("cannot cache the CPU runtime choice in %s: %s", cache, exc)


def cached_choice(cache: Path | None, model_uid: str,
                  candidates: Iterable[Int8Runtime]) -> RuntimeChoice | None:
    """What an earlier measurement of this host and model chose, if it is still a candidate."""
    if cache is None:
        return None
    known = _read(cache).get(f"{host_key()}/{model_uid}")
    if not isinstance(known, dict):
        return None
    runtime = known.get("runtime")
    for candidate in candidates:
        if runtime == candidate:
            ms = known.get("ms_per_slice")
            return RuntimeChoice(candidate, dict(ms) if isinstance(ms, dict) else {}, cached=True)
    return None


def choose_int8_runtime(models: Mapping[Int8Runtime, nn.Module], model_uid: str, size: int,
                        channels: int, cache: Path | None) -> RuntimeChoice:
    """The faster of ``models`` on this host, from ``cache`` when this host and model were
    measured before, else measured now (and written to ``cache``)."""
    known = cached_choice(cache, model_uid, models)
    if known is not None:
        return known
    ms = measure(models, size, channels)
    runtime: Int8Runtime = min(models, key=lambda name: ms[name])
    if cache is not None:
        entries = _read(cache)  # another process may have written meanwhile
        entries[f"{host_key()}/{model_uid}"] = {
            "runtime": runtime, "ms_per_slice": ms,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write(cache, entries)
    return RuntimeChoice(runtime, ms, cached=False)
