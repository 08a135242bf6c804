"""Time the worker on one study, stage by stage, and write ``benchmarks/results/worker.md``.

    .venv/bin/python benchmarks/bench_worker.py                  # 300-slice 512² phantom (+ real)
    .venv/bin/python benchmarks/bench_worker.py --slices 60      # smaller, quicker
    .venv/bin/python benchmarks/bench_worker.py --memory-slices 1000   # also: peak RSS, 1000 slices
    .venv/bin/python benchmarks/bench_worker.py --isa all --json worker.json   # every ISA level

Stages (each on the whole study unless marked): decode (headers, order, pixels
to HU), segmentation (scikit-image reference slice by slice vs the batched
torch version), preprocessing, classification (ResNet50 fp32 vs bf16 autocast,
both channels-last; bf16 is timed on a sample when it is slow), manifestation
(ResNet18 on every analysed slice: an upper bound, random weights call an
arbitrary share COVID-19), database write (the slice rows into SQLite). Then
the whole worker path (``ctdx.worker.service.process_study_version``, the code a
Celery task runs) in a fresh process, with its peak RSS. Models have random
weights (fixed seed): timings do not depend on the weights.

``--isa`` runs the network stages and the worker path in child processes whose
CPU libraries are held to an instruction-set level (``ISA_ENV``): ``avx2`` is what
an AVX2-only server (AMD EPYC before Zen 4, older Xeons) runs, ``avx512_core`` is
AVX-512 without VNNI or bf16, ``native`` is whatever this CPU has. The limits bind
oneDNN (``ONEDNN_MAX_CPU_ISA``), FBGEMM (``FBGEMM_ENABLE_INSTRUCTIONS``) and ATen's
own kernels (``ATEN_CPU_CAPABILITY``); ONNX Runtime's MLAS kernels have no such
switch and run natively whatever the level (the results say so). ``--json`` writes
one record per study and level: ``worker_path_s``, ``naive_pipeline_s`` (decode +
scikit-image segmentation slice by slice + preprocessing + fp32 eager ResNet50 and
ResNet18 on every slice, timed in the same child), ``isa``, ``runtime``, ``slices``.

The machine is named in the output; on a shared machine numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine_info import cpu_name  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "worker.md"
REAL_SERIES = REPO.parent / "shared" / "data" / "covid-ct-md" / "COVID-19" / "P001"

#: Environment of the child processes per instruction-set level; ``native`` unsets them all.
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512_core": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
                    "ATEN_CPU_CAPABILITY": "avx512"},
}
ISA_LEVELS = ("native", "avx2", "avx512_core")
#: The naive pipeline: the stages a straightforward implementation runs, summed.
NAIVE_STAGES = ("decode", "segmentation (scikit-image)", "preprocessing",
                "classification ResNet50 fp32", "manifestation ResNet18 fp32 (all slices)")


def machine() -> str:
    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return (f"{cpu}, {cores} cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {load:.1f} at start")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _phantom_slices(seed: int, n: int) -> Any:
    """Preprocessed slices of a phantom chest (other seed than the timed study)."""
    from ctdx.model_train.cache import prepare_slices
    from ctdx.model_train.data import SliceSet
    from ctdx.model_train.method.hu import MIN_HU
    from ctdx.model_train.method.preprocess import PreprocessParams
    from ctdx.model_train.phantom import phantom_volume
    from ctdx.model_train.sources import LoadedSlice

    volume = phantom_volume("covid19", n_slices=n, size=512, seed=seed)
    prepared = prepare_slices(
        [LoadedSlice(np.maximum(s.hu.astype(np.float32), MIN_HU), 350.0 / 512) for s in volume],
        PreprocessParams())
    gray = torch.from_numpy(np.stack([g for g, f in prepared if f > 0.05])).unsqueeze(1)
    names = tuple(str(i) for i in range(gray.shape[0]))
    return SliceSet(gray, torch.zeros(gray.shape[0], dtype=torch.int64), names, names, names)


def make_checkpoints(out: Path) -> tuple[Path, Path]:
    """Random-init ResNet50/ResNet18 checkpoints (timing does not depend on the weights), with
    int8 weights (PyTorch's, and ONNX Runtime's where installed) calibrated on the slices of
    one phantom and checked on another's."""
    from ctdx.model_train.int8 import int8_weights, onnx_int8_weights
    from ctdx.model_train.method.checkpoint import CheckpointMeta, save_checkpoint
    from ctdx.model_train.method.networks import build_resnet
    from ctdx.model_train.method.onnx_runtime import onnx_int8_available
    from ctdx.model_train.method.preprocess import PreprocessParams

    torch.manual_seed(0)
    rec, man = out / "recognition.pt", out / "manifestation.pt"
    if not rec.exists():
        calib, check = _phantom_slices(1, 64), _phantom_slices(2, 32)
        for path, task, arch in ((rec, "recognition", "resnet50"),
                                 (man, "manifestation", "resnet18")):
            model = build_resnet(arch).eval()
            int8 = int8_weights(model, PreprocessParams(), calib, check, "phantom seed 1",
                                "phantom seed 2", min_agreement=0.0)
            onnx8 = onnx_int8_weights(model, PreprocessParams(), calib, check, "phantom seed 1",
                                      "phantom seed 2", min_agreement=0.0) \
                if onnx_int8_available() else None
            save_checkpoint(path, model, CheckpointMeta.new(task, arch, f"bench-{arch}", "0"),
                            int8=int8, onnx_int8=onnx8)
    return rec, man


def store_series(workdir: Path, files: list[Path]) -> tuple[str, int]:
    """A migrated SQLite database with ``files`` stored as the listener would."""
    sys.path.insert(0, str(REPO))
    from ctdx.db import migrate
    from ctdx.db.session import make_engine
    from tests.worker.conftest import store_files  # stores files as the listener does

    url = f"sqlite:///{workdir / 'bench.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    stored = store_files(engine, workdir / "data" / "spool", files)
    engine.dispose()
    return url, stored.study_version_id


def stage_table(files: list[Path], rec: Path, man: Path, bf16_sample: int,
                batch_size: int) -> dict[str, float]:
    """Seconds per stage for one series, each stage on its own (in this process)."""
    import pydicom

    from ctdx.model_train.method.inference import SliceClassifier
    from ctdx.model_train.method.preprocess import preprocess_batch
    from ctdx.model_train.method.segmentation import segment_lungs
    from ctdx.model_train.method.segmentation_torch import segment_lungs_torch
    from ctdx.worker.loading import iter_batches, order_series
    from ctdx.worker.study import InstanceRef

    refs = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        refs.append(InstanceRef(str(ds.SOPInstanceUID), "", "", f))
    out: dict[str, float] = {}

    def decode() -> tuple[np.ndarray, float | None]:
        series = order_series(refs)
        hu = np.concatenate([b.hu for b in iter_batches(series, batch_size)])
        return hu, series.slices[0].pixel_spacing_mm

    out["decode"], (hu, spacing) = timed(decode)
    n = hu.shape[0]
    out["slices"] = n
    out["segmentation (scikit-image)"], sk = timed(
        lambda: np.stack([segment_lungs(s, spacing_mm=spacing) for s in hu]))

    def seg_torch() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([segment_lungs_torch(torch.from_numpy(hu[i:i + batch_size]),
                                                  spacing_mm=spacing)
                              for i in range(0, n, batch_size)])

    out["segmentation (torch)"], lung = timed(seg_torch)
    inter = np.logical_and(sk, lung.numpy()).sum()
    out["dice torch vs scikit-image"] = float(2 * inter / max(sk.sum() + lung.numpy().sum(), 1))
    hu_t = torch.from_numpy(hu)

    def prep() -> torch.Tensor:
        return torch.cat([preprocess_batch(hu_t[i:i + batch_size], lung[i:i + batch_size],
                                           _params(rec)) for i in range(0, n, batch_size)])

    out["preprocessing"], x = timed(prep)

    def classify(model: Any, inputs: torch.Tensor) -> np.ndarray:
        return np.concatenate([model.predict(inputs[i:i + batch_size])
                               for i in range(0, inputs.shape[0], batch_size)])

    fp32 = SliceClassifier.from_checkpoint(rec, "recognition", device="auto", precision="fp32")
    classify(fp32, x[:2])  # warm-up
    out["classification ResNet50 fp32"], p32 = timed(lambda: classify(fp32, x))
    bf16 = SliceClassifier.from_checkpoint(rec, "recognition", device="auto", precision="bf16")
    classify(bf16, x[:2])
    sample = min(n, bf16_sample)
    seconds, p16 = timed(lambda: classify(bf16, x[:sample]))
    out["classification ResNet50 bf16"] = seconds * n / sample
    out["bf16 sample slices"] = sample
    out["bf16 argmax agreement"] = float((p16.argmax(1) == p32[:sample].argmax(1)).mean())
    int8 = SliceClassifier.from_checkpoint(rec, "recognition", device="cpu", precision="int8")
    classify(int8, x[:2])
    out["classification ResNet50 int8"], p8 = timed(lambda: classify(int8, x))
    out["int8 argmax agreement"] = float((p8.argmax(1) == p32.argmax(1)).mean())
    m18 = SliceClassifier.from_checkpoint(man, "manifestation", device="auto", precision="fp32")
    classify(m18, x[:2])
    out["manifestation ResNet18 fp32 (all slices)"], _ = timed(lambda: classify(m18, x))
    m18q = SliceClassifier.from_checkpoint(man, "manifestation", device="cpu", precision="int8")
    classify(m18q, x[:2])
    out["manifestation ResNet18 int8 (all slices)"], _ = timed(lambda: classify(m18q, x))
    from ctdx.model_train.method.checkpoint import load_checkpoint
    from ctdx.model_train.method.onnx_runtime import onnxruntime_available

    if onnxruntime_available() and load_checkpoint(rec, "recognition").onnx_int8 is not None:
        ort = SliceClassifier.from_checkpoint(rec, "recognition", device="cpu",
                                              precision="ort-int8")
        classify(ort, x[:2])
        out["classification ResNet50 ort-int8"], po = timed(lambda: classify(ort, x))
        out["ort-int8 argmax agreement"] = float((po.argmax(1) == p32.argmax(1)).mean())
        m18o = SliceClassifier.from_checkpoint(man, "manifestation", device="cpu",
                                               precision="ort-int8")
        classify(m18o, x[:2])
        out["manifestation ResNet18 ort-int8 (all slices)"], _ = timed(lambda: classify(m18o, x))
    return out


def _params(rec: Path) -> Any:
    from ctdx.model_train.method.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(rec).preprocess


def end_to_end(url: str, data_dir: Path, version_id: int, rec: Path, man: Path,
               backend: str, batch_size: int, precision: str = "auto") -> dict[str, Any]:
    """The worker path in this (fresh) process: what one Celery task does."""
    from ctdx.db.session import make_engine
    from ctdx.db.settings import load_settings
    from ctdx.worker import runtime, service

    settings = load_settings(data_dir=data_dir, database_url=url, model=rec,
                             manifestation_model=man, segmentation_backend=backend,
                             batch_size=batch_size, device="auto", broker_url="memory://",
                             precision=precision)
    load_seconds, models = timed(lambda: runtime.get_models(settings))
    engine = make_engine(url)
    seconds, result = timed(lambda: service.process_study_version(engine, settings, models,
                                                                 version_id))
    from sqlalchemy import select

    from ctdx.db.models import Analysis
    from ctdx.db.session import session_scope

    with session_scope(engine) as session:
        row = session.scalars(select(Analysis).where(Analysis.id == result.analysis_id)).one()
        timings, analysed = dict(row.timings or {}), row.slices_analysed
        reason = row.failure_reason
    return {"outcome": result.outcome.value, "reason": reason, "seconds": seconds,
            "model_load": load_seconds,
            "timings": timings, "slices_analysed": analysed, "device": models.device,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (``VmHWM``; ``ru_maxrss`` keeps the high-water
    mark of the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def isa_environment(isa: str) -> dict[str, str]:
    """This process's environment with the CPU libraries held to ``isa`` (see ``ISA_ENV``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {name for level in ISA_ENV.values() for name in level}}
    env.update(ISA_ENV[isa])
    return env


def run_child(args: list[str], isa: str = "native", flag: str = "--child") -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, flag, *args], capture_output=True,
                          text=True, cwd=REPO, env=isa_environment(isa))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="phantom slices (16 or more)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bf16-sample", type=int, default=32,
                        help="slices timed in bf16 (extrapolated): slow without AVX512-BF16")
    parser.add_argument("--memory-slices", type=int, default=0,
                        help="also run the worker path on a phantom this long and report peak RSS")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the --memory-slices run, appended to the results file")
    parser.add_argument("--no-real", action="store_true", help="skip the real series")
    parser.add_argument("--isa", choices=(*ISA_LEVELS, "all"), default="native",
                        help="instruction-set level of the network stages and the worker path "
                             "(child processes; `all` runs each level)")
    parser.add_argument("--precision", default="auto",
                        help="CTDX_PRECISION of the worker path (default auto); a comma-separated "
                             "list runs the worker path once per precision")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results (per study and ISA level) to this file")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--child-stages", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        url, data_dir, version, rec, man, backend, batch, precision = args.child
        print(json.dumps(end_to_end(url, Path(data_dir), int(version), Path(rec), Path(man),
                                    backend, int(batch), precision)))
        return
    if args.child_stages is not None:
        job = json.loads(args.child_stages)
        print(json.dumps(stage_table([Path(f) for f in job["files"]], Path(job["rec"]),
                                     Path(job["man"]), job["bf16_sample"], job["batch_size"])))
        return

    from ctdx.model_train.phantom import write_phantom_series

    about = machine()
    print(f"machine: {about}")
    work = Path(tempfile.mkdtemp(prefix="ctdx-bench-"))
    rec, man = make_checkpoints(work)
    studies: dict[str, list[Path]] = {}
    if not args.memory_only:
        phantom = write_phantom_series(work / "phantom", "covid19", n_slices=args.slices,
                                       size=args.size, seed=0)
        studies[f"phantom {args.slices}x{args.size}²"] = list(phantom.paths)
    if REAL_SERIES.is_dir() and not args.no_real and not args.memory_only:
        studies["covid-ct-md P001 (JPEG lossless)"] = sorted(REAL_SERIES.glob("*.dcm"))

    levels = ISA_LEVELS if args.isa == "all" else (args.isa,)
    report: list[str] = []
    records: list[dict[str, Any]] = []
    for name, files in studies.items():
        print(f"\n== {name}: {len(files)} files")
        slug = name.split()[0] + str(len(files))
        workdir = work / slug
        workdir.mkdir()
        for isa in levels:
            print(f"-- ISA {isa} {ISA_ENV[isa] or '(unrestricted)'}")
            job = {"files": [str(f) for f in files], "rec": str(rec), "man": str(man),
                   "bf16_sample": args.bf16_sample, "batch_size": args.batch_size}
            stages = run_child([json.dumps(job)], isa, flag="--child-stages")
            for precision in args.precision.split(","):
                # a fresh database per run: the worker path analyses each study version once
                run_dir = workdir / f"{isa}-{precision}"
                run_dir.mkdir()
                run_url, run_version = store_series(run_dir, files)
                e2e = run_child([run_url, str(run_dir / "data"), str(run_version), str(rec),
                                 str(man), "torch", str(args.batch_size), precision], isa)
                e2e["precision"] = precision
                title = name if isa == "native" else f"{name}, ISA {isa}"
                if precision != "auto":
                    title += f", CTDX_PRECISION={precision}"
                report.append(render(title, stages, e2e))
                records.append(record(name, isa, stages, e2e))
                print(report[-1])
    if len(records) > 1 or args.isa != "native":
        report.insert(0, isa_summary(records))
    if args.memory_slices:
        big = write_phantom_series(work / "big", "normal", n_slices=args.memory_slices,
                                   size=args.size, seed=1)
        workdir = work / "memory"
        workdir.mkdir()
        url, version = store_series(workdir, list(big.paths))
        e2e = run_child([url, str(workdir / "data"), str(version), str(rec), str(man), "torch",
                         str(args.batch_size), args.precision.split(",")[0]])
        t = e2e["timings"]
        line = (f"\n### Memory: {args.memory_slices}-slice {args.size}² phantom\n\n"
                f"Worker path (ResNet50 + ResNet18, batch {args.batch_size}): peak RSS "
                f"**{e2e['peak_rss_mb']:.0f} MB** (limit 4096 MB); {e2e['seconds']:.0f} s, "
                f"{e2e['slices_analysed']} slices analysed; stages "
                + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + ".\n")
        report.append(line)
        print(line)
    write_results(about, report, append=args.memory_only)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": about, "load_average_end": os.getloadavg(),
                                         "results": records}, indent=2) + "\n")
        print(f"wrote {args.json}")


def record(study: str, isa: str, s: dict[str, float], e2e: dict[str, Any]) -> dict[str, Any]:
    """One study at one ISA level, for ``--json``."""
    naive = sum(s[k] for k in NAIVE_STAGES)
    return {
        "study": study, "isa": isa, "isa_env": ISA_ENV[isa], "runtime": e2e["device"],
        "precision": e2e.get("precision", "auto"),
        "slices": int(s["slices"]), "slices_analysed": e2e["slices_analysed"],
        "worker_path_s": round(e2e["seconds"], 3), "naive_pipeline_s": round(naive, 3),
        "speedup_vs_naive": round(naive / e2e["seconds"], 2),
        "naive_stages_s": {k: round(s[k], 3) for k in NAIVE_STAGES},
        "stages_s": {k: round(v, 4) for k, v in s.items()},
        "worker_timings_s": e2e["timings"], "model_load_s": round(e2e["model_load"], 3),
        "peak_rss_mb": round(e2e["peak_rss_mb"]), "outcome": e2e["outcome"],
        "load_average": os.getloadavg()[0],
    }


def isa_summary(records: list[dict[str, Any]]) -> str:
    """The per-ISA table at the top of the results."""
    lines = ["### Per instruction-set level", "",
             "| study | ISA (env of the child) | CTDX_PRECISION | worker path | naive pipeline | "
             "speed-up | ResNet50 ms/slice: torch int8 / ORT int8 / fp32 | "
             "runtime (as reported) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in records:
        st, n = r["stages_s"], r["slices"]
        env = ", ".join(f"{k}={v}" for k, v in r["isa_env"].items()) or "unrestricted"
        ort_s = st.get("classification ResNet50 ort-int8")
        ort = "—" if ort_s is None else f"{1e3 * ort_s / n:.1f}"
        lines.append(
            f"| {r['study']} | {r['isa']} ({env}) | {r['precision']} | "
            f"**{r['worker_path_s']:.1f} s** | "
            f"{r['naive_pipeline_s']:.1f} s | {r['speedup_vs_naive']:.1f}x | "
            f"{1e3 * st['classification ResNet50 int8'] / n:.1f} / {ort} / "
            f"{1e3 * st['classification ResNet50 fp32'] / n:.1f} | {r['runtime']} |")
    lines += ["", "Naive pipeline: decode + scikit-image segmentation slice by slice + "
              "preprocessing + fp32 eager ResNet50 and ResNet18 (every slice), timed in the same "
              "child as the other stages. ONNX Runtime's kernels (MLAS) ignore these "
              "variables: where a run serves through ONNX Runtime, its network times are "
              "this CPU's native ones at every level.", ""]
    return "\n".join(lines)


def render(name: str, s: dict[str, float], e2e: dict[str, Any]) -> str:
    n = int(s["slices"])
    rows = [
        ("decode (headers, order, pixels -> HU)", s["decode"]),
        ("segmentation, scikit-image (reference)", s["segmentation (scikit-image)"]),
        ("segmentation, torch (batched)", s["segmentation (torch)"]),
        ("preprocessing", s["preprocessing"]),
        ("classification ResNet50 fp32 + channels-last", s["classification ResNet50 fp32"]),
        (f"classification ResNet50 bf16 + channels-last (from {int(s['bf16 sample slices'])} "
         "slices)", s["classification ResNet50 bf16"]),
        ("classification ResNet50 int8 (x86) + channels-last", s["classification ResNet50 int8"]),
        ("manifestation ResNet18 fp32 (every slice; upper bound)",
         s["manifestation ResNet18 fp32 (all slices)"]),
        ("manifestation ResNet18 int8 (every slice; upper bound)",
         s["manifestation ResNet18 int8 (all slices)"]),
    ]
    if "classification ResNet50 ort-int8" in s:
        rows += [
            ("classification ResNet50 int8, ONNX Runtime QDQ u8s8 (native ISA always)",
             s["classification ResNet50 ort-int8"]),
            ("manifestation ResNet18 int8, ONNX Runtime (every slice; native ISA always)",
             s["manifestation ResNet18 ort-int8 (all slices)"]),
        ]
    t = e2e["timings"]
    if e2e["outcome"] != "analysed":
        raise SystemExit(f"worker path did not analyse the study: {e2e['reason']}")
    lines = [f"### {name}: {n} slices", "", "| stage | s per study | ms per slice |",
             "|---|---:|---:|"]
    lines += [f"| {label} | {sec:.2f} | {1e3 * sec / n:.1f} |" for label, sec in rows]
    lines += [
        "",
        f"Dice torch vs scikit-image segmentation: {s['dice torch vs scikit-image']:.4f}; "
        f"bf16 vs fp32 argmax agreement on the sample: {s['bf16 argmax agreement']:.3f}; "
        f"int8 vs fp32: {s['int8 argmax agreement']:.3f}"
        + (f", ONNX Runtime int8 vs fp32: {s['ort-int8 argmax agreement']:.3f}"
           if "ort-int8 argmax agreement" in s else "")
        + " (random-init weights: agreement "
        "here says little; the checks that matter are the exported models').",
        "",
        f"Worker path (`process_study_version`, fresh process, torch segmentation, device "
        f"{e2e['device']}): **{e2e['seconds']:.1f} s** per study ({e2e['outcome']}, "
        f"{e2e['slices_analysed']} slices analysed; model load {e2e['model_load']:.1f} s, once "
        f"per process), peak RSS {e2e['peak_rss_mb']:.0f} MB. Stages as stored in "
        "`analyses.timings`:",
        "",
        "| " + " | ".join(t) + " |",
        "|" + "---:|" * len(t),
        "| " + " | ".join(f"{v:.2f}" for v in t.values()) + " |",
        "",
    ]
    return "\n".join(lines)


def write_results(about: str, report: list[str], append: bool = False) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/bench_worker.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--child"))
    if append and RESULTS.exists():
        with RESULTS.open("a") as fh:
            fh.write(f"\nCommand: `.venv/bin/python {command.strip()}`, "
                     f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {about}.\n")
            fh.write("\n".join(report) + "\n")
        print(f"\nappended to {RESULTS.relative_to(REPO)}")
        return
    RESULTS.write_text(
        "# Worker benchmark\n\n"
        f"Command: `.venv/bin/python {command.strip()}`, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n\n"
        f"Machine: {about}; {os.getloadavg()[0]:.1f} at the end (a load average above 1 "
        "before the start means other jobs shared the 2 cores: numbers are then pessimistic)."
        "\n\n"
        "Target: <= 12 s per study on 2 CPU cores, <= 0.5 s on one H100; peak memory <= 4 GB "
        "for 1000 slices.\n\n" + "\n".join(report) + "\n"
    )
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
