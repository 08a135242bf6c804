"""The synthetic demonstration models: labelled as such, cached, and right on phantoms
through the real worker path (segmentation, skipping, preprocessing, SliceClassifier,
decide_study as ``ctdx.worker.pipeline.analyse_series`` runs them)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from ctdx.db.settings import load_settings
from ctdx.model_train.demo_model import NAME_NOTICE, ensure_demo_models, write_demo_model
from ctdx.model_train.method.checkpoint import load_checkpoint, read_checkpoint_meta
from ctdx.model_train.phantom import PhantomKind, write_phantom_series
from ctdx.worker.loading import order_series
from ctdx.worker.pipeline import analyse_series
from ctdx.worker.runtime import Models, _load
from ctdx.worker.study import InstanceRef

pytestmark = pytest.mark.slow

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained once per test session into a private cache (the user's is left alone)."""
    root = tmp_path_factory.mktemp("demo-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "user-cache"))
    try:
        paths = ensure_demo_models(root / "cache")
    finally:
        mp.undo()
    return paths.recognition.parent


def _call(models: Models, folder: Path, kind: PhantomKind, seed: int, size: int,
          n_slices: int) -> str:
    study = write_phantom_series(folder, kind, n_slices=n_slices, size=size, seed=seed)
    refs = [InstanceRef(uid, CT_IMAGE_STORAGE, EXPLICIT_LE, path)
            for uid, path in zip(study.sop_instance_uids, study.paths, strict=True)]
    settings = load_settings(device="cpu")
    return analyse_series(order_series(refs), models, settings).decision.decision


def test_demo_models_are_labelled_and_cached(demo_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    rec = load_checkpoint(demo_dir / "recognition.pt", task="recognition")
    man = load_checkpoint(demo_dir / "manifestation.pt", task="manifestation")
    for loaded, arch in ((rec, "resnet50"), (man, "resnet18")):
        meta = loaded.meta
        assert NAME_NOTICE in meta.model_name
        assert len(meta.model_name) <= 64  # Manufacturer's Model Name in the SR is LO
        assert meta.arch == arch
        assert meta.training_data["synthetic"] is True
        # int8 weights that passed their check against fp32 on held-out phantoms (the
        # recognition network's were refused while its batch-norm statistics were off)
        assert loaded.int8 is not None, arch
        assert loaded.int8.report.argmax_agreement >= 0.99
    start = time.perf_counter()
    out = write_demo_model(tmp_path / "demo.pt", cache_dir=demo_dir.parent)
    assert time.perf_counter() - start < 5  # cached: no training
    assert read_checkpoint_meta(out.recognition).model_uid == rec.meta.model_uid
    assert out.manifestation == tmp_path / "demo-manifestation.pt"


def test_phantom_studies_are_called_right_through_the_worker_path(demo_dir: Path,
                                                                   tmp_path: Path) -> None:
    settings = load_settings(model=demo_dir / "recognition.pt",
                             manifestation_model=demo_dir / "manifestation.pt", device="cpu")
    models = _load(settings)
    calls: Counter[tuple[str, str]] = Counter()
    for kind in ("covid19", "normal"):
        for seed in (21, 22, 23):
            calls[(kind, _call(models, tmp_path / f"{kind}-{seed}", kind, seed, 192, 30))] += 1
    assert calls[("covid19", "covid19")] >= 2, calls
    assert calls[("normal", "normal")] >= 2, calls
    # the phantom `ctdx demo` sends by default
    assert _call(models, tmp_path / "demo", "covid19", 7, 512, 60) == "covid19"
