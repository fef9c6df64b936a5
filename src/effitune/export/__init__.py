"""Deployment: ONNX export with a parity gate, INT8 quantization, and the speed/size/accuracy benchmark.

Every artifact lives inside the bundle folder next to the weights, and what was checked about it
(parity with PyTorch, accuracy on the test split) is recorded under `export` in effitune.json::

    from effitune.export import export_onnx, benchmark
    export_onnx("runs/first/model", int8=True)     # model.onnx + model.int8.onnx
    rows = benchmark(["runs/first/model"])          # torch vs onnx vs int8 on this machine

This module stays light (no torch/onnx import): `effitune.predict` reads `ONNX_FILES` from it.
"""
from __future__ import annotations

import importlib

from ..errors import UserError

# Predictor backend name -> file inside the bundle.
ONNX_FILES = {"onnx": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

__all__ = ["ONNX_FILES", "FORMATS", "export", "export_onnx", "quantize_int8", "benchmark", "torchscript_graph"]


def torchscript_graph(module, example: tuple, inputs: list[str], outputs: list[str], opset: int) -> bytes:
    """`module` as an ONNX graph (bytes, no file) from the legacy TorchScript exporter, batch axis dynamic.

    ~0.4 s for lite0 (the dynamo exporter: ~8 s); what training's ONNX Runtime passes use (the frozen
    layers in `training.features`, the pass after the phases in `export.onnx.in_memory_engine`).
    """
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, still proven
        torch.onnx.export(module, example, buffer, dynamo=False, input_names=inputs, output_names=outputs,
                          opset_version=opset, dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)})
    return buffer.getvalue()


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
