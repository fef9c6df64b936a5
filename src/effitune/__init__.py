"""effitune: a folder of labelled images -> a calibrated, deployable EfficientNet classifier.

Public API (the CLI is a thin layer over it)::

    import effitune
    result = effitune.scan("photos/")                 # audit-ready records
    report = effitune.audit(result.records_path)
    run = effitune.train("photos/", out="runs/first")  # two-stage transfer learning -> bundle
    predictor = effitune.load(run.bundle)
    predictor.predict(["new.jpg"])
    effitune.list_runs("runs")                         # runs side by side, best validation accuracy first
    study = effitune.tune("photos/", trials=20)        # Optuna on cached features -> study.preset (best.yaml)
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["scan", "audit", "split", "train", "load", "Predictor", "evaluate_bundle", "predict_to_file", "tune",
           "list_runs", "Config", "load_config", "UserError"]

from .config import Config, load_config
from .errors import UserError


def __getattr__(name: str):
    # Lazy: `import effitune` stays fast; torch and friends load on first use.
    if name == "scan":
        from .data.scan import scan
        return scan
    if name == "audit":
        from .data.audit import audit
        return audit
    if name == "split":
        from .data.split import split_records
        return split_records
    if name == "train":
        from .training.run import train
        return train
    if name == "evaluate_bundle":
        from .evaluate.evaluate import evaluate_bundle
        return evaluate_bundle
    if name == "predict_to_file":
        from .batch_predict import predict_to_file
        return predict_to_file
    if name == "tune":
        from .tune import tune
        return tune
    if name == "list_runs":
        from .runs import list_runs
        return list_runs
    if name in ("load", "Predictor"):
        from . import predict
        return getattr(predict, name)
    raise AttributeError(f"module 'effitune' has no attribute {name!r}")
