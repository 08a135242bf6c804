"""int8 weights for an exported model, from its own slice sets (``ctdx train export --int8``).

Calibration uses a random sample of the training slices; the check against fp32
uses held-out slices (for a run: its validation and test sets). Both go through
the same preprocessing as training and serving (``gray_from_uint8`` then
``to_network_input``). The method itself is in ``ctdx.model_train.method.quantize``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ctdx.model_train.data import SliceSet
from ctdx.model_train.method.checkpoint import Int8Weights, OnnxInt8
from ctdx.model_train.method.preprocess import PreprocessParams, gray_from_uint8, to_network_input
from ctdx.model_train.method.quantize import make_int8

logger = logging.getLogger(__name__)

#: Slices the observers see; more changes the activation ranges little (histogram observers).
DEFAULT_CALIBRATION_SLICES = 256
DEFAULT_MIN_AGREEMENT = 0.99


def _batches(gray: Tensor, params: PreprocessParams, batch_size: int = 32) -> Iterator[Tensor]:
    for i in range(0, int(gray.shape[0]), batch_size):
        x = to_network_input(gray_from_uint8(gray[i : i + batch_size], params), params)
        yield x.contiguous(memory_format=torch.channels_last)


def _samples(params: PreprocessParams, calibration: SliceSet, evaluation: SliceSet,
             calibration_source: str, calibration_slices: int, seed: int,
             ) -> tuple[Iterator[Tensor], Iterator[Tensor], str]:
    """What both int8 runtimes are made from and checked on: batches of up to
    ``calibration_slices`` random slices of ``calibration`` (the same for a given ``seed``),
    batches of all of ``evaluation``, and the calibration's description."""
    n = len(calibration)
    pick = np.arange(n)
    if n > calibration_slices:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=calibration_slices,
                                                          replace=False))
    return (_batches(calibration.gray[torch.from_numpy(pick)], params),
            _batches(evaluation.gray, params),
            f"{calibration_source} ({len(pick)} random slices)")


def int8_weights(
    model: nn.Module,
    params: PreprocessParams,
    calibration: SliceSet,
    evaluation: SliceSet,
    calibration_source: str,
    evaluation_source: str,
    calibration_slices: int = DEFAULT_CALIBRATION_SLICES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    seed: int = 0,
) -> Int8Weights:
    """Calibrate ``model`` on up to ``calibration_slices`` random slices of ``calibration`` and
    check it on all of ``evaluation``; raises ``QuantizationError`` below ``min_agreement``."""
    calibrate, check, source = _samples(params, calibration, evaluation, calibration_source,
                                        calibration_slices, seed)
    state, report = make_int8(
        model.to("cpu").eval(), calibrate, check,
        size=params.size,
        channels=params.channels,
        calibration_source=source,
        evaluation_source=evaluation_source,
        min_agreement=min_agreement,
    )
    logger.info("int8 weights: %s; largest probability difference %.3f",
                report.summary(), report.max_probability_difference)
    return Int8Weights(state_dict=state, report=report)


def onnx_int8_weights(
    model: nn.Module,
    params: PreprocessParams,
    calibration: SliceSet,
    evaluation: SliceSet,
    calibration_source: str,
    evaluation_source: str,
    calibration_slices: int = DEFAULT_CALIBRATION_SLICES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    seed: int = 0,
) -> OnnxInt8:
    """The ONNX Runtime int8 model of ``model``: the same calibration sample, preprocessing
    and agreement gate as :func:`int8_weights` (needs ``pip install 'ctdx[onnx]'``)."""
    from ctdx.model_train.method.onnx_runtime import make_onnx_int8

    calibrate, check, source = _samples(params, calibration, evaluation, calibration_source,
                                        calibration_slices, seed)
    return make_onnx_int8(
        model.to("cpu").eval(), calibrate, check,
        size=params.size,
        channels=params.channels,
        calibration_source=source,
        evaluation_source=evaluation_source,
        min_agreement=min_agreement,
    )
