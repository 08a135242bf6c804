"""The lung segmentation the worker runs, chosen by ``CTDX_SEGMENTATION_BACKEND``.

Its own module so that the pipeline (which uses a segmenter) and the runtime (which builds
one when the models load) both import it and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: ``(N, H, W)`` float32 HU and the pixel spacing (mm) -> ``(N, H, W)`` bool lung masks.
Segmenter = Callable[[torch.Tensor, float | None], torch.Tensor]


def segmenter(backend: str, device: torch.device) -> Segmenter:
    """The lung segmentation of ``backend``; masks come back on ``device``."""
    if backend == "skimage":
        from ctdx.model_train.method.segmentation import segment_lungs

        def reference(hu: torch.Tensor, spacing_mm: float | None) -> torch.Tensor:
            masks = [segment_lungs(s, spacing_mm=spacing_mm) for s in hu.cpu().numpy()]
            return torch.from_numpy(np.stack(masks)).to(device)

        return reference
    from ctdx.model_train.method.segmentation_torch import segment_lungs_torch

    def batched(hu: torch.Tensor, spacing_mm: float | None) -> torch.Tensor:
        with torch.inference_mode():
            masks: torch.Tensor = segment_lungs_torch(hu.to(device), spacing_mm=spacing_mm)
        return masks

    return batched
