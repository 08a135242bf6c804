"""The paper's method over one ordered series, batch by batch: plain functions, no Celery.

For each batch of ``settings.batch_size`` slices (decoded by
:func:`ctdx.worker.loading.iter_batches`):

1. **segmentation** of the lungs (``ctdx.model_train.method.segmentation_torch``,
   batched, by default; the scikit-image reference with
   ``CTDX_SEGMENTATION_BACKEND=skimage``);
2. slices whose lung covers less than ``settings.min_lung_fraction`` of the
   image are **skipped** (and counted): apex and base slices with a sliver of
   lung, or slices below the diaphragm, carry no evidence and are where a
   classifier trained on lung images is least reliable;
3. **preprocessing** with the shared ``preprocess_batch`` and the parameters
   stored in the recognition checkpoint;
4. **classification** with the ResNet50 :class:`SliceClassifier`;
5. **manifestations** with the ResNet18 one on slices called COVID-19, when a
   manifestation model is configured (re-preprocessed only if its checkpoint's
   parameters differ).

Only per-slice numbers are kept between batches, so memory is bounded by one
batch whatever the series length. Then ``decide_study`` applies the paper's
proportion rule. Timings are summed per stage.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray

from ctdx.db.settings import Settings
from ctdx.model_train.method.classes import MANIFESTATION_CLASSES, RECOGNITION_CLASSES
from ctdx.model_train.method.decision import StudyDecision, decide_study, summarise_manifestations
from ctdx.model_train.method.preprocess import preprocess_batch
from ctdx.worker.errors import AnalysisError
from ctdx.worker.loading import OrderedSeries, SliceBatch, iter_batches
from ctdx.worker.store import SliceRow, StudyResult

if TYPE_CHECKING:
    from ctdx.worker.runtime import Models
    from ctdx.worker.series_selection import Selection

logger = logging.getLogger(__name__)

class NoLungFound(AnalysisError):
    """Every slice was skipped: no slice shows enough lung to be classified."""


@dataclass
class Timings:
    """Seconds per stage, summed over batches."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


@dataclass(frozen=True)
class SeriesAnalysis:
    """Everything the analysis of one series produced."""

    slices: tuple[SliceRow, ...]
    decision: StudyDecision
    manifestation_counts: dict[str, int] | None
    timings: dict[str, float]
    device: str

    @property
    def decision_label(self) -> str:
        return self.decision.decision

    def slice_rows(self) -> list[SliceRow]:
        return list(self.slices)

    def study_result(self, selection: Selection) -> StudyResult:
        analysed = sum(1 for s in self.slices if not s.skipped)
        return StudyResult(
            series_instance_uid=selection.series.series_instance_uid,
            series_selection=selection.reason,
            slices_total=len(self.slices),
            slices_analysed=analysed,
            slices_skipped=len(self.slices) - analysed,
            fraction_covid19=self.decision.fractions["covid19"],
            fraction_other_pneumonia=self.decision.fractions["other_pneumonia"],
            fraction_normal=self.decision.fractions["normal"],
            decision=self.decision.decision,
            threshold=self.decision.threshold,
            manifestation_counts=self.manifestation_counts,
            device=self.device[:128],
        )



def _slice_rows(batch: SliceBatch, fractions: NDArray[np.float64],
                areas: NDArray[np.int64], min_fraction: float) -> list[SliceRow]:
    rows = []
    for info, fraction, pixels in zip(batch.slices, fractions, areas, strict=True):
        area = float(pixels) * info.pixel_area_mm2 if info.pixel_area_mm2 is not None else None
        rows.append(SliceRow(
            sop_instance_uid=info.sop_instance_uid,
            frame_number=info.frame_number,
            slice_index=info.index,
            position_z=info.position,
            lung_area_mm2=area,
            lung_fraction=float(fraction),
            skipped=bool(fraction < min_fraction),
        ))
    return rows


@dataclass
class _Collected:
    """Per-slice outputs gathered batch by batch (only numbers: memory stays bounded)."""

    rows: list[SliceRow] = field(default_factory=list)
    probs: dict[int, NDArray[np.float32]] = field(default_factory=dict)  # by slice index
    manifestations: dict[int, NDArray[np.float32]] = field(default_factory=dict)


def _analyse_batch(batch: SliceBatch, models: Models, settings: Settings, timings: Timings,
                   out: _Collected) -> None:
    recognition, manifestation = models.recognition, models.manifestation
    hu = torch.from_numpy(batch.hu).to(recognition.device)
    with timings.stage("segmentation"):
        lung = models.segment(hu, batch.slices[0].pixel_spacing_mm)
        pixels = lung.sum(dim=(1, 2)).cpu().numpy().astype(np.int64)
    fractions = pixels / float(lung.shape[1] * lung.shape[2])
    rows = _slice_rows(batch, fractions, pixels, settings.min_lung_fraction)
    out.rows.extend(rows)
    kept = [r for r in rows if not r.skipped]
    if not kept:
        return
    keep = torch.tensor([not r.skipped for r in rows], device=hu.device)
    kept_hu, kept_lung = hu[keep], lung[keep]
    with timings.stage("preprocessing"):
        x = preprocess_batch(kept_hu, kept_lung, recognition.meta.preprocess)
    with timings.stage("classification"):
        probs = recognition.predict(x)
    out.probs.update((r.slice_index, p) for r, p in zip(kept, probs, strict=True))
    if manifestation is None:
        return
    covid = np.argmax(probs, axis=1) == RECOGNITION_CLASSES.index("covid19")
    if not covid.any():
        return
    with timings.stage("manifestation"):
        sel = torch.from_numpy(covid).to(x.device)
        if manifestation.meta.preprocess == recognition.meta.preprocess:
            mx = x[sel]
        else:
            mx = preprocess_batch(kept_hu[sel], kept_lung[sel], manifestation.meta.preprocess)
        mprobs = manifestation.predict(mx)
    covid_rows = [r for r, c in zip(kept, covid, strict=True) if c]
    out.manifestations.update(
        (r.slice_index, p) for r, p in zip(covid_rows, mprobs, strict=True)
    )


def analyse_series(series: OrderedSeries, models: Models, settings: Settings,
                   decode_threads: int = 1) -> SeriesAnalysis:
    """Run the method over ``series``; raises :class:`NoLungFound` when every slice is skipped."""
    timings = Timings()
    out = _Collected()
    batches = iter_batches(series, settings.batch_size, decode_threads=decode_threads)
    while True:
        with timings.stage("decode"):
            batch = next(batches, None)
        if batch is None:
            break
        _analyse_batch(batch, models, settings, timings, out)

    if not out.probs:
        raise NoLungFound(
            f"no slice shows enough lung: all {len(out.rows)} slices have a lung fraction "
            f"below {settings.min_lung_fraction:g} (CTDX_MIN_LUNG_FRACTION)"
        )
    decision = decide_study(np.stack([out.probs[i] for i in sorted(out.probs)]),
                            settings.covid_threshold)
    manifestation_counts = None
    if models.manifestation is not None:
        found = [out.manifestations[i] for i in sorted(out.manifestations)]
        manifestation_counts = summarise_manifestations(
            np.stack(found) if found else np.zeros((0, len(MANIFESTATION_CLASSES)))
        )
    final = [_with_probabilities(r, out.probs.get(r.slice_index),
                                 out.manifestations.get(r.slice_index)) for r in out.rows]
    logger.info("series analysed: %d slices, %d skipped, call %s", len(final),
                len(final) - len(out.probs), decision.decision)
    return SeriesAnalysis(tuple(final), decision, manifestation_counts, timings.as_dict(),
                          models.device)


def _with_probabilities(row: SliceRow, probs: NDArray[np.float32] | None,
                        mprobs: NDArray[np.float32] | None) -> SliceRow:
    if probs is None:
        return row
    values = dict(row.__dict__)
    values.update(
        p_covid19=float(probs[0]),
        p_other_pneumonia=float(probs[1]),
        p_normal=float(probs[2]),
        predicted_class=RECOGNITION_CLASSES[int(np.argmax(probs))],
    )
    if mprobs is not None:
        values.update(
            p_ground_glass_opacity=float(mprobs[0]),
            p_consolidation=float(mprobs[1]),
            p_fibrotic_streaks=float(mprobs[2]),
            manifestation=MANIFESTATION_CLASSES[int(np.argmax(mprobs))],
        )
    return SliceRow(**values)
