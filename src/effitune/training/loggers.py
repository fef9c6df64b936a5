"""Experiment loggers: Lightning's own CSV, TensorBoard and MLflow loggers, chosen by name.

Everything is Lightning's code; this module only maps `train.logger` ("csv", "tensorboard",
"mlflow" or several joined by commas) to logger objects that write inside the run folder, and says
which package to install when one is missing. Each phase is one version/run (`stage1`, ...).
"""
from __future__ import annotations

from pathlib import Path

from ..config import LOGGERS
from ..errors import UserError
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def logger_names(spec: str) -> list[str]:
    names = [name.strip().lower() for name in str(spec).split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise UserError(f"Unknown logger '{', '.join(unknown) or spec}': use csv, tensorboard or mlflow "
                        "(several joined by commas, e.g. csv,tensorboard).")
    return names


def require_loggers(spec: str) -> None:
    """Every package the chosen loggers need, checked before a run starts (not after its caches)."""
    for name in logger_names(spec):
        _require(name)


def make_loggers(spec: str, root: Path, phase: str) -> list:
    """Lightning loggers for one phase; all write under `root` (the run folder)."""
    from lightning.pytorch import loggers

    made = []
    for name in logger_names(spec):
        _require(name)
        if name == "csv":
            made.append(loggers.CSVLogger(root, name="logs", version=phase))
        elif name == "tensorboard":
            made.append(loggers.TensorBoardLogger(root, name="tensorboard", version=phase, default_hp_metric=False))
        else:
            tracking = (Path(root).resolve() / "mlruns").as_uri()
            made.append(loggers.MLFlowLogger(experiment_name="effitune", run_name=f"{Path(root).name}/{phase}",
                                             tracking_uri=tracking))
    return made


def _require(name: str) -> None:
    package = _PACKAGES.get(name)
    if package is None:
        return
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UserError(f"The {name} logger needs the '{package}' package: pip install {package} "
                        "(or choose --logger csv).")
