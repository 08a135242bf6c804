"""Slice classification with a loaded checkpoint: the object a worker process keeps.

Build one :class:`SliceClassifier` per process (Celery's ``worker_process_init``),
not per study: loading and the precision probe cost seconds.

Device and precision:

- ``device="auto"``: the first CUDA GPU when present, else the CPU.
- On CUDA, ``precision="auto"`` is bf16 autocast with channels-last tensors
  (tensor cores; the argmax matches fp32 on our checks).
- On the CPU, bf16 only pays off with native bf16 instructions (AVX512-BF16 or
  AMX). On a 2-core AVX2 VM without them, ResNet50 fp32 + channels-last took ~90
  ms/slice and bf16 autocast 550-750 ms/slice (emulated, ~7x *slower*); on a
  2-core AMD EPYC with AVX512-BF16, 66 ms in fp32 and 30 ms in bf16. So
  ``precision="auto"`` on the CPU never uses bf16 without native support, and
  otherwise times both on a small probe batch and keeps the faster. ``"fp32"`` /
  ``"bf16"`` force a choice.
- On the CPU, a checkpoint exported with int8 weights (``ctdx train export --int8``,
  calibrated and checked against fp32: ``ctdx.model_train.method.quantize``) is served
  in int8 by ``precision="auto"`` before any bf16 probe: ResNet50 12.3 ms/slice
  against 66 ms in fp32 on the AVX-512 VNNI VM. ``"int8"`` insists on it (and
  fails on a GPU or without int8 weights).
- Channels-last is used on every device (fp32 on the AVX2 CPU: 121 -> 92 ms/slice).
- A checkpoint may also carry an ONNX Runtime int8 model, calibrated and checked
  the same way (``ctdx.model_train.method.onnx_runtime``). With both, ``"auto"``
  on the CPU times the two int8 runtimes on this host and serves the faster
  (``ctdx.model_train.method.cpu_runtime``; cached per host and model in
  ``choice_cache``); ``"ort-int8"`` insists on ONNX Runtime. PyTorch's int8 gains
  little without VNNI (issue 19: 51.6 ms/slice on an AVX2-only EPYC), which is why
  the choice is measured rather than assumed.

Probabilities are always computed in float32 from the logits (softmax of bf16
logits would quantise them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from ctdx.model_train.method.checkpoint import CheckpointMeta, LoadedModel, load_checkpoint
from ctdx.model_train.method.classes import Task
from ctdx.model_train.method.cpu_runtime import (
    Int8Runtime,
    cached_choice,
    choose_int8_runtime,
)
from ctdx.model_train.method.onnx_runtime import OrtModule, onnxruntime_available
from ctdx.model_train.method.quantize import Int8Report, QuantizationError, load_int8

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8", "ort-int8", "auto"]
ResolvedPrecision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "int8", "ort-int8")

#: bf16 is kept on the CPU only if the probe shows it at least this much faster.
_BF16_MIN_SPEEDUP = 1.15


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN uses."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _run(model: nn.Module, batch: Tensor, precision: ResolvedPrecision) -> Tensor:
    device_type = batch.device.type
    with torch.inference_mode(), torch.autocast(
        device_type, dtype=torch.bfloat16, enabled=precision == "bf16"
    ):
        logits: Tensor = model(batch)
    return logits.float()


def time_precisions(
    model: nn.Module, device: torch.device, size: int, channels: int = 3, batch_size: int = 4,
    precisions: tuple[ResolvedPrecision, ...] = ("fp32", "bf16"),
) -> dict[ResolvedPrecision, float]:
    """Seconds per slice of ``model`` (channels-last) in each precision, after one warm-up."""
    probe = torch.randn(
        (batch_size, channels, size, size), generator=torch.Generator().manual_seed(0)
    ).to(device).contiguous(memory_format=torch.channels_last)
    result: dict[ResolvedPrecision, float] = {}
    for precision in precisions:
        _run(model, probe, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _run(model, probe, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result[precision] = (time.perf_counter() - start) / batch_size
    return result


class SliceClassifier:
    """A network from a checkpoint, on its device and precision, giving probabilities."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        precision: Precision = "auto",
        choice_cache: Path | None = None,
    ) -> None:
        self.meta: CheckpointMeta = loaded.meta
        self.device = resolve_device(device)
        self.model: nn.Module = loaded.model.to(self.device).eval().to(
            memory_format=torch.channels_last
        )
        self.int8_report: Int8Report | None = None
        self.runtime: Int8Runtime | None = None  # which int8 runtime serves, if int8
        self.precision: ResolvedPrecision = self._choose_precision(precision, loaded)
        if self.precision == "int8":
            self._load_int8(precision, loaded, choice_cache)
        logger.info(
            "slice classifier %s %s ready: %s",
            self.meta.model_name, self.meta.model_version, self.device_description,
        )

    @classmethod
    def from_checkpoint(
        cls, path: Path, task: Task, device: str | torch.device = "auto",
        precision: Precision = "auto", choice_cache: Path | None = None,
    ) -> SliceClassifier:
        """Load ``path`` (refusing a mismatching checkpoint) and wrap it."""
        resolved = resolve_device(device)
        return cls(load_checkpoint(path, task=task, device=resolved), resolved, precision,
                   choice_cache)

    def _int8_runtimes(self, loaded: LoadedModel) -> list[Int8Runtime]:
        runtimes: list[Int8Runtime] = []
        if loaded.int8 is not None:
            runtimes.append("torch")
        if loaded.onnx_int8 is not None and onnxruntime_available():
            runtimes.append("onnxruntime")
        return runtimes

    def _load_int8(self, precision: Precision, loaded: LoadedModel,
                   choice_cache: Path | None) -> None:
        """Serve int8: the runtime asked for, the only one there is, or the faster here."""
        p = self.meta.preprocess
        forced: dict[str, list[Int8Runtime]] = {"int8": ["torch"], "ort-int8": ["onnxruntime"]}
        runtimes = forced.get(precision) or self._int8_runtimes(loaded)
        known = cached_choice(choice_cache, self.meta.model_uid, runtimes) \
            if len(runtimes) > 1 else None
        if known is not None:  # measured on this host before: load only the faster
            runtimes = [known.runtime]
            logger.info("int8 runtime of %s on this host (cached): %s", self.meta.model_name,
                        known.runtime)
        models: dict[Int8Runtime, nn.Module] = {}
        if "torch" in runtimes:
            assert loaded.int8 is not None
            try:
                models["torch"] = load_int8(self.meta.arch, len(self.meta.class_names), p.size,
                                            p.channels, loaded.int8.state_dict)
            except QuantizationError as exc:
                if "onnxruntime" not in runtimes:
                    raise
                # another torch's int8 graph: the checked ONNX model still serves
                logger.warning("%s: PyTorch int8 not served (%s); ONNX Runtime int8 instead",
                               self.meta.model_name, exc)
        if "onnxruntime" in runtimes:
            assert loaded.onnx_int8 is not None
            models["onnxruntime"] = OrtModule(loaded.onnx_int8.model)
        if len(models) == 1:
            (self.runtime,) = models
        else:
            choice = choose_int8_runtime(models, self.meta.model_uid, p.size, p.channels,
                                         choice_cache)
            self.runtime = choice.runtime
            logger.info(
                "int8 runtime probe%s for %s: %s -> %s", " (cached)" if choice.cached else "",
                self.meta.model_name,
                ", ".join(f"{k} {v:.1f} ms/slice" for k, v in choice.ms_per_slice.items()),
                choice.runtime,
            )
        self.model = models[self.runtime]
        weights = loaded.onnx_int8 if self.runtime == "onnxruntime" else loaded.int8
        assert weights is not None
        self.int8_report = weights.report

    def _choose_precision(self, precision: Precision, loaded: LoadedModel) -> ResolvedPrecision:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "ort-int8":
            if self.device.type != "cpu":
                raise ValueError(f"precision ort-int8 runs on the CPU only, not on {self.device}")
            if loaded.onnx_int8 is None:
                raise ValueError(
                    f"precision ort-int8 asked, but the {self.meta.task} checkpoint has no ONNX "
                    "Runtime int8 model: export it with `ctdx train export --int8` where "
                    "onnxruntime is installed (pip install 'ctdx[onnx]')"
                )
            if not onnxruntime_available():
                raise ValueError("precision ort-int8 asked, but onnxruntime is not installed "
                                 "(pip install 'ctdx[onnx]')")
            return "int8"
        if precision == "int8":
            if self.device.type != "cpu":
                raise ValueError(f"precision int8 runs on the CPU only, not on {self.device}")
            if loaded.int8 is None:
                raise ValueError(
                    f"precision int8 asked, but the {self.meta.task} checkpoint has no int8 "
                    "weights: export it with `ctdx train export --int8`"
                )
            return "int8"
        if precision in ("fp32", "bf16"):
            if precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
                logger.warning("bf16 requested on a CPU without native bf16: expect it to be slow")
            return precision
        if self.device.type == "cuda":
            return "bf16"
        if self.device.type == "cpu" and self._int8_runtimes(loaded):
            return "int8"
        if self.device.type != "cpu" or not cpu_has_native_bf16():
            return "fp32"
        timings = time_precisions(
            self.model, self.device, self.meta.preprocess.size, self.meta.preprocess.channels
        )
        chosen: ResolvedPrecision = (
            "bf16" if timings["fp32"] >= _BF16_MIN_SPEEDUP * timings["bf16"] else "fp32"
        )
        logger.info(
            "CPU precision probe: fp32 %.1f ms/slice, bf16 %.1f ms/slice -> %s",
            1e3 * timings["fp32"], 1e3 * timings["bf16"], chosen,
        )
        return chosen

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names

    @property
    def device_description(self) -> str:
        """What ran the network, for the results table, e.g. ``cpu (2 threads), fp32, ...``."""
        if self.device.type == "cuda":
            index = self.device.index
            if index is None:
                index = torch.cuda.current_device()
            where = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        else:
            where = f"{self.device.type} ({torch.get_num_threads()} threads)"
        mode = {"bf16": "bf16 autocast", "fp32": "fp32"}.get(self.precision, "")
        if self.int8_report is not None:
            r = self.int8_report
            mode = f"int8 {r.backend} (agreement {r.argmax_agreement:.3f})"
        if self.runtime == "onnxruntime":  # the backend names the runtime and its version
            return f"{where}, {mode}"
        return f"{where}, {mode}, channels-last, torch {torch.__version__}"

    def predict(self, batch: Tensor) -> NDArray[np.float32]:
        """Softmax probabilities ``(N, num_classes)`` for a preprocessed ``(N, C, S, S)`` batch."""
        p = self.meta.preprocess
        expected = (p.channels, p.size, p.size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"batch must be (N, {p.channels}, {p.size}, {p.size}) as preprocessed for this "
                f"model, got {tuple(batch.shape)}"
            )
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        x = batch.to(self.device, dtype=torch.float32, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        probs = torch.softmax(_run(self.model, x, self.precision), dim=1)
        return np.ascontiguousarray(probs.cpu().numpy(), dtype=np.float32)
