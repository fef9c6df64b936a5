"""Deployment: ONNX export with a parity gate, INT8 quantization, and the speed/size/accuracy benchmark.

Every artifact lives inside the bundle folder next to the weights, and what was checked about it
(parity with PyTorch, accuracy on the test split) is recorded under `export` in effitune.json::

    from effitune.export import export_onnx, benchmark
    export_onnx("runs/first/model", int8=True)     # model.onnx + model.int8.onnx
    rows = benchmark(["runs/first/model"])          # torch vs onnx vs int8 on this machine

This module stays light (no torch/onnx import).
"""
from __future__ import annotations

import importlib

from ..errors import UserError
from ..runtime import ONNX_FILES

__all__ = ["ONNX_FILES", "FORMATS", "export", "export_onnx", "quantize_int8", "benchmark"]


def _onnx(bundle, **options) -> dict:
    from .onnx import export_onnx
    return export_onnx(bundle, **options)


FORMATS = {"onnx": _onnx}  # export targets by name (`effitune export --format NAME`)


def export(bundle, format: str = "onnx", **options) -> dict:
    """Export a bundle to a deployment format by name."""
    if format not in FORMATS:
        raise UserError(f"Unknown export format '{format}'. Choose one of: {', '.join(FORMATS)}.")
    return FORMATS[format](bundle, **options)


_LAZY = {"export_onnx": ".onnx", "quantize_int8": ".quantize", "benchmark": ".bench"}


def __getattr__(name: str):
    # Lazy, like the top-level package: torch/onnx load on first use.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'effitune.export' has no attribute {name!r}")
