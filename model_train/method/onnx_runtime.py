"""int8 through ONNX Runtime: a second CPU runtime beside PyTorch's ``x86`` int8 engine.

PyTorch's int8 kernels (FBGEMM / oneDNN) are fast with AVX-512 VNNI and gain
little without it (issue 19: ResNet50 12.6 ms/slice with VNNI, 51.6 ms on an
AVX2-only EPYC, where fp32 took 73 ms). ONNX Runtime's MLAS kernels have their
own u8s8 paths for AVX2, AVX-512 and VNNI; which runtime is faster depends on
the host, so the worker times both where the checkpoint has both and keeps the
faster (``CTDX_PRECISION=auto``, ``ctdx.model_train.method.inference``).

How the ONNX int8 model is made (at export, beside the torch int8 weights):

1. the fp32 network is exported to ONNX (opset 17, dynamic batch), shapes are
   inferred and the graph optimised (``quant_pre_process``);
2. static QDQ quantisation, uint8 activations and per-channel int8 weights
   (u8s8, MinMax calibration) on the *same* preprocessed calibration slices as
   the torch int8 weights (``ctdx.model_train.int8``);
3. the same gate: :func:`ctdx.model_train.method.quantize.checked_report` runs fp32
   and the ONNX Runtime session on the same held-out slices; below the minimum
   argmax agreement the model is refused (:class:`QuantizationError`).

The serialised model travels in the checkpoint (key ``onnx_int8``: the ONNX
bytes as a uint8 tensor, and the same kind of report as ``int8``), so serving
never calibrates and every worker runs the model that was checked.

``onnxruntime`` (and ``onnx``, for the export) are optional: ``pip install
ctdx[onnx]``. Without them a checkpoint's ``onnx_int8`` entry is simply not
used.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ctdx.model_train.method.checkpoint import OnnxInt8
from ctdx.model_train.method.quantize import QuantizationError, checked_report

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

logger = logging.getLogger(__name__)

#: ONNX opset of the export (ResNets need nothing newer; every supported ORT reads it).
OPSET = 17
INPUT_NAME = "x"
#: Slices per calibration batch (bounds the calibrating session's memory).
_CALIBRATION_BATCH = 4


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` can serve (``onnx`` is needed only to make the model)."""
    return _installed("onnxruntime")


def onnx_int8_available() -> bool:
    """True when ONNX Runtime int8 models can be made here (``onnx`` and ``onnxruntime``)."""
    return _installed("onnx") and _installed("onnxruntime")


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def backend_name() -> str:
    """What the report's ``backend`` says for models made here."""
    return f"onnxruntime {onnxruntime_version()} QDQ u8s8"


def _require(*modules: str) -> None:
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise QuantizationError(
            f"ONNX Runtime int8 needs {' and '.join(missing)}: pip install 'ctdx[onnx]'"
        )


def export_onnx(model: nn.Module, path: Path, size: int, channels: int = 3) -> None:
    """Write ``model`` (fp32, CPU, eval) as ONNX with a dynamic batch dimension."""
    import warnings

    _require("onnx")
    example = torch.zeros((1, channels, size, size))
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.to("cpu").float().eval(), (example,), str(path), dynamo=False,
            input_names=[INPUT_NAME], output_names=["logits"], opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "n"}, "logits": {0: "n"}},
        )


def quantize_onnx(fp32: Path, out: Path, calibration: Iterable[Tensor]) -> int:
    """Static QDQ u8s8 quantisation of ``fp32`` into ``out``; returns the calibration slices."""
    _require("onnx", "onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # small batches: the calibrating session's arena grows with the batch's activations
    # (ResNet50 at 224 px: about 100 MB per slice), and keeps what it grew to
    batches = [c.to("cpu", dtype=torch.float32).contiguous().numpy()
               for b in calibration for c in torch.split(b, _CALIBRATION_BATCH)]
    seen = sum(int(b.shape[0]) for b in batches)
    if seen == 0:
        raise QuantizationError("no calibration slices: int8 needs the model's own training data")

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it: Iterator[Any] = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared), str(out), _Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return seen


def session(model: bytes, threads: int | None = None) -> InferenceSession:
    """A CPU session of a serialised ONNX model, with ``threads`` intra-op threads (default:
    torch's, so the worker's ``CTDX_TORCH_THREADS`` holds for both runtimes)."""
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    # no spinning after a run: the worker's next torch stage needs those cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session behind ``nn.Module``'s call: logits for an ``(N, C, S, S)``
    float batch, so serving and :func:`~ctdx.model_train.method.quantize.compare` treat it
    like the torch networks."""

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        super().__init__()
        self.session = session(model, threads)

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", dtype=torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {INPUT_NAME: array})
        return torch.from_numpy(logits)


def make_onnx_int8(model: nn.Module, calibration: Iterable[Tensor],
                   evaluation: Iterable[Tensor], size: int, channels: int,
                   calibration_source: str, evaluation_source: str,
                   min_agreement: float) -> OnnxInt8:
    """Export, quantise and check ``model`` as the torch int8 path does (``make_int8``).

    Raises :class:`QuantizationError` when the argmax agreement with fp32 on ``evaluation``
    is below ``min_agreement``, or when ``onnx`` / ``onnxruntime`` are missing.
    """
    _require("onnx", "onnxruntime")
    model = model.to("cpu").float().eval()
    with tempfile.TemporaryDirectory(prefix="ctdx-onnx-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32, size, channels)
        calibrated = quantize_onnx(fp32, int8, calibration)
        data = int8.read_bytes()
    report = checked_report(
        model, OrtModule(data, threads=torch.get_num_threads()), evaluation,
        backend=backend_name(), calibration_slices=calibrated,
        calibration_source=calibration_source, evaluation_source=evaluation_source,
        min_agreement=min_agreement, refused="ONNX Runtime int8 calls",
    )
    logger.info("ONNX Runtime int8: %s; largest probability difference %.3f",
                report.summary(), report.max_probability_difference)
    return OnnxInt8(model=data, report=report)
