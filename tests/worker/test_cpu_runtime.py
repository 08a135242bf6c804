"""The CPU int8 runtimes: ONNX Runtime beside PyTorch, the per-host choice, and life without it.

The networks are the small random-weight ResNet18s of the ``checkpoints`` fixture (64 px),
given both int8 models through the same functions ``ctdx train export --int8`` uses,
calibrated and checked on random slices (random weights: the agreement minimum is 0 here,
except where the gate itself is tested).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ctdx.model_train.data import SliceSet
from ctdx.model_train.method import cpu_runtime, inference
from ctdx.model_train.method.checkpoint import load_checkpoint, save_checkpoint
from ctdx.model_train.method.inference import SliceClassifier
from ctdx.model_train.method.quantize import QuantizationError
from ctdx.worker import runtime
from ctdx.worker.errors import WorkerNotReady
from tests.conftest import REPO_ROOT
from tests.worker.conftest import Checkpoints, StoredStudy, analysis_settings


def _slices(n: int, seed: int, size: int = 64) -> SliceSet:
    g = torch.Generator().manual_seed(seed)
    gray = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    names = tuple(str(i) for i in range(n))
    return SliceSet(gray, torch.zeros(n, dtype=torch.int64), names, names, names)


@dataclass(frozen=True)
class Int8Checkpoints:
    both: Path  # PyTorch and ONNX Runtime int8
    torch_only: Path
    onnx_only: Path


@pytest.fixture(scope="module")
def int8_checkpoints(checkpoints: Checkpoints,
                     tmp_path_factory: pytest.TempPathFactory) -> Int8Checkpoints:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ctdx.model_train.int8 import int8_weights, onnx_int8_weights

    loaded = load_checkpoint(checkpoints.recognition, task="recognition")
    params = loaded.meta.preprocess
    calib, check = _slices(24, 1), _slices(16, 2)
    sources = dict(calibration_source="random slices", evaluation_source="other random slices",
                   min_agreement=0.0)
    w8 = int8_weights(loaded.model, params, calib, check, **sources)  # type: ignore[arg-type]
    o8 = onnx_int8_weights(loaded.model, params, calib, check, **sources)  # type: ignore[arg-type]
    out = tmp_path_factory.mktemp("int8")
    meta = loaded.meta
    paths = Int8Checkpoints(out / "both.pt", out / "torch.pt", out / "onnx.pt")
    save_checkpoint(paths.both, loaded.model, meta, int8=w8, onnx_int8=o8)
    save_checkpoint(paths.torch_only, loaded.model, meta, int8=w8)
    save_checkpoint(paths.onnx_only, loaded.model, meta, onnx_int8=o8)
    return paths


def _batch(n: int = 6) -> torch.Tensor:
    from ctdx.model_train.int8 import _batches
    from ctdx.model_train.method.preprocess import PreprocessParams

    return next(_batches(_slices(n, 3).gray, PreprocessParams(size=64)))


def test_the_onnx_int8_model_travels_in_the_checkpoint_with_what_was_checked(
        int8_checkpoints: Int8Checkpoints) -> None:
    loaded = load_checkpoint(int8_checkpoints.both, task="recognition")
    assert loaded.onnx_int8 is not None and loaded.int8 is not None
    report = loaded.onnx_int8.report
    assert report.backend.startswith("onnxruntime ") and report.backend.endswith("QDQ u8s8")
    assert report.calibration_slices == 24 and report.evaluation_slices == 16
    assert 0.0 <= report.argmax_agreement <= 1.0
    assert load_checkpoint(int8_checkpoints.torch_only, task="recognition").onnx_int8 is None


def test_ort_int8_serves_through_the_same_classifier_and_says_so(
        int8_checkpoints: Int8Checkpoints) -> None:
    ort = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                          precision="ort-int8")
    fp32 = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                           precision="fp32")
    assert ort.runtime == "onnxruntime" and ort.precision == "int8"
    assert "int8 onnxruntime" in ort.device_description
    assert len(ort.device_description) <= 128  # analyses.device
    x = _batch()
    p8, p32 = ort.predict(x), fp32.predict(x)
    assert p8.shape == p32.shape == (6, 3)
    assert abs(float(p8.sum()) - 6.0) < 1e-3
    # the small head is biased towards COVID-19 (see the fixture): both call every slice so
    assert (p8.argmax(1) == p32.argmax(1)).all()
    torch8 = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                             precision="int8")
    assert torch8.runtime == "torch" and "int8 x86" in torch8.device_description


def test_the_agreement_gate_refuses_an_onnx_model_below_the_minimum(
        checkpoints: Checkpoints) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ctdx.model_train.int8 import onnx_int8_weights

    loaded = load_checkpoint(checkpoints.recognition, task="recognition")
    with pytest.raises(QuantizationError, match=r"held-out slices as fp32 does, below the min"):
        onnx_int8_weights(loaded.model, loaded.meta.preprocess, _slices(8, 1), _slices(8, 2),
                          "random", "random", min_agreement=1.01)


def test_auto_times_both_runtimes_once_per_host_and_model(
        int8_checkpoints: Int8Checkpoints, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cpu-runtime.json"
    first = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                            choice_cache=cache)
    assert first.precision == "int8" and first.runtime in cpu_runtime.INT8_RUNTIMES
    entries = json.loads(cache.read_text())
    (key, entry), = entries.items()
    assert key.endswith("/" + first.meta.model_uid)
    assert entry["runtime"] == first.runtime
    assert set(entry["ms_per_slice"]) == {"torch", "onnxruntime"}
    assert entry["ms_per_slice"][first.runtime] == min(entry["ms_per_slice"].values())

    def no_probe(*args: object, **kwargs: object) -> dict[str, float]:
        raise AssertionError("measured again although this host and model are cached")

    def not_built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the slower runtime was built although the cache names the faster")

    monkeypatch.setattr(cpu_runtime, "measure", no_probe)
    with monkeypatch.context() as m:  # a cached choice loads only the runtime it names
        m.setattr(inference, "OrtModule" if first.runtime == "torch" else "load_int8", not_built)
        again = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition",
                                                device="cpu", choice_cache=cache)
    assert again.runtime == first.runtime
    # what the cache says is what serves (another process measured the other one faster)
    other = "torch" if first.runtime == "onnxruntime" else "onnxruntime"
    entry["runtime"] = other
    cache.write_text(json.dumps({key: entry}))
    assert SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                           choice_cache=cache).runtime == other


def test_a_damaged_cache_costs_a_probe_not_the_worker(int8_checkpoints: Int8Checkpoints,
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "cpu-runtime.json"
    cache.write_text("{not json")
    served = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                             choice_cache=cache)
    assert served.runtime in cpu_runtime.INT8_RUNTIMES
    assert json.loads(cache.read_text())  # rewritten with this host's measurement


def test_one_int8_runtime_in_the_checkpoint_is_served_without_a_probe(
        int8_checkpoints: Int8Checkpoints, tmp_path: Path) -> None:
    cache = tmp_path / "cpu-runtime.json"
    only_onnx = SliceClassifier.from_checkpoint(int8_checkpoints.onnx_only, "recognition",
                                                device="cpu", choice_cache=cache)
    only_torch = SliceClassifier.from_checkpoint(int8_checkpoints.torch_only, "recognition",
                                                 device="cpu", choice_cache=cache)
    assert (only_onnx.runtime, only_torch.runtime) == ("onnxruntime", "torch")
    assert not cache.exists()


def test_the_worker_reports_the_runtime_it_chose(int8_checkpoints: Int8Checkpoints,
                                                 tmp_path: Path, sqlite_url: str) -> None:
    both = Checkpoints(int8_checkpoints.both, int8_checkpoints.both.with_name("none"))
    settings = analysis_settings(tmp_path / "data", sqlite_url, both, None,
                                 manifestation_model=None, precision="ort-int8")
    models = runtime.get_models(settings)
    assert "int8 onnxruntime" in models.device
    assert models.recognition.runtime == "onnxruntime"
    auto = runtime.get_models(settings.model_copy(update={"precision": "auto"}))
    assert (tmp_path / "data" / "cpu-runtime.json").is_file()
    named = {"onnxruntime": "int8 onnxruntime", "torch": "int8 x86"}[str(auto.recognition.runtime)]
    assert named in auto.device


def test_without_onnxruntime_auto_serves_torch_int8_and_ort_int8_says_what_to_install(
        int8_checkpoints: Int8Checkpoints, tmp_path: Path, sqlite_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "onnxruntime_available", lambda: False)
    auto = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                           choice_cache=tmp_path / "c.json")
    assert auto.runtime == "torch" and not (tmp_path / "c.json").exists()
    onnx_only = SliceClassifier.from_checkpoint(int8_checkpoints.onnx_only, "recognition",
                                                device="cpu")
    assert onnx_only.precision in ("fp32", "bf16") and onnx_only.runtime is None
    both = Checkpoints(int8_checkpoints.both, int8_checkpoints.both)
    settings = analysis_settings(tmp_path / "data", sqlite_url, both, None,
                                 manifestation_model=None, precision="ort-int8")
    with pytest.raises(WorkerNotReady, match=r"onnxruntime is not installed .*ctdx\[onnx\]"):
        runtime.get_models(settings)


def test_ort_int8_on_a_checkpoint_without_it_stops_the_worker_with_the_fix(
        checkpoints: Checkpoints, tmp_path: Path, sqlite_url: str) -> None:
    settings = analysis_settings(tmp_path / "data", sqlite_url, checkpoints, None,
                                 precision="ort-int8")
    with pytest.raises(WorkerNotReady, match=r"no ONNX Runtime int8 model: export it with"):
        runtime.get_models(settings)


def test_serving_imports_no_onnx_package_until_a_model_needs_it() -> None:
    code = ("import sys, ctdx.worker.runtime, ctdx.model_train.method.inference; "
            "assert not {'onnx', 'onnxruntime'} & set(sys.modules), "
            "sorted({'onnx', 'onnxruntime'} & set(sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_cache_key_changes_with_the_kernel_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    native = cpu_runtime.host_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_runtime.host_key() != native
    assert cpu_runtime.host_key(threads=1) != cpu_runtime.host_key(threads=2)


def test_a_malformed_onnx_entry_is_refused_on_load(checkpoints: Checkpoints,
                                                   tmp_path: Path) -> None:
    from ctdx.model_train.method.checkpoint import CheckpointError

    payload = torch.load(checkpoints.recognition, weights_only=True)
    payload["onnx_int8"] = {"model": torch.zeros(3, dtype=torch.float32), "report": {}}
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match=r"onnx_int8 entry is malformed"):
        load_checkpoint(bad, task="recognition")


def test_an_analysis_served_by_onnx_runtime_says_so_in_results_show(
        int8_checkpoints: Int8Checkpoints, tmp_path: Path, sqlite_url: str,
        small_rules: Path, store: Callable[..., StoredStudy],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ctdx.cli import app
    from ctdx.db.session import make_engine
    from ctdx.model_train.phantom import write_phantom_series
    from ctdx.worker import service

    both = Checkpoints(int8_checkpoints.both, int8_checkpoints.both)
    settings = analysis_settings(tmp_path / "data", sqlite_url, both, small_rules,
                                 manifestation_model=None, precision="ort-int8")
    study = write_phantom_series(tmp_path / "src", "covid19", n_slices=6, size=80, seed=2)
    stored = store(sqlite_url, list(study.paths))
    engine = make_engine(sqlite_url)
    result = service.process_study_version(engine, settings, runtime.get_models(settings),
                                           stored.study_version_id)
    engine.dispose()
    assert result.outcome is service.Outcome.ANALYSED
    for key in [k for k in __import__("os").environ if k.startswith("CTDX_")]:
        monkeypatch.delenv(key)
    shown = CliRunner().invoke(app, ["results", "show", stored.study_instance_uid, "-f", "json",
                                     "--database-url", sqlite_url])
    assert shown.exit_code == 0, shown.output
    assert "int8 onnxruntime" in shown.output and "QDQ u8s8" in shown.output


def test_torch_int8_weights_this_torch_cannot_load_leave_the_onnx_model_serving(
        int8_checkpoints: Int8Checkpoints, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def other_torch(*args: object, **kwargs: object) -> None:
        raise QuantizationError("int8 weights do not fit this code's resnet18 int8 graph")

    monkeypatch.setattr(inference, "load_int8", other_torch)
    served = SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                             choice_cache=tmp_path / "c.json")
    assert served.runtime == "onnxruntime"
    with pytest.raises(QuantizationError, match="do not fit"):  # asked for by name: no fallback
        SliceClassifier.from_checkpoint(int8_checkpoints.both, "recognition", device="cpu",
                                        precision="int8")
