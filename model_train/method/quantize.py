"""int8 weights for CPU workers: calibrated once, checked, shipped in the checkpoint.

On the 2-core dev VM (AMD EPYC, AVX-512 with VNNI and BF16) ResNet50 takes 66 ms
per 224 px slice in fp32 + channels-last and 30 ms in bf16; post-training static
int8 quantisation with PyTorch's ``x86`` backend (fbgemm/oneDNN int8 kernels)
takes 12.3 ms, and ResNet18 4.6 ms: what lets a 300-slice study fit the 12 s
budget on two cores (``benchmarks/results/worker.md``). On CPUs without native
bf16 (AVX2 only) bf16 is emulated and slower than fp32, which makes int8 the
only faster option there too.

How the int8 model is made (``ctdx train export --int8``, and the demo models):

1. FX graph-mode quantisation (``prepare_fx`` / ``convert_fx``) with the
   ``x86`` default qconfig mapping: per-channel symmetric int8 weights,
   per-tensor affine uint8 activations with histogram observers; batch norm is
   folded into the convolutions, ReLUs are fused.
2. Calibration: the observers see preprocessed slices of the model's own
   training set (the same ``preprocess_batch`` as serving), so activation
   ranges are those of real inputs.
3. Check: fp32 and int8 are run on held-out slices (the run's validation and
   test sets); the share of slices with the same predicted class and the largest
   difference of any class probability are recorded in the checkpoint. Export
   refuses the int8 weights when the agreement is below the minimum asked
   (default 0.99): an int8 model is served only with evidence that it calls
   slices as its fp32 original does.

The checkpoint carries the converted model's ``state_dict`` (quantised tensors
and their scales, loadable with ``torch.load(weights_only=True)``); the worker
rebuilds the same graph from the architecture (:func:`int8_skeleton`) and loads
it, so no calibration runs at start-up and every worker serves identical int8
weights. The model UID stays the trained model's: the int8 weights are derived
from it, and the precision used is reported with every analysis.

FX graph-mode quantisation is deprecated upstream in favour of torchao's PT2E
flow, which on the CPU reaches int8 kernels only through ``torch.compile``; the
FX flow still ships in the pinned torch 2.14.1 and is what runs here. The
upstream deprecation warnings are silenced only around these calls.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final

import torch
from torch import Tensor, nn

from ctdx.model_train.method.networks import Arch, build_resnet

#: PyTorch's quantised engine and default qconfig mapping used for every int8 model.
BACKEND: Final = "x86"


class QuantizationError(RuntimeError):
    """int8 weights that cannot be made or served; the message says why."""


@dataclass(frozen=True)
class Int8Report:
    """How the int8 weights were calibrated and how closely they follow fp32."""

    backend: str
    calibration_slices: int
    calibration_source: str
    evaluation_slices: int
    evaluation_source: str
    argmax_agreement: float  # share of held-out slices with the same predicted class
    max_probability_difference: float  # over held-out slices and classes
    torch_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Int8Report:
        try:
            return cls(
                backend=str(raw["backend"]),
                calibration_slices=int(raw["calibration_slices"]),
                calibration_source=str(raw["calibration_source"]),
                evaluation_slices=int(raw["evaluation_slices"]),
                evaluation_source=str(raw["evaluation_source"]),
                argmax_agreement=float(raw["argmax_agreement"]),
                max_probability_difference=float(raw["max_probability_difference"]),
                torch_version=str(raw["torch_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizationError(f"int8 report is incomplete or malformed: {exc}") from exc

    def summary(self) -> str:
        """One line for logs and the results' device description."""
        return (f"int8 ({self.backend}, {self.argmax_agreement:.3f} agreement with fp32 on "
                f"{self.evaluation_slices} held-out slices)")


def int8_supported() -> bool:
    """True when this torch build has the ``x86`` quantised engine."""
    return BACKEND in torch.backends.quantized.supported_engines


@contextmanager
def _quiet_fx() -> Iterator[None]:
    """Silence torch.ao's FX deprecation and observer warnings (see the module doc)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before.*")
        yield


def _prepare(model: nn.Module, size: int, channels: int, private: bool = False) -> nn.Module:
    """``model`` with observers; a deep copy unless the caller hands over a ``private`` one."""
    if not int8_supported():
        raise QuantizationError(
            f"this torch build has no {BACKEND!r} quantised engine "
            f"(engines: {torch.backends.quantized.supported_engines})"
        )
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = BACKEND
    example = torch.zeros((1, channels, size, size))
    float_model = (model if private else copy.deepcopy(model)).to("cpu").float().eval()
    with _quiet_fx():
        prepared: nn.Module = prepare_fx(
            float_model, get_default_qconfig_mapping(BACKEND), example_inputs=(example,)
        )
    return prepared


def _convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet_fx():
        converted: nn.Module = convert_fx(prepared)  # type: ignore[arg-type]
    return converted.eval()


def quantize_int8(model: nn.Module, calibration: Iterable[Tensor], size: int,
                  channels: int = 3) -> nn.Module:
    """An int8 copy of ``model`` calibrated on preprocessed ``(N, C, S, S)`` batches."""
    prepared = _prepare(model, size, channels)
    seen = 0
    with torch.inference_mode(), _quiet_fx():
        for batch in calibration:
            prepared(batch.to("cpu", dtype=torch.float32))
            seen += int(batch.shape[0])
    if seen == 0:
        raise QuantizationError("no calibration slices: int8 needs the model's own training data")
    return _convert(prepared)


def int8_skeleton(arch: Arch, num_classes: int, size: int, channels: int = 3) -> nn.Module:
    """The converted int8 graph of ``arch`` with placeholder parameters, to load a state into."""
    fresh = build_resnet(arch, num_classes=num_classes)
    return _convert(_prepare(fresh, size, channels, private=True))


def load_int8(arch: Arch, num_classes: int, size: int, channels: int,
              state: Mapping[str, Any]) -> nn.Module:
    """The int8 model of a checkpoint; raises :class:`QuantizationError` if the state does not
    fit the graph this code builds (another torch version or qconfig)."""
    model = int8_skeleton(arch, num_classes, size, channels)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise QuantizationError(
            f"int8 weights do not fit this code's {arch} int8 graph ({exc}); re-export with "
            "`ctdx train export --int8` on this version of ctdx, or serve with precision fp32"
        ) from exc
    return model.eval()


def checked_report(fp32: nn.Module, int8: nn.Module, evaluation: Iterable[Tensor], *,
                   backend: str, calibration_slices: int, calibration_source: str,
                   evaluation_source: str, min_agreement: float, refused: str,
                   advice: str = "") -> Int8Report:
    """The agreement gate every int8 runtime goes through: :func:`compare` on ``evaluation``,
    the report, or :class:`QuantizationError` (``refused`` + the figures + ``advice``) below
    ``min_agreement``."""
    n_eval, agreement, worst = compare(fp32, int8, evaluation)
    report = Int8Report(
        backend=backend,
        calibration_slices=calibration_slices,
        calibration_source=calibration_source,
        evaluation_slices=n_eval,
        evaluation_source=evaluation_source,
        argmax_agreement=round(agreement, 6),
        max_probability_difference=round(worst, 6),
        torch_version=str(torch.__version__),
    )
    if agreement < min_agreement:
        raise QuantizationError(
            f"{refused} {agreement:.3f} of {n_eval} held-out slices as fp32 does, below the "
            f"minimum {min_agreement:g}: not exported{advice}"
        )
    return report


def compare(fp32: nn.Module, int8: nn.Module,
            batches: Iterable[Tensor]) -> tuple[int, float, float]:
    """``(slices, argmax agreement, max probability difference)`` of ``int8`` against ``fp32``
    on the CPU."""
    fp32 = fp32.to("cpu").float().eval()
    same = 0
    total = 0
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            x = batch.to("cpu", dtype=torch.float32)
            p32 = torch.softmax(fp32(x).float(), dim=1)
            p8 = torch.softmax(int8(x).float(), dim=1)
            same += int((p32.argmax(1) == p8.argmax(1)).sum())
            total += int(x.shape[0])
            worst = max(worst, float((p32 - p8).abs().max()))
    if total == 0:
        raise QuantizationError("no held-out slices to check the int8 weights against fp32")
    return total, same / total, worst


def make_int8(model: nn.Module, calibration: Iterable[Tensor], evaluation: Iterable[Tensor],
              size: int, channels: int, calibration_source: str, evaluation_source: str,
              min_agreement: float) -> tuple[dict[str, Any], Int8Report]:
    """Calibrate, check against fp32 and return ``(state_dict, report)`` for the checkpoint.

    Raises :class:`QuantizationError` when the argmax agreement on ``evaluation`` is below
    ``min_agreement``.
    """
    calibration = list(calibration)
    int8 = quantize_int8(model, calibration, size, channels)
    report = checked_report(
        model, int8, evaluation, backend=BACKEND,
        calibration_slices=sum(int(b.shape[0]) for b in calibration),
        calibration_source=calibration_source, evaluation_source=evaluation_source,
        min_agreement=min_agreement, refused="int8 weights call",
        advice=" (serve fp32, or calibrate on more data)",
    )
    # the state_dict as returned: its ``_metadata`` (module versions) tells the quantised
    # modules how to read their packed parameters back
    return int8.state_dict(), report
