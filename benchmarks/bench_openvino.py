"""The int8 CPU runtimes side by side on one host: OpenVINO (NNCF) and ONNX Runtime (issue 19).

Issue 19 asks to measure OpenVINO beside ONNX Runtime and PyTorch before choosing what a
CPU worker serves. OpenVINO is not a dependency of ctdx; this script runs in a separate
environment that has it, so the project's own stays as CI installs it:

    python3 -m venv /tmp/ov && /tmp/ov/bin/pip install openvino nncf onnx onnxruntime sympy
    .venv/bin/python benchmarks/bench_openvino.py --export /tmp/ctdx-ov   # ctdx's networks
    /tmp/ov/bin/python benchmarks/bench_openvino.py --models /tmp/ctdx-ov \\
        --out benchmarks/results/openvino.md

``--export`` writes ctdx's ResNet50 and ResNet18 (random initialisation: the time does not
depend on the weights) as fp32 ONNX, exactly as ``ctdx.model_train.method.onnx_runtime``
exports them. The measurement quantises each the way its runtime recommends from the same
32 calibration inputs (OpenVINO: ``nncf.quantize``; ONNX Runtime: static QDQ u8s8,
per-channel, MinMax, as ctdx's ``quantize_onnx``), then times batches of 32 at 224 px on
``--threads`` threads, one runtime after another, in the same process. Reports ms per slice
(median of ``--rounds`` rounds) and argmax agreement with the same runtime's fp32 (random
weights: a sanity check only; the agreement that matters is the exported models' own gate).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARCHES = ("resnet50", "resnet18")
BATCH = 32
SIZE = 224
INPUT = "x"  # ctdx.model_train.method.onnx_runtime.INPUT_NAME


def export(out: Path) -> None:
    """ctdx's networks as fp32 ONNX (run with the project's environment)."""
    sys.path.insert(0, str(REPO))
    import torch

    from ctdx.model_train.method.networks import build_resnet
    from ctdx.model_train.method.onnx_runtime import INPUT_NAME, export_onnx

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for arch in ARCHES:
        export_onnx(build_resnet(arch).eval(), out / f"{arch}.onnx", SIZE)
        print(f"wrote {out / arch}.onnx (input {INPUT_NAME!r})")


def _cpu() -> str:
    flags = set()
    model = platform.processor() or "CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "CPU":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        isa += ", VNNI"
    return f"{model} ({isa}), {os.cpu_count()} CPUs"


def timed(infer: Callable[[Any], Any], batch: Any, slices: int, rounds: int) -> float:
    """Median ms per slice over ``rounds`` rounds of ``slices`` slices (after one warm-up)."""
    infer(batch)
    per_round = []
    for _ in range(rounds):
        start, done = time.perf_counter(), 0
        while done < slices:
            infer(batch)
            done += batch.shape[0]
        per_round.append((time.perf_counter() - start) / done * 1000)
    return statistics.median(per_round)


def measure(models: Path, threads: int, slices: int, rounds: int) -> list[tuple[str, str, float,
                                                                              float]]:
    import nncf
    import numpy as np
    import onnxruntime as ort
    import openvino as ov
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32) for _ in range(32)]
    batch = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}

    def ort_session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            x = next(self._it, None)
            return None if x is None else {INPUT: x}

    rows = []
    for arch in ARCHES:
        fp32_path = models / f"{arch}.onnx"
        fp32 = ov.convert_model(str(fp32_path))
        ov_fp32 = core.compile_model(fp32, "CPU", config)
        ov_int8 = core.compile_model(nncf.quantize(fp32, nncf.Dataset(calibration),
                                                   subset_size=len(calibration)), "CPU", config)
        prepared, int8_path = models / f"{arch}.pre.onnx", models / f"{arch}.int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        ort_fp32, ort_int8 = ort_session(fp32_path), ort_session(int8_path)
        runs: dict[str, Callable[[Any], Any]] = {
            "OpenVINO fp32": lambda x, m=ov_fp32: m(x)[0],
            "OpenVINO int8 (NNCF)": lambda x, m=ov_int8: m(x)[0],
            "ONNX Runtime fp32": lambda x, s=ort_fp32: s.run(None, {INPUT: x})[0],
            "ONNX Runtime int8 (QDQ u8s8)": lambda x, s=ort_int8: s.run(None, {INPUT: x})[0],
        }
        reference = {"OpenVINO": runs["OpenVINO fp32"](batch).argmax(1),
                     "ONNX Runtime": runs["ONNX Runtime fp32"](batch).argmax(1)}
        for name, infer in runs.items():
            ms = timed(infer, batch, slices, rounds)
            runtime = "OpenVINO" if name.startswith("OpenVINO") else "ONNX Runtime"
            agree = float((infer(batch).argmax(1) == reference[runtime]).mean())
            rows.append((arch, name, ms, agree))
            print(f"{arch:9} {name:30} {ms:6.1f} ms/slice  agreement {agree:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="write the fp32 ONNX models here and stop")
    parser.add_argument("--models", type=Path, help="folder of resnet50.onnx and resnet18.onnx")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--slices", type=int, default=192, help="slices per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append a Markdown table here")
    args = parser.parse_args()
    if args.export:
        export(args.export)
        return
    if args.models is None:
        parser.error("--models (or --export) is required")
    try:
        rows = measure(args.models, args.threads, args.slices, args.rounds)
    except ImportError as exc:
        sys.exit(f"{exc.name} is missing: run this with a Python that has openvino, nncf, onnx "
                 "onnxruntime and sympy (see this script's docstring)")
    versions = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                              capture_output=True, text=True).stdout.split()
    wanted = [v for v in versions if v.split("==")[0].lower() in
              ("openvino", "nncf", "onnxruntime")]
    lines = [f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {_cpu()}\n",
             f"{args.threads} threads, batches of {BATCH} at {SIZE} px, median of {args.rounds} "
             f"rounds of {args.slices} slices; load average at the end "
             f"{os.getloadavg()[0]:.1f}; {', '.join(wanted)}.\n",
             "| network | runtime | ms per slice | argmax agreement with its fp32 |",
             "|---|---|---:|---:|"]
    lines += [f"| {a} | {n} | {ms:.1f} | {agree:.3f} |" for a, n, ms, agree in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        if not args.out.exists():
            args.out.write_text("# int8 CPU runtimes side by side (`benchmarks/bench_openvino.py`)"
                                "\n")
        with args.out.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
