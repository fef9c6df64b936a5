"""Deployment: ONNX, OpenVINO and LiteRT (TFLite) exports with a parity gate, INT8 quantization of each, and
the speed/size/accuracy benchmark.

Every artifact lives inside the bundle folder next to the weights, and what was checked about it
(parity with PyTorch, accuracy on the test split) is recorded under `export` in effitune.json::

    from effitune.export import export_onnx, benchmark
    export_onnx("runs/first/model", int8=True)     # model.onnx + model.int8.onnx
    export("runs/first/model", "tflite", int8=True)  # model.tflite + model.int8.tflite (phones)
    rows = benchmark(["runs/first/model"])          # torch vs onnx vs int8 on this machine

This module stays light (no torch/onnx import).
"""
from __future__ import annotations

import importlib
import importlib.util

from ..errors import UserError
from ..runtime import ONNX_FILES

__all__ = ["ONNX_FILES", "FORMATS", "export", "export_onnx", "export_openvino", "export_tflite", "quantize_int8",
           "benchmark"]


def _onnx(bundle, **options) -> dict:
    from .onnx import export_onnx
    return export_onnx(bundle, **options)


def _openvino(bundle, fp16: bool = False, **options) -> dict:
    _no_fp16(fp16, "openvino")
    from .openvino import export_openvino
    return export_openvino(bundle, **_needs("openvino", **options))


def _tflite(bundle, fp16: bool = False, **options) -> dict:
    _no_fp16(fp16, "tflite")
    from .tflite import export_tflite
    return export_tflite(bundle, **_needs("tflite", **options))


def _no_fp16(fp16: bool, format: str) -> None:
    if fp16:
        raise UserError(f"--fp16 is for --format onnx (a float16 graph for GPUs); --format {format} writes float32 "
                        "and, with --int8, full-integer models.")


def _needs(format: str, **options) -> dict:
    """The format's converter must be installed: said with the extra to install, before any work."""
    modules = {"openvino": ("openvino", "nncf") if options.get("int8") else ("openvino",),
               "tflite": ("litert_torch", "ai_edge_litert")}[format]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format {format} needs {', '.join(missing)}, which is not installed. Install it: "
                        f"pip install 'effitune[{format}]'.")
    return options


# export targets by name (`effitune export --format NAME`)
FORMATS = {"onnx": _onnx, "openvino": _openvino, "tflite": _tflite}


def export(bundle, format: str = "onnx", **options) -> dict:
    """Export a bundle to a deployment format by name (every file is checked against PyTorch first)."""
    if format not in FORMATS:
        raise UserError(f"Unknown export format '{format}'. Choose one of: {', '.join(FORMATS)}.")
    return FORMATS[format](bundle, **options)


_LAZY = {"export_onnx": ".onnx", "export_openvino": ".openvino", "export_tflite": ".tflite", "quantize_int8": ".quantize",
         "benchmark": ".bench"}


def __getattr__(name: str):
    # Lazy, like the top-level package: torch/onnx load on first use.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'effitune.export' has no attribute {name!r}")
