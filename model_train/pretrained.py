"""ImageNet weights for the pretrained (P-) networks, made available before any work starts.

A P- network is built from torchvision's ImageNet weights: a local file given with
``--pretrained ARCH=FILE`` (``[pretrained]`` in the config), or torchvision's download
into its cache (``$TORCH_HOME/hub/checkpoints``). :func:`ensure_pretrained` runs before
a command caches, splits or trains anything: weights that are neither given nor cached
are downloaded then, and a machine without internet gets one message that names the
file, where to get it and how to pass it, instead of a traceback after work has started.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from ctdx.model_train.config import Config, NetworkSpec
from ctdx.model_train.method.networks import IMAGENET_WEIGHTS, Arch, PretrainedWeightsError

logger = logging.getLogger(__name__)


def needed_archs(config: Config, specs: Iterable[NetworkSpec] | None = None) -> list[Arch]:
    """Architectures of the P- networks (of ``specs``, default: every enabled task's) that
    have no local weights file in ``config``."""
    if specs is None:
        specs = [spec for task in ("recognition", "manifestation")
                 if config.task(task).enabled for spec in config.task(task).network_specs()]
    archs: list[Arch] = []
    for spec in specs:
        if spec.pretrained and config.pretrained.for_arch(spec.arch) is None:
            if spec.arch not in archs:
                archs.append(spec.arch)
    return archs


def weights_url(arch: Arch) -> str:
    return str(IMAGENET_WEIGHTS[arch].url)


def cached_weights(arch: Arch) -> Path:
    """Where torchvision keeps (or would keep) the downloaded ImageNet weights of ``arch``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / weights_url(arch).rsplit("/", 1)[-1]


def ensure_pretrained(config: Config, specs: Iterable[NetworkSpec] | None = None) -> None:
    """Download the ImageNet weights the P- networks need (unless given or cached); raise
    :class:`PretrainedWeightsError` naming the files and the ``--pretrained`` options when a
    download fails."""
    failed: list[tuple[Arch, Path]] = []
    reason = ""
    for arch in needed_archs(config, specs):
        target = cached_weights(arch)
        if target.is_file():
            continue
        logger.info("downloading torchvision's ImageNet weights for %s to %s", arch, target)
        try:
            IMAGENET_WEIGHTS[arch].get_state_dict(progress=sys.stderr.isatty())
        except Exception as exc:  # urllib, socket, SSL and HTTP errors have unrelated types
            failed.append((arch, target))
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
    if not failed:
        return
    names = " and ".join(P_NAMES[arch] for arch, _ in failed)
    files = "; ".join(f"{target.name} from {weights_url(arch)}" for arch, target in failed)
    options = " ".join(f"--pretrained {arch}=PATH/{target.name}" for arch, target in failed)
    raise PretrainedWeightsError(
        f"{names} need torchvision's ImageNet weights, which are neither given nor cached here "
        f"and could not be downloaded ({reason}): {files}. Download them on a machine with "
        f"internet, copy them here and pass {options} (or put them in {failed[0][1].parent}/); "
        "or train only unpretrained (UP-) networks, e.g. the packaged 'smoke' config. "
        "Nothing was started."
    )


P_NAMES: dict[str, str] = {"resnet18": "P-ResNet18", "resnet50": "P-ResNet50"}


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc).strip()
    return text.splitlines()[0][:200] if text else "no detail"
