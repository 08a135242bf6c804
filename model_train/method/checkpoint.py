"""The one checkpoint format that ``model_train`` exports and the worker loads.

A checkpoint is a plain ``dict`` written by ``torch.save`` and read with
``torch.load(weights_only=True)``: tensors and plain types only, so loading a
file can never run code. Fields and rules are documented in
``docs/checkpoint-format.md``. Loading refuses, with a message that says what
to do, any file whose metadata does not match this code: a model is served only
with the classes, preprocessing and method it was trained with.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import torch
from pydicom.uid import generate_uid
from torch import nn

from ctdx.model_train.method.classes import METHOD_VERSION, TASKS, Task, classes_for
from ctdx.model_train.method.networks import ARCHS, Arch, build_resnet
from ctdx.model_train.method.preprocess import PreprocessParams, PreprocessParamsError
from ctdx.model_train.method.quantize import Int8Report, QuantizationError

logger = logging.getLogger(__name__)

FORMAT_NAME: Final = "ctdx-checkpoint"
FORMAT_VERSION: Final = 1
_UID_RE: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_META_KEYS: Final = (
    "task", "arch", "class_names", "preprocess", "model_name", "model_version", "model_uid",
    "method_version", "training_data", "created_at",
)


class CheckpointError(Exception):
    """A checkpoint that cannot be written or served; the message says why and what to do."""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_plain(value: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` accepts and JSON can show."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    raise CheckpointError(f"{where} holds a {type(value).__name__}; only plain types are allowed")


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything about a model except its weights; valid once constructed.

    ``model_uid`` is a DICOM UID identifying this trained model: the SR uses it as
    the algorithm/device UID, so it must change whenever the weights change
    (:meth:`new` generates one).
    """

    task: Task
    arch: Arch
    class_names: tuple[str, ...]
    preprocess: PreprocessParams
    model_name: str
    model_version: str
    model_uid: str
    method_version: str = METHOD_VERSION
    training_data: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_now_iso)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CheckpointError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.arch not in ARCHS:
            raise CheckpointError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if not self.class_names or not all(isinstance(c, str) for c in self.class_names):
            raise CheckpointError(
                f"class_names must be non-empty strings, got {self.class_names!r}"
            )
        if not self.model_name.strip() or not self.model_version.strip():
            raise CheckpointError("model_name and model_version must not be empty")
        if len(self.model_uid) > 64 or not _UID_RE.match(self.model_uid):
            raise CheckpointError(f"model_uid is not a valid DICOM UID: {self.model_uid!r}")
        _check_plain(dict(self.training_data), "training_data")

    @classmethod
    def new(
        cls,
        task: Task,
        arch: Arch,
        model_name: str,
        model_version: str,
        training_data: Mapping[str, Any] | None = None,
        preprocess: PreprocessParams | None = None,
    ) -> CheckpointMeta:
        """Metadata for a freshly trained model: the task's classes, a new model UID, now."""
        return cls(
            task=task,
            arch=arch,
            class_names=classes_for(task),
            preprocess=preprocess or PreprocessParams(),
            model_name=model_name,
            model_version=model_version,
            model_uid=str(generate_uid(prefix=None)),
            training_data=dict(training_data or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "arch": self.arch,
            "class_names": list(self.class_names),
            "preprocess": self.preprocess.to_dict(),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_uid": self.model_uid,
            "method_version": self.method_version,
            "training_data": dict(self.training_data),
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Int8Weights:
    """Optional int8 weights of a checkpoint (``ctdx.model_train.method.quantize``)."""

    state_dict: Mapping[str, Any]
    report: Int8Report


@dataclass(frozen=True)
class OnnxInt8:
    """Optional ONNX Runtime int8 model of a checkpoint (``ctdx.model_train.method.onnx_runtime``):
    the serialised ONNX graph and how it was calibrated and checked."""

    model: bytes
    report: Int8Report


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode on its device, and the metadata it was saved with."""

    model: nn.Module
    meta: CheckpointMeta
    int8: Int8Weights | None = None
    onnx_int8: OnnxInt8 | None = None


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta,
                    int8: Int8Weights | None = None, onnx_int8: OnnxInt8 | None = None) -> None:
    """Write ``model``'s weights (as float32, on CPU) with ``meta`` to ``path`` atomically.

    Refuses a model whose weights do not fit ``meta.arch`` with
    ``len(meta.class_names)`` outputs, so a written checkpoint always loads.
    ``int8``, when given, is stored beside them (key ``int8``: its state and report), and
    ``onnx_int8`` likewise (key ``onnx_int8``: the ONNX bytes as a uint8 tensor and its report).
    """
    state = {
        k: (v.detach().to("cpu").float() if v.is_floating_point() else v.detach().to("cpu"))
        .contiguous()
        for k, v in model.state_dict().items()
    }
    with torch.device("meta"):
        reference = build_resnet(meta.arch, num_classes=len(meta.class_names))
    _check_state_shapes(state, reference.state_dict(), meta)
    payload: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    payload.update(meta.to_dict())
    payload["state_dict"] = state
    if int8 is not None:
        # the state_dict object itself: its _metadata holds the quantised modules' versions
        payload["int8"] = {"state_dict": int8.state_dict, "report": int8.report.to_dict()}
    if onnx_int8 is not None:
        payload["onnx_int8"] = {
            "model": torch.frombuffer(bytearray(onnx_int8.model), dtype=torch.uint8),
            "report": onnx_int8.report.to_dict(),
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info(
        "saved %s checkpoint %s %s (uid %s) to %s",
        meta.task, meta.model_name, meta.model_version, meta.model_uid, path,
    )


def _check_state_shapes(
    state: Mapping[str, Any], expected: Mapping[str, Any], meta: CheckpointMeta
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor)
        or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights do not match {meta.arch} with {len(meta.class_names)} outputs: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, wrong shape {_few(wrong)}"
        )


def _few(keys: list[str], n: int = 4) -> str:
    return "[]" if not keys else f"[{', '.join(keys[:n])}{', ...' if len(keys) > n else ''}]"


def _file_damage(path: Path) -> str | None:
    """Why ``path`` cannot be a file written by ``torch.save`` (a zip archive), or None.

    Checked before ``torch.load`` so that an empty, truncated or corrupted copy is named as
    such (zip directory and per-member CRC-32), not with torch's internal messages.
    """
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes); copy or export it again"
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":
        return ("it is a pickle in torch's legacy format, not the zip archive torch.save "
                "writes today; export the model with `ctdx train export`")
    if head != b"PK\x03\x04":
        return (f"it is not a zip archive as written by torch.save (it starts with {head!r}); "
                "a ctdx checkpoint is a file written by `ctdx train export`")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        return (f"it is truncated or damaged ({size} bytes; its zip directory cannot be read: "
                f"{exc}); copy or export it again")
    if bad is not None:
        return (f"it is damaged: its member {bad!r} fails its CRC-32 check; copy or export "
                "it again")
    return None


def _read_payload(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    damage = _file_damage(path)
    if damage is not None:
        raise CheckpointError(f"{path} is not a ctdx checkpoint: {damage}")
    try:
        with warnings.catch_warnings():  # int8 entries: torch's own deprecation notices
            warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            warnings.filterwarnings("ignore", message=r".*pickle protocol.*")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text advises weights_only=False (which runs the file's code): not shown
        raise CheckpointError(
            f"{path} is not a ctdx checkpoint: it holds Python objects besides tensors and plain "
            "values (a whole pickled model, or a training checkpoint), and ctdx never loads "
            "those because loading them runs code; write the worker's file with "
            "`ctdx train export`"
        ) from exc
    except Exception as exc:  # zip, pickle and weights-only errors have unrelated types
        raise CheckpointError(
            f"{path} is not a ctdx checkpoint: torch.load cannot read its contents "
            f"({type(exc).__name__}); the file is damaged or of another kind"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not a ctdx checkpoint (no format '{FORMAT_NAME}'); a training "
            "checkpoint must be exported with `ctdx train export`"
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this code reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [k for k in (*_META_KEYS, "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a complete ctdx checkpoint: missing {missing}")
    return payload


def _meta_from_payload(payload: Mapping[str, Any], path: Path) -> CheckpointMeta:
    try:
        preprocess = PreprocessParams.from_dict(payload["preprocess"])
    except (PreprocessParamsError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: its preprocessing parameters cannot be applied by this code ({exc}); "
            "re-export the model with this version of ctdx"
        ) from exc
    return CheckpointMeta(
        task=payload["task"],
        arch=payload["arch"],
        class_names=tuple(payload["class_names"]),
        preprocess=preprocess,
        model_name=str(payload["model_name"]),
        model_version=str(payload["model_version"]),
        model_uid=str(payload["model_uid"]),
        method_version=str(payload["method_version"]),
        training_data=dict(payload["training_data"]),
        created_at=str(payload["created_at"]),
    )


def read_checkpoint_meta(path: Path) -> CheckpointMeta:
    """The metadata of a checkpoint, without building the network (for listings)."""
    return _meta_from_payload(_read_payload(path), Path(path))


def load_checkpoint(path: Path, task: Task, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint for ``task`` onto ``device`` (``"auto"``: CUDA if present), in eval mode.

    ``device="meta"`` checks everything without materialising the weights on a device.

    Raises :class:`CheckpointError` for a missing or foreign file, another task,
    class names other than this code's for the task, preprocessing this code
    cannot apply, another method version, or weights that do not fit the
    architecture.
    """
    path = Path(path)
    payload = _read_payload(path)
    if payload["task"] != task:
        raise CheckpointError(
            f"{path} is a {payload['task']!r} model; a {task!r} model is needed here"
        )
    expected_classes = classes_for(task)
    if tuple(payload["class_names"]) != expected_classes:
        raise CheckpointError(
            f"{path}: class names {list(payload['class_names'])} do not match this code's "
            f"{task} classes {list(expected_classes)} (order matters)"
        )
    if payload["method_version"] != METHOD_VERSION:
        raise CheckpointError(
            f"{path} was trained with method version {payload['method_version']!r} "
            f"(segmentation/preprocessing); this code is method version {METHOD_VERSION!r}: "
            "retrain or use a matching ctdx version"
        )
    meta = _meta_from_payload(payload, path)
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict is not a dict")
    with torch.device("meta"):
        model = build_resnet(meta.arch, num_classes=len(meta.class_names))
    _check_state_shapes(state, model.state_dict(), meta)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta.arch}: {exc}") from exc
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    int8 = _int8_from_payload(payload, path)
    onnx_int8 = _onnx_int8_from_payload(payload, path)
    logger.info(
        "loaded %s model %s %s (uid %s, %s) on %s",
        meta.task, meta.model_name, meta.model_version, meta.model_uid, meta.arch, device,
    )
    return LoadedModel(model=model, meta=meta, int8=int8, onnx_int8=onnx_int8)


def _int8_from_payload(payload: Mapping[str, Any], path: Path) -> Int8Weights | None:
    raw = payload.get("int8")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise CheckpointError(f"{path}: its int8 entry is malformed (no state_dict)")
    try:
        report = Int8Report.from_dict(raw.get("report") or {})
    except QuantizationError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return Int8Weights(state_dict=raw["state_dict"], report=report)


def _onnx_int8_from_payload(payload: Mapping[str, Any], path: Path) -> OnnxInt8 | None:
    raw = payload.get("onnx_int8")
    if raw is None:
        return None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, torch.Tensor) or model.dtype != torch.uint8 or model.ndim != 1:
        raise CheckpointError(f"{path}: its onnx_int8 entry is malformed (no uint8 model)")
    try:
        report = Int8Report.from_dict(raw.get("report") or {})
    except QuantizationError as exc:
        raise CheckpointError(f"{path}: onnx_int8: {exc}") from exc
    return OnnxInt8(model=model.numpy().tobytes(), report=report)
