"""The one typed, commented source of every default.

Precedence is fixed: these defaults < a YAML config file (`--config`) < command-line flags. Unknown
keys are rejected with a suggestion, so a typo never passes silently. The resolved config is saved
with every run and inside every bundle.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .distributed import check_settings
from .errors import ConfigError, UserError


LOGGERS = ("csv", "tensorboard", "mlflow")  # train.logger names; training/loggers.py builds them

# Lightning's precision names (its own list lives in lightning.fabric; config stays import-light)
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", "16", "bf16",
              "transformer-engine", "transformer-engine-float16")


@dataclass
class DataConfig:
    val: float = 0.15  # fraction of each class held out for model selection
    test: float = 0.15  # fraction held out for the final, untouched accuracy figure
    seed: int = 0  # split seed: same data + seed -> identical manifest
    min_side: int = 16  # images smaller than this (pixels, shorter side) are rejected
    max_pixels: int = 89_478_485  # decompression-bomb limit (Pillow's default)
    near_duplicate_distance: int = 4  # perceptual-hash Hamming distance counted as "near duplicate"
    image_size: int | None = None  # training resolution; None = chosen from the data and the backbone
    augment: str = "standard"  # recipe name: none | light | standard | strong
    balance: str = "none"  # none | weights (loss class weights) | sampler (balanced sampling)
    workers: int | None = None  # data-loading / scanning processes; None = all cores


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"  # any name `effitune models` lists
    weights: str | None = None  # local weights file; None = packaged, then timm's hub
    dropout: float = 0.2  # dropout before the new linear head


@dataclass
class StageConfig:
    epochs: int | None = None  # None = chosen from the dataset size
    lr: float | None = 1e-3  # peak learning rate (AdamW); stage 2's None = stage 1's x train.lr_factor
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5  # linear warmup, then cosine decay to lr/100
    patience: int = 3  # early stopping on validation accuracy


@dataclass
class TrainConfig:
    stage1: StageConfig = field(default_factory=lambda: StageConfig(lr=3e-3, weight_decay=1e-4))
    # Stage 2's lr is stage 1's x lr_factor: the recipe's "lowered learning rate".
    stage2: StageConfig = field(default_factory=lambda: StageConfig(lr=None, weight_decay=1e-5))  # type: ignore[arg-type]
    lr_factor: float = 0.1
    # "auto": sized to the hardware and the data (training/recipe.py): on a GPU with >= 10k training images
    # every layer trains after stage 1; elsewhere the last 1, 2, 3... whole stages while val improves.
    # N: the last N whole stages | "all": every layer
    unfreeze: str = "auto"
    max_unfreeze: int | None = None  # deepest stage count "auto" tries; None = 3 on a CPU, every stage on a GPU
    auto_patience: int = 1  # "auto" tries this many deeper depths after one that did not improve (val is noisy)
    time_budget_min: float | None = None  # "auto" starts a deeper phase only if its predicted cost fits in this
    # BatchNorm trains (batch statistics and affine) only when every layer trains on >= 10k images, unless set
    train_bn: bool | None = None
    batch_size: int | None = None  # None = 256 on a GPU (small steps leave it idle), 64 on a CPU
    label_smoothing: float = 0.1
    feature_cache: bool = True  # train on cached frozen-prefix activations (exact for frozen layers)
    cache_views: int = 4  # views of each training image cached for the frozen prefix (1 plain + augmented)
    precision: str = "auto"  # auto (bf16-mixed on GPU, 32 on CPU) or one of PRECISIONS (Lightning's names)
    accelerator: str = "auto"
    devices: str = "auto"  # processes per machine: auto (every GPU, else 1) | N | GPU indices "0,1"
    # Machines; None = as many as the launcher (torchrun, SLURM's srun) started, else 1.
    num_nodes: int | None = None
    strategy: str = "auto"  # auto (ddp when devices x num_nodes > 1) | ddp | ddp_find_unused_parameters_true
    logger: str = "csv"  # csv | tensorboard | mlflow, or several joined by commas (Lightning's loggers)
    seed: int = 0


@dataclass
class UnknownConfig:
    target_tpr: float = 0.95  # share of new known images to accept (a conformal quantile of validation scores)
    # msp | energy | knn | mahalanobis | knn-frozen | ensemble | examples (needs --unknown-dir) | auto: examples
    # when --unknown-dir has >= 10 images, else ensemble (knn for a model without frozen layers)
    score: str = "auto"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unknown: UnknownConfig = field(default_factory=UnknownConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(target: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            inside = [f"{name}.{key}" for name, f in known.items()  # train.epochs -> train.stage1.epochs
                      if dataclasses.is_dataclass(getattr(target, name)) and key in {g.name for g in
                                                                                      fields(getattr(target, name))}]
            suggestion = f" Did you mean '{hint[0]}'?" if hint else \
                f" Did you mean {' or '.join(repr(where + name) for name in inside)}?" if inside else \
                f" Known keys: {', '.join(known)}."
            raise ConfigError(f"Unknown config key '{where}{key}'.{suggestion}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{where}{key}' must be a mapping, got {value!r}.")
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(target, key, _typed(value, typing.get_type_hints(type(target))[key], f"{where}{key}"))


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` as the field's type (int for 2.0, str for a YAML number), or a ConfigError naming the key."""
    kinds = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
    if value is None and len(kinds) < len(typing.get_args(hint) or (hint,)):
        return None
    kind = kinds[0]
    boolean = isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"  # numpy's too
    if kind is bool and boolean:
        return bool(value)
    number = isinstance(value, numbers.Real) and not boolean
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and (number or isinstance(value, str) and _is_float(value)):
        return float(value)  # a string too: YAML 1.1 reads 1e-3 (no dot) as one
    if kind is str and (isinstance(value, (str, os.PathLike)) or number and float(value).is_integer()):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a word"}[kind]
    quote = " (YAML reads yes/no/on/off as true/false: put the word in quotes)" if kind is str and boolean else ""
    raise ConfigError(f"Config key '{key}' must be {expected}, got {value!r}{quote}.")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then `overrides` ({"train.batch_size": 32} or nested dicts)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist. Pass an existing YAML file to --config.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections (data:, model:, train:).")
        _merge(config, values, "")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        nested: dict[str, Any] = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _merge(config, nested, "")
    validate(config)
    return config


def as_config(value: "Config | dict | str | Path") -> Config:
    """What the Python API takes as `config`: a Config, a dict ({"train": {"batch_size": 32}} or
    {"train.batch_size": 32}) or a YAML file's path, checked like the CLI's."""
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        return load_config(overrides=value)
    if isinstance(value, (str, os.PathLike)):
        return load_config(value)
    raise ConfigError(f"config must be a Config, a dict or a YAML file's path; got {type(value).__name__}.")


def config_from_dict(values: dict[str, Any]) -> Config:
    config = Config()
    _merge(config, values, "")
    return config


def validate(config: Config) -> None:
    d, t = config.data, config.train
    if not (0 <= d.val < 1 and 0 <= d.test < 1 and d.val + d.test < 1):
        raise ConfigError(f"data.val ({d.val}) and data.test ({d.test}) must be fractions that sum below 1.")
    if d.augment not in ("none", "light", "standard", "strong"):
        raise ConfigError(f"data.augment '{d.augment}' is not a recipe: use none, light, standard or strong.")
    if d.balance not in ("none", "weights", "sampler"):
        raise ConfigError(f"data.balance '{d.balance}' must be none, weights or sampler.")
    unfreeze = str(t.unfreeze)
    if unfreeze not in ("auto", "all") and not (unfreeze.isdigit() and int(unfreeze) >= 0):
        raise ConfigError(f"train.unfreeze '{t.unfreeze}' must be auto, all or a whole number of stages (0 = head only).")
    _check_ranges(config)
    if not {n.strip().lower() for n in str(t.logger).split(",")} <= set(LOGGERS):
        raise ConfigError(f"train.logger '{t.logger}' must be csv, tensorboard or mlflow (or several, comma-joined).")
    _check_distribution(t)
    if str(t.precision) not in PRECISIONS:
        raise ConfigError(f"train.precision '{t.precision}' must be one of {', '.join(PRECISIONS)} (Lightning's "
                          "names; auto: bf16-mixed on a GPU, 32-true on a CPU).")
    if config.unknown.score not in ("auto", "msp", "energy", "knn", "mahalanobis", "knn-frozen", "ensemble",
                                    "examples"):
        raise ConfigError(f"unknown.score '{config.unknown.score}' must be auto, msp, energy, knn, mahalanobis, "
                          "knn-frozen, ensemble or examples.")
    if not 0 < config.unknown.target_tpr <= 1:
        raise ConfigError(f"unknown.target_tpr ({config.unknown.target_tpr}) must be in (0, 1].")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_ranges(config: Config) -> None:
    d, m, t = config.data, config.model, config.train
    checks = [("data.image_size", d.image_size, d.image_size is None or d.image_size >= 32, "at least 32 (pixels)"),
              ("data.min_side", d.min_side, d.min_side >= 1, "at least 1"),
              ("data.max_pixels", d.max_pixels, d.max_pixels >= 1, "at least 1"),
              ("data.near_duplicate_distance", d.near_duplicate_distance, d.near_duplicate_distance >= 0, ">= 0"),
              ("data.workers", d.workers, d.workers is None or d.workers >= 0, ">= 0"),
              ("model.dropout", m.dropout, 0 <= m.dropout < 1, "in [0, 1)"),
              ("train.lr_factor", t.lr_factor, t.lr_factor > 0, "above 0"),
              ("train.max_unfreeze", t.max_unfreeze, t.max_unfreeze is None or t.max_unfreeze >= 1, "at least 1"),
              ("train.auto_patience", t.auto_patience, t.auto_patience >= 0, ">= 0"),
              ("train.time_budget_min", t.time_budget_min, t.time_budget_min is None or t.time_budget_min > 0,
               "above 0 (minutes)"),
              ("train.label_smoothing", t.label_smoothing, 0 <= t.label_smoothing < 1, "in [0, 1)"),
              ("train.batch_size", t.batch_size, t.batch_size is None or t.batch_size >= 1, "at least 1"),
              ("train.cache_views", t.cache_views, t.cache_views >= 1, "at least 1")]
    # devices, num_nodes and strategy: distributed.check_settings
    for name, stage in (("stage1", t.stage1), ("stage2", t.stage2)):
        checks += [(f"train.{name}.epochs", stage.epochs, stage.epochs is None or stage.epochs >= 1, "at least 1"),
                   (f"train.{name}.lr", stage.lr, stage.lr is None or stage.lr > 0, "above 0"),
                   (f"train.{name}.weight_decay", stage.weight_decay, stage.weight_decay >= 0, ">= 0"),
                   (f"train.{name}.warmup_epochs", stage.warmup_epochs, stage.warmup_epochs >= 0, ">= 0"),
                   (f"train.{name}.patience", stage.patience, stage.patience >= 0, ">= 0")]
    for key, value, good, rule in checks:
        if not good:
            raise ConfigError(f"{key} must be {rule}, got {value!r}.")


def _check_distribution(t: TrainConfig) -> None:
    try:
        check_settings(t.devices, t.num_nodes, t.strategy)
    except UserError as error:
        raise ConfigError(str(error)) from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
