"""Time the method's pieces on one study and write ``benchmarks/results/method.md``.

    .venv/bin/python benchmarks/bench_segmentation.py                 # 300-slice 512² phantom
    .venv/bin/python benchmarks/bench_segmentation.py --slices 60     # quicker

Rows: lung segmentation (scikit-image reference, one slice at a time, on
``--ref-slices`` slices, extrapolated; the batched torch version on the whole
study, in worker-sized batches and in one batch), preprocessing of the whole
study, and ResNet50 / ResNet18 in fp32 and bf16 autocast, both channels-last
(fp32 on ``--net-slices`` slices, bf16 on ``--bf16-slices``, extrapolated to the
study). Networks have random weights (fixed seed): timings do not depend on the
weights. Every row is the best of ``--repeat`` runs: the dev VM is shared, and
the minimum is the least disturbed measurement. Per-study numbers are for the
study size (``--slices``); rows measured on fewer slices say so.

On a machine shared with other busy processes, torch's intra-op threads wait for
each other: on our 2-core VM at load average 10, a radius-8 packed dilation took
150-180 ms with 2 threads and 6.4 ms with 1 (``--threads 1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import cpu_name  # noqa: E402  (benchmarks/ is on sys.path)

from ctdx.model_train.method.inference import cpu_has_native_bf16  # noqa: E402
from ctdx.model_train.method.networks import Arch, build_resnet  # noqa: E402
from ctdx.model_train.method.preprocess import PreprocessParams, preprocess_batch  # noqa: E402
from ctdx.model_train.method.segmentation import segment_lungs  # noqa: E402
from ctdx.model_train.method.segmentation_torch import segment_lungs_torch  # noqa: E402
from ctdx.model_train.phantom import PHANTOM_KINDS, phantom_volume  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "method.md"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices in the study")
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--ref-slices", type=int, default=30, help="slices for scikit-image")
    parser.add_argument("--net-slices", type=int, default=64, help="slices for fp32 networks")
    parser.add_argument("--bf16-slices", type=int, default=8, help="slices for bf16 networks")
    parser.add_argument("--batch-size", type=int, default=32, help="worker batch (CTDX_BATCH_SIZE)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the best is kept")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice, one per core)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    return parser


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16 (AVX2 at best)"
    return (
        f"{cpu}, {cores} cores, {bf16}; {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at start"
    )


def best_of(
    repeat: int, fn: Callable[[], Any], device: torch.device
) -> tuple[float, float, Any]:
    """Best wall time and best CPU time (this process, all threads) of ``repeat`` runs.

    On a shared machine the CPU time is the steadier number: with one thread it
    is close to the wall time the same work takes on an idle core.
    """
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best_wall, best_cpu, result


def run_net(model: torch.nn.Module, x: torch.Tensor, bf16: bool, batch: int) -> torch.Tensor:
    outs = []
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            outs.append(model(x[i : i + batch]).float())
    return torch.cat(outs)


def main(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    header = machine(device)
    spacing = 350.0 / args.size  # model_train.phantom's field of view
    per_kind = -(-args.slices // 3)
    volume = [
        s for k in PHANTOM_KINDS for s in phantom_volume(k, n_slices=per_kind, size=args.size)
    ]
    hu_np = np.stack([s.hu for s in volume[: args.slices]]).astype(np.float32)
    hu = torch.from_numpy(hu_np).to(device)
    n = len(hu_np)
    rows: list[tuple[str, float, float, int]] = []  # (stage, wall s, CPU s per study, slices)

    # --- segmentation
    pick = np.linspace(0, n - 1, min(args.ref_slices, n)).round().astype(int)
    t_ref, c_ref, ref = best_of(
        args.repeat, lambda: np.stack([segment_lungs(hu_np[i], spacing_mm=spacing) for i in pick]),
        device,
    )
    k = n / len(pick)
    rows.append(("segmentation, scikit-image reference (1 slice at a time)", t_ref * k, c_ref * k,
                 len(pick)))

    def torch_batches() -> torch.Tensor:
        parts = [segment_lungs_torch(hu[i : i + args.batch_size], spacing_mm=spacing)
                 for i in range(0, n, args.batch_size)]
        return torch.cat(parts)

    t_tb, c_tb, masks = best_of(args.repeat, torch_batches, device)
    rows.append((f"segmentation, torch, batches of {args.batch_size}", t_tb, c_tb, n))
    t_t1, c_t1, _ = best_of(
        args.repeat, lambda: segment_lungs_torch(hu, spacing_mm=spacing), device
    )
    rows.append((f"segmentation, torch, one batch of {n}", t_t1, c_t1, n))
    got = masks[torch.from_numpy(pick).to(device)].cpu().numpy()
    dice = 2 * (ref & got).sum() / max(ref.sum() + got.sum(), 1)

    # --- preprocessing
    params = PreprocessParams()
    t_pp, c_pp, x = best_of(
        args.repeat,
        lambda: torch.cat([preprocess_batch(hu[i : i + args.batch_size],
                                            masks[i : i + args.batch_size], params)
                           for i in range(0, n, args.batch_size)]),
        device,
    )
    rows.append(("preprocessing (normalise, 224², 3 channels)", t_pp, c_pp, n))

    # --- networks
    agreement: dict[str, float] = {}
    archs: tuple[Arch, ...] = ("resnet50", "resnet18")
    for arch in archs:
        torch.manual_seed(0)
        model = build_resnet(arch).eval().to(device).to(memory_format=torch.channels_last)
        for bf16, m in ((False, args.net_slices), (True, args.bf16_slices)):
            sample = x[torch.linspace(0, n - 1, min(m, n)).round().long().to(device)]
            sample = sample.contiguous(memory_format=torch.channels_last)
            run_net(model, sample[: min(4, len(sample))], bf16, args.batch_size)  # warm-up
            def forward(model: torch.nn.Module = model, sample: torch.Tensor = sample,
                        bf16: bool = bf16) -> torch.Tensor:
                return run_net(model, sample, bf16, args.batch_size)

            t_net, c_net, logits = best_of(args.repeat, forward, device)
            label = f"{arch} {'bf16 autocast' if bf16 else 'fp32'} + channels-last"
            k = n / len(sample)
            rows.append((label, t_net * k, c_net * k, len(sample)))
            if bf16:
                fp32 = run_net(model, sample, False, args.batch_size)
                agreement[arch] = float((fp32.argmax(1) == logits.argmax(1)).float().mean())

    # --- report
    lines = [
        "# Method benchmark: segmentation, preprocessing, networks",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_segmentation.py {' '.join(sys.argv[1:])}`"
        f", {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Machine: {header}. Shared with other jobs while it ran: best of {args.repeat} runs "
        "per row; with one thread, the CPU seconds are the closer estimate of an idle core.",
        "",
        f"Study: synthetic phantom, {n} slices of {args.size}² (covid19, other pneumonia and "
        f"normal thirds), pixel spacing {spacing:.3f} mm, device {device}.",
        "",
        "| stage | wall s per study | wall ms per slice | CPU s per study | measured on |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, seconds, cpu, measured in rows:
        note = f"{measured} slices" + (" (extrapolated)" if measured < n else "")
        lines.append(
            f"| {stage} | {seconds:.2f} | {1000 * seconds / n:.1f} | {cpu:.2f} | {note} |"
        )
    lines += [
        "",
        f"Dice torch vs scikit-image segmentation on the {len(pick)} reference slices: "
        f"{dice:.4f}. Argmax agreement bf16 vs fp32 (random weights, so a weak check): "
        + ", ".join(f"{a} {v:.3f}" for a, v in agreement.items()) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
