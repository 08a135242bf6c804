"""Training throughput (images/s) of ResNet18 and ResNet50: writes ``benchmarks/results/train.md``.

    .venv/bin/python benchmarks/bench_train.py                  # CPU here; GPU when present
    .venv/bin/python benchmarks/bench_train.py --device cuda --batch 256 --steps 30

It times :func:`ctdx.model_train.train.train_one_epoch`, the real loop: uint8 grey slices in
memory -> ``to_network_input`` -> ``train_augment`` (random crop + flip) -> forward,
cross-entropy, backward, Adam step; channels-last, bf16 autocast on CUDA, fp32 on the
CPU (the configuration ``paper.toml`` uses). Data are random images (the speed does
not depend on them). One warm-up epoch, then ``--repeat`` timed epochs of ``--steps``
batches; the best is reported, because the dev VM is shared with other work and the
fastest run is the least disturbed. The load average at the start is recorded.

The paper's grid (86,543 slices, 70% for training, 50 epochs, 20 recognition runs of
ResNet18/50 plus 10 manifestation runs on 27,680 slices) trains on about
``0.7 * 86,543 * 50 * 20 = 60.6 M`` recognition images (30.3 M per architecture); the
report estimates the hours at the measured ResNet18 and ResNet50 speeds.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import cpu_name  # noqa: E402  (benchmarks/ is on sys.path)

from ctdx.model_train.data import SliceSet  # noqa: E402
from ctdx.model_train.method.networks import Arch, build_resnet  # noqa: E402
from ctdx.model_train.method.preprocess import AugmentParams, PreprocessParams  # noqa: E402
from ctdx.model_train.train import epoch_generator, resolve_device, train_one_epoch  # noqa: E402

PAPER_RECOGNITION_IMAGES = 0.7 * 86_543 * 50
PAPER_MANIFESTATION_IMAGES = 0.7 * 27_680 * 50


def machine(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu_name()}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} " \
           f"threads)"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def throughput(arch: Arch, device: torch.device, batch: int, steps: int, size: int,
               repeat: int) -> float:
    torch.manual_seed(0)
    params = PreprocessParams(size=size)
    n = batch * steps
    data = SliceSet(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8).to(device),
                    torch.randint(0, 3, (n,)), ("x",) * n, ("x",) * n, ("x",) * n)
    model = build_resnet(arch, num_classes=3).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    warm = SliceSet(data.gray[:batch], data.labels[:batch], ("x",) * batch, ("x",) * batch,
                    ("x",) * batch)
    amp = device.type == "cuda"
    train_one_epoch(model, criterion, optimizer, warm, params, AugmentParams(), device, batch,
                    epoch_generator(0, 0), amp=amp, channels_last=True)
    best = 0.0
    for r in range(repeat):
        stats = train_one_epoch(model, criterion, optimizer, data, params, AugmentParams(),
                                device, batch, epoch_generator(0, r + 1), amp=amp,
                                channels_last=True)
        best = max(best, stats.images_per_second)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed batches per repeat")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.md")
    args = parser.parse_args()
    device = resolve_device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for arch in ("resnet18", "resnet50"):
        ips = throughput(arch, device, args.batch, args.steps, args.size, args.repeat)
        rows.append((arch, ips))
        print(f"{arch}: {ips:.1f} images/s", flush=True)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    lines = [
        "# Training throughput",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `benchmarks/bench_train.py "
        f"--device {args.device} --batch {args.batch} --steps {args.steps} "
        f"--repeat {args.repeat} --size {args.size}`.",
        "",
        f"Machine: {machine(device)}; device {device}, {precision}, channels-last; "
        f"1-minute load average at the start {load:.2f}.",
        "",
        "| network | input | batch | images/s (best of repeats) | hours for the paper's 10 "
        "recognition runs of this network (P- and UP-, 5 folds: 30.3 M images) |",
        "|---|---|---|---|---|",
    ]
    for arch, ips in rows:
        hours = PAPER_RECOGNITION_IMAGES * 10 / ips / 3600 if ips else float("nan")
        lines.append(f"| {arch} | {args.size}x{args.size} | {args.batch} | {ips:.1f} | "
                     f"{hours:.1f} |")
    total = sum(PAPER_RECOGNITION_IMAGES * 10 / ips for _, ips in rows if ips) + sum(
        PAPER_MANIFESTATION_IMAGES * 5 / ips for _, ips in rows if ips)
    lines += [
        "",
        f"Whole paper grid at these speeds (20 recognition + 10 manifestation runs, 50 epochs, "
        f"training only): about {total / 3600:.1f} hours.",
        "",
        "A shared 2-core VM is no place for the paper's grid: the numbers show the loop "
        "runs and what it costs here (other processes used the same cores, see the load "
        "average). The grid is meant for a GPU; GPU numbers are added when one is measured.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
