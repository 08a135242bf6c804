"""The preprocessing cache: segmentation and preprocessing run once per slice.

The paper stores every preprocessed slice as a 224 x 224 8-bit image; so do we.
Each slice goes through the shared method code (lung segmentation with the
slice's pixel spacing, then
:func:`ctdx.model_train.method.preprocess.normalise_batch`, steps 1-5) and is stored
as the lossless ``uint8`` grey image (:func:`~model_train.method.preprocess.gray_to_uint8`)
plus its lung fraction (the share of the image inside the lung mask: training
leaves out what the worker would skip). Step 6 (channel replication, ImageNet
normalisation) and the augmentation run at training time.

Layout: ``<cache_dir>/method-<METHOD_VERSION>/pp-<hash of PreprocessParams>/<kk>/<key>.npz``.
The folder names the method version and the preprocessing parameters, so a
change of either never reads stale images; the key hashes the source file's
absolute path, size and modification time and the row's rotation, window and spacing,
so an edited file is recomputed. Entries are written to a temporary file and
renamed: an interrupted run leaves only whole entries, and the next run
resumes where it stopped. Work is spread over a process pool (default 2, the
cores of a dev machine); each process runs torch with one thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from ctdx.model_train.method.classes import METHOD_VERSION
from ctdx.model_train.method.preprocess import PreprocessParams
from ctdx.model_train.progress import ProgressBar
from ctdx.model_train.sources import LoadedSlice, SliceSource, SourceError, load_slice

logger = logging.getLogger(__name__)

CHUNK = 16
POOL_MIN_SLICES = 256  # below this, starting processes (each imports torch) costs more


class CacheError(RuntimeError):
    """Cache entries are missing or unreadable; the message says how many and which."""


@dataclass(frozen=True)
class CacheReport:
    total: int
    computed: int
    reused: int
    failures: tuple[tuple[str, str], ...] = field(default=())  # (path, reason)


@dataclass(frozen=True)
class CachedSlices:
    """Preprocessed grey slices in source order."""

    gray: NDArray[np.uint8]  # (N, S, S)
    lung_fraction: NDArray[np.float32]  # (N,)
    present: NDArray[np.bool_]  # False where the slice failed to preprocess


def cache_root(cache_dir: Path, params: PreprocessParams) -> Path:
    """The folder of this method version and these preprocessing parameters."""
    digest = hashlib.sha256(
        json.dumps(params.to_dict(), sort_keys=True).encode()
    ).hexdigest()[:12]
    return Path(cache_dir) / f"method-{METHOD_VERSION}" / f"pp-{digest}"


def slice_key(source: SliceSource) -> str:
    """Identity of one source slice (file identity plus how it is read)."""
    st = source.path.stat()
    ident = [str(source.path.absolute()), st.st_size, st.st_mtime_ns, source.rotate,
             list(source.window) if source.window else None, source.pixel_spacing,
             source.cropped]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:40]


def entry_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.npz"


FRAME_TISSUE_MM = 6.0
FRAME_TISSUE_HU = 40.0
FRAME_AIR_PX = 4


def frame_widths(spacing_mm: float | None) -> tuple[int, int]:
    """(soft-tissue, air) frame widths in pixels around a cropped image.

    The tissue frame is wider than the segmentation's 5 mm chest margin, so the
    margin erodes into the frame and not into the image.
    """
    from ctdx.model_train.method.segmentation import SegmentationParams

    spacing = spacing_mm or SegmentationParams().default_spacing_mm
    return int(math.ceil(FRAME_TISSUE_MM / spacing)), FRAME_AIR_PX


def _segment(hu: Tensor, spacing: float | None, cropped: bool) -> Tensor:
    """The shared torch segmentation; a cropped image is framed, segmented, cut back."""
    from ctdx.model_train.method.segmentation_torch import segment_lungs_torch

    if not cropped:
        return segment_lungs_torch(hu, spacing_mm=spacing)
    tissue, air = frame_widths(spacing)
    framed = F.pad(hu, (tissue, tissue, tissue, tissue), value=FRAME_TISSUE_HU)
    framed = F.pad(framed, (air, air, air, air), value=-1000.0)
    w = tissue + air
    return segment_lungs_torch(framed, spacing_mm=spacing)[:, w:-w, w:-w].contiguous()


def prepare_slices(
    slices: Sequence[LoadedSlice], params: PreprocessParams
) -> list[tuple[NDArray[np.uint8], float]]:
    """Shared segmentation + preprocessing steps 1-5 -> (uint8 grey, lung share) per slice.

    Slices of one size and spacing go through
    :func:`~model_train.method.segmentation_torch.segment_lungs_torch` together,
    as the worker segments a series (slice-independent, so batching changes
    nothing). Images cropped inside the body (MedSeg: no air around the chest,
    the lungs touch the image border, so the chest step's flood fill from the
    border would remove them) are framed by 6 mm of soft tissue (40 HU) and 4
    pixels of air for the segmentation only; the mask is cut back to the image,
    and preprocessing sees the original pixels.
    """
    from ctdx.model_train.method.preprocess import gray_to_uint8, normalise_batch

    out: list[tuple[NDArray[np.uint8], float] | None] = [None] * len(slices)
    groups: dict[tuple[tuple[int, ...], float | None, bool], list[int]] = {}
    for i, s in enumerate(slices):
        groups.setdefault((s.hu.shape, s.spacing_mm, s.cropped), []).append(i)
    for (_, spacing, cropped), idx in groups.items():
        hu = torch.from_numpy(np.stack([slices[i].hu for i in idx]))
        lung = _segment(hu, spacing, cropped)
        stored = gray_to_uint8(normalise_batch(hu, lung, params), params)[:, 0].numpy()
        fractions = lung.float().mean(dim=(1, 2)).tolist()
        for k, i in enumerate(idx):
            out[i] = (stored[k], float(fractions[k]))
    return [o for o in out if o is not None]


def _write_entry(path: Path, gray: NDArray[np.uint8], lung_fraction: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, gray=gray, lung_fraction=np.float32(lung_fraction))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compute_chunk(
    items: Sequence[tuple[str, SliceSource]], root: str, params: dict[str, Any]
) -> list[tuple[str, str | None]]:
    """Worker process: preprocess and write each slice; return (key, error or None)."""
    p = PreprocessParams.from_dict(params)
    out: list[tuple[str, str | None]] = []
    loaded: list[tuple[str, LoadedSlice]] = []
    for key, source in items:
        try:
            loaded.append((key, load_slice(source)))
        except SourceError as exc:
            out.append((key, str(exc)))
    try:
        prepared = prepare_slices([s for _, s in loaded], p)
    except ValueError as exc:  # the method's input checks: report, do not kill the pool
        return out + [(key, f"preprocessing failed: {exc}") for key, _ in loaded]
    for (key, _), (gray, fraction) in zip(loaded, prepared, strict=True):
        _write_entry(entry_path(Path(root), key), gray, fraction)
        out.append((key, None))
    return out


def _init_process() -> None:
    import torch

    torch.set_num_threads(1)


def _chunks(
    items: Sequence[tuple[str, SliceSource]], n: int
) -> Iterator[list[tuple[str, SliceSource]]]:
    for i in range(0, len(items), n):
        yield list(items[i : i + n])


def build_cache(
    sources: Sequence[SliceSource],
    cache_dir: Path,
    params: PreprocessParams,
    workers: int = 2,
    progress: bool = False,
) -> CacheReport:
    """Preprocess every source slice not yet cached; safe to interrupt and run again."""
    root = cache_root(cache_dir, params)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.json").write_text(
        json.dumps({"method_version": METHOD_VERSION, "preprocess": params.to_dict()}, indent=1)
    )
    keyed = [(slice_key(s), s) for s in sources]
    todo = [(k, s) for k, s in keyed if not entry_path(root, k).is_file()]
    todo = list({k: (k, s) for k, s in todo}.values())  # one computation per distinct key
    reused = len(keyed) - len(todo)
    failures: list[tuple[str, str]] = []
    by_key = dict(todo)
    logger.info("cache %s: %d slices, %d to compute", root, len(keyed), len(todo))
    bar = ProgressBar(len(todo), "preprocessing slices") if progress and todo else None
    try:
        if workers <= 1 or len(todo) <= POOL_MIN_SLICES:
            for chunk in _chunks(todo, CHUNK):
                for key, err in _compute_chunk(chunk, str(root), params.to_dict()):
                    if err:
                        failures.append((str(by_key[key].path), err))
                if bar:
                    bar.advance(len(chunk))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_process) as pool:
                futures = {
                    pool.submit(_compute_chunk, chunk, str(root), params.to_dict()): len(chunk)
                    for chunk in _chunks(todo, CHUNK)
                }
                for fut in as_completed(futures):
                    for key, err in fut.result():
                        if err:
                            failures.append((str(by_key[key].path), err))
                    if bar:
                        bar.advance(futures[fut])
    finally:
        if bar:
            bar.close()
    for path, reason in failures[:5]:
        logger.warning("could not preprocess %s: %s", path, reason)
    if len(failures) > 5:
        logger.warning("... and %d more slices could not be preprocessed", len(failures) - 5)
    return CacheReport(len(keyed), len(todo) - len(failures), reused, tuple(failures))


def load_cached(sources: Sequence[SliceSource], cache_dir: Path,
                params: PreprocessParams) -> CachedSlices:
    """The cached slices of ``sources`` in order; absent entries are marked, not raised.

    Raises :class:`CacheError` when nothing at all is cached (``build_cache`` not run).
    """
    root = cache_root(cache_dir, params)
    n, s = len(sources), params.size
    gray = np.zeros((n, s, s), dtype=np.uint8)
    fraction = np.zeros(n, dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    for i, source in enumerate(sources):
        path = entry_path(root, slice_key(source))
        if not path.is_file():
            continue
        try:
            with np.load(path) as entry:
                gray[i] = entry["gray"]
                fraction[i] = float(entry["lung_fraction"])
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("unreadable cache entry %s (%s): treated as missing", path.name, exc)
            continue
        present[i] = True
    if n and not present.any():
        raise CacheError(f"none of {n} slices is cached under {root}: run `ctdx train cache` first")
    return CachedSlices(gray, fraction, present)
