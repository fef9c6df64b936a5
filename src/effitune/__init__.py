"""effitune: a folder of labelled images -> a calibrated, deployable EfficientNet classifier.

Public API (the CLI is a thin layer over it)::

    import effitune
    result = effitune.scan("photos/")                 # audit-ready records
    report = effitune.audit(result.records_path)     # or effitune.audit("photos/")
    rows, notices = effitune.split("photos/", out="work/")  # manifest.csv, duplicate-aware
    run = effitune.train("photos/", out="runs/first")  # two-stage transfer learning -> bundle
    predictor = effitune.load(run.bundle)
    predictor.predict(["new.jpg"])
    effitune.list_runs("runs")                         # runs side by side, best validation accuracy first
    study = effitune.tune("photos/", trials=20)        # Optuna on cached features -> study.preset (best.yaml)

Mistakes raise `UserError` (its message says the fix); what needs attention is an `EffituneWarning`
(`warnings.simplefilter("error", effitune.EffituneWarning)` makes each one an exception); progress
lines go to `notify=` (e.g. `notify=print`), by default the `effitune` logger's INFO.
"""
from __future__ import annotations

__all__ = ["scan", "audit", "split", "train", "load", "Predictor", "evaluate_bundle", "predict_to_file", "tune",
           "list_runs", "Config", "load_config", "UserError", "EffituneWarning"]

from .config import Config, load_config
from .version import __version__  # noqa: F401 - effitune.__version__
from .errors import EffituneWarning, UserError


# name -> (module, attribute). Lazy: `import effitune` stays fast; torch and friends load on first use.
_LAZY = {
    "scan": (".data.scan", "scan"), "audit": (".data.audit", "audit"), "split": (".data.split", "split"),
    "train": (".pipeline", "train"), "evaluate_bundle": (".evaluate.evaluate", "evaluate_bundle"),
    "predict_to_file": (".batch_predict", "predict_to_file"), "tune": (".tune", "tune"),
    "list_runs": (".runs", "list_runs"), "load": (".predict", "load"), "Predictor": (".predict", "Predictor"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'effitune' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module, __name__), attribute)
