"""Batch-norm statistics that are right in eval mode (``train.bn_recalibration``).

In train mode a batch-norm layer normalises with the statistics of the batch; in
eval mode (validation, test, export, the worker) with its running averages,
which trail the weights by many batches (momentum 0.1). Trained from scratch, or
with a high learning rate, the weights move faster than the averages follow, and
eval-mode outputs can be far from train-mode ones: on the real COVID-CT-MD
subjects eval-mode accuracy on the training slices swung between 0.31 and 0.96
from one epoch to the next while train-mode accuracy stayed near 0.99, so the
"best validation epoch" was chosen almost at random.

The fix, the one of stochastic weight averaging: before every validation the
running statistics are **re-estimated** with the current weights by
``torch.optim.swa_utils.update_bn`` (reset, then an exact cumulative average
over one pass) on a fixed seeded sample of ``train.bn_slices`` training slices in
a seeded random order (batches mixing subjects and classes), preprocessed as for
evaluation (no augmentation). The weights are not touched;
the statistics saved with every checkpoint (and exported) are these.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ctdx.model_train.data import SliceSet
from ctdx.model_train.method.preprocess import PreprocessParams, gray_from_uint8, to_network_input


def sample_indices(n: int, k: int, seed: int) -> Tensor:
    """A fixed seeded sample of ``min(k, n)`` of ``n`` indices in a seeded random order.

    Shuffled, because the slices are stored subject by subject: batches of one subject
    (one class) would give within-batch variances that miss the variance between
    subjects, and eval-mode outputs too large (the running variance too small).
    """
    rng = np.random.default_rng(seed)
    pick = rng.permutation(n)[: min(k, n)]
    return torch.from_numpy(pick.astype(np.int64))


def subset(data: SliceSet, idx: Tensor) -> SliceSet:
    rows = idx.tolist()
    return SliceSet(data.gray[idx], data.labels[idx], tuple(data.subjects[i] for i in rows),
                    tuple(data.studies[i] for i in rows), tuple(data.paths[i] for i in rows))


def _batches(gray: Tensor, params: PreprocessParams, device: torch.device, batch_size: int,
             channels_last: bool) -> Iterator[Tensor]:
    # equal-sized chunks: a trailing batch of one slice cannot give batch statistics
    chunks = max(1, math.ceil(int(gray.shape[0]) / batch_size))
    for part in torch.tensor_split(gray, chunks):
        x = to_network_input(gray_from_uint8(part.to(device), params), params)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


def recalibrate_bn(model: nn.Module, gray: Tensor, params: PreprocessParams,
                   device: torch.device, batch_size: int, channels_last: bool = True) -> None:
    """Re-estimate every batch-norm layer's running statistics on ``gray`` (uint8 slices)."""
    if int(gray.shape[0]) < 2:
        return  # one slice has no batch statistics; keep the running averages
    was_training = model.training
    torch.optim.swa_utils.update_bn(
        _batches(gray, params, device, batch_size, channels_last), model)
    model.train(was_training)
