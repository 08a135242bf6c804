"""Training configuration: frozen dataclasses read from a TOML file.

``model_train/configs/paper.toml`` holds the paper's settings, ``smoke.toml`` a
tiny run for tests. Every table and key is checked: an unknown key or a value
of the wrong type is a :class:`ConfigError` naming it, so a typo never falls back
to a default silently. Relative paths are relative to the current directory
when the config is loaded (and stored absolute in a run's copy).
A run writes its effective config back as TOML (:func:`dump_toml`) next to its
results, so every number has the exact settings that produced it.
"""

from __future__ import annotations

import logging
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ctdx.model_train.manifest import SLICE_POLICIES, SlicePolicy

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"

Arch = Literal["resnet18", "resnet50"]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


@dataclass(frozen=True)
class NetworkSpec:
    """One of the paper's four networks, named as in its tables (``P-ResNet50``)."""

    arch: Arch
    pretrained: bool

    @property
    def name(self) -> str:
        return f"{'P' if self.pretrained else 'UP'}-ResNet{self.arch.removeprefix('resnet')}"

    @classmethod
    def parse(cls, name: str) -> NetworkSpec:
        prefix, sep, net = name.strip().partition("-")
        arch = "resnet" + net.lower().removeprefix("resnet")
        if not sep or prefix.upper() not in ("P", "UP") or arch not in ("resnet18", "resnet50"):
            raise ConfigError(
                f"network {name!r} is not one of UP-ResNet18, P-ResNet18, UP-ResNet50, P-ResNet50"
            )
        return cls(arch=typing.cast(Arch, arch), pretrained=prefix.upper() == "P")


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled data and the preprocessing cache are."""

    manifest: Path | None = None
    """Recognition manifest (its rows with a manifestation also feed the manifestation task)."""
    manifestation_manifest: Path | None = None
    """Separate manifest for the manifestation task (default: rows of ``manifest``)."""
    cache_dir: Path = Path("ctdx-train-cache")
    slice_policy: SlicePolicy = "lesion_only"
    """Recognition slices and labels: ``lesion_only`` (default), ``all`` (the paper's study
    labels) or ``slice_labels`` (lesion-free slices of pneumonia studies as normal);
    recorded in exported checkpoints (``ctdx.model_train.manifest.SlicePolicy``)."""
    min_lung_fraction: float = 0.02
    """Slices whose lung mask covers less of the image are left out, as the worker skips them."""
    cache_workers: int = 2


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 0
    folds: int = 5
    holdout_percent: int = 30
    file: Path | None = None
    """Split file (CSV subject,role[,fold]; ``ctdx.model_train.split_file``): replaces the ring
    construction above; validation and test sets may then be empty."""


@dataclass(frozen=True)
class TaskConfig:
    """One task of the grid: which networks on which folds, and its learning rates."""

    enabled: bool = True
    networks: tuple[str, ...] = ("UP-ResNet18", "P-ResNet18", "UP-ResNet50", "P-ResNet50")
    folds: tuple[int, ...] = ()
    """Folds to run; empty = all."""
    lr: float = 1e-4
    """Adam learning rate of every parameter, unless head_lr / backbone_lr are set."""
    head_lr: float | None = None
    backbone_lr: float | None = None

    def network_specs(self) -> tuple[NetworkSpec, ...]:
        return tuple(NetworkSpec.parse(n) for n in self.networks)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    batch_size: int = 32
    eval_batch_size: int = 128
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = True
    """channels-last memory format (faster on CUDA and, for fp32, on the CPU too)."""
    min_crop: float = 0.875
    flip_p: float = 0.5
    max_train_slices: int = 0
    """Cap on training slices per run (seeded sample; 0 = all): for smoke runs only."""
    bn_recalibration: bool = True
    """Re-estimate batch-norm running statistics on training slices (no augmentation)
    before every validation (``ctdx.model_train.bn``): eval mode then matches train mode."""
    bn_slices: int = 1024
    """Training slices (seeded sample) for the batch-norm re-estimate and for the
    per-epoch eval-mode accuracy on training slices."""
    select_window: int = 3
    """The model kept is the last epoch of the best moving average of validation
    accuracy over this many epochs (1 = the best single epoch)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Overrides of the method's ``PreprocessParams`` (the other fields keep its defaults)."""

    size: int = 224


@dataclass(frozen=True)
class EvaluationConfig:
    study_network: str = "P-ResNet50"
    """Network evaluated on studies (Table 5, Figs. 6 and 7)."""
    threshold: float = 0.05
    thresholds: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(0, 51))


@dataclass(frozen=True)
class PretrainedConfig:
    """Local ImageNet weights files (torchvision state dicts); unset = torchvision download."""

    resnet18: Path | None = None
    resnet50: Path | None = None

    def for_arch(self, arch: str) -> Path | None:
        return typing.cast(Path | None, getattr(self, arch))


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recognition: TaskConfig = field(default_factory=TaskConfig)
    manifestation: TaskConfig = field(
        default_factory=lambda: TaskConfig(
            networks=("P-ResNet18", "P-ResNet50"), lr=5e-5, head_lr=5e-4, backbone_lr=5e-5
        )
    )
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)

    def task(self, name: str) -> TaskConfig:
        if name == "recognition":
            return self.recognition
        if name == "manifestation":
            return self.manifestation
        raise ConfigError(f"task must be 'recognition' or 'manifestation', got {name!r}")

    def validate(self) -> Config:
        """Cross-field checks; returns self so it chains."""
        for task in ("recognition", "manifestation"):
            tc = self.task(task)
            tc.network_specs()
            bad = [k for k in tc.folds if not 0 <= k < self.split.folds]
            if self.split.file is not None:
                bad = [k for k in tc.folds if k < 0]  # the file numbers its folds
            if bad:
                raise ConfigError(f"{task}.folds {bad} outside 0..{self.split.folds - 1}")
            if (tc.head_lr is None) != (tc.backbone_lr is None):
                raise ConfigError(f"{task}: head_lr and backbone_lr go together")
            for name in ("lr", "head_lr", "backbone_lr"):
                v = getattr(tc, name)
                if v is not None and not v > 0:
                    raise ConfigError(f"{task}.{name} must be positive")
        NetworkSpec.parse(self.evaluation.study_network)
        if self.train.select_window < 1 or self.train.bn_slices < 1:
            raise ConfigError("train.select_window and train.bn_slices must be at least 1")
        if self.train.epochs < 1 or self.train.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be at least 1")
        if not 0 <= self.evaluation.threshold <= 1:
            raise ConfigError("evaluation.threshold must be in [0, 1]")
        if self.data.slice_policy not in SLICE_POLICIES:
            raise ConfigError(f"data.slice_policy must be one of {', '.join(SLICE_POLICIES)}")
        return self

    def preprocess_params(self) -> Any:
        """The :class:`PreprocessParams` of this config (imports torch)."""
        from ctdx.model_train.method.preprocess import PreprocessParams

        return PreprocessParams(size=self.preprocess.size)


# --- TOML <-> dataclasses ------------------------------------------------------------


def _convert(value: Any, tp: Any, where: str, base: Path) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or value == "":
            if type(None) in get_args(tp):
                return None
        return _convert(value, args[0], where, base)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where} must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = get_args(tp)[0]
        return tuple(_convert(v, item, f"{where}[{i}]", base) for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{where} must be a path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"[{where}] must be a table")
        return _build(typing.cast(type, tp), value, where, base)
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str, base: Path) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    values = {
        k: _convert(v, hints[k], f"{where}.{k}" if where else k, base) for k, v in data.items()
    }
    return cls(**values)


def config_from_dict(data: dict[str, Any], base: Path = Path(".")) -> Config:
    return typing.cast(Config, _build(Config, data, "", base.absolute())).validate()


def load_config(path: Path) -> Config:
    """Read and check a TOML config; relative paths in it are relative to the current directory.

    A bare name (``paper``, ``smoke.toml``) that is not a file here names a packaged config.
    """
    path = Path(path)
    if not path.is_file():
        candidate = CONFIG_DIR / f"{path.name.removesuffix('.toml')}.toml"
        if path.parent == Path(".") and candidate.is_file():
            path = candidate  # `paper` or `paper.toml` names a packaged config
        else:
            raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(raw, Path.cwd())


def with_overrides(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some keys replaced, e.g. ``with_overrides(c, train={"epochs": 1})``.

    ``None`` values are ignored so command-line options pass straight through.
    """
    out = config
    for section, values in sections.items():
        kept = {k: v for k, v in values.items() if v is not None}
        if not kept:
            continue
        current = getattr(out, section)
        hints = get_type_hints(type(current))
        for k in kept:
            if k not in hints:
                raise ConfigError(f"unknown key {section}.{k}")
        out = replace(out, **{section: replace(current, **kept)})
    return out.validate()


def to_dict(obj: Any) -> Any:
    """Plain types only (paths as strings, tuples as lists, None dropped): TOML/JSON ready."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ConfigError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(config: Config) -> str:
    """The config as TOML (tables of scalars and lists; what :func:`load_config` reads)."""
    lines: list[str] = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)

