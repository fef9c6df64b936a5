"""Deployment: ONNX export with a parity gate, INT8 quantization, and the speed/size/accuracy benchmark.

Every artifact lives inside the bundle folder next to the weights, and what was checked about it
(parity with PyTorch, accuracy on the test split) is recorded under `export` in effitune.json::

    from effitune.export import export_onnx, benchmark
    export_onnx("runs/first/model", int8=True)     # model.onnx + model.int8.onnx
    rows = benchmark(["runs/first/model"])          # torch vs onnx vs int8 on this machine

This module stays light (no torch/onnx import): `effitune.predict` reads `ONNX_FILES` from it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

from ..errors import UserError

# Predictor backend name -> file inside the bundle.
ONNX_FILES = {"onnx": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

__all__ = ["ONNX_FILES", "FORMATS", "export", "export_onnx", "quantize_int8", "benchmark", "torchscript_graph"]


def torchscript_graph(module, example: tuple, inputs: list[str], outputs: list[str], opset: int) -> bytes:
    """`module` as an ONNX graph (bytes, no file) from the legacy TorchScript exporter, batch axis dynamic.

    ~0.4 s for lite0 (the dynamo exporter: ~8 s); what training's ONNX Runtime passes use (the frozen
    layers in `training.features`, the pass after the phases in `export.onnx.in_memory_engine`).
    The graph is for `example`'s height and width only (`static_same_padding`), in inference mode;
    every submodule comes back in the mode it had (torch.onnx would set them all to the top module's).
    """
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), modes_kept(module), \
            static_same_padding(module.eval(), example):
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, still proven
        warnings.simplefilter("ignore", UserWarning)  # its constant-folding notes; both callers check the result
        torch.onnx.export(module, example, buffer, dynamo=False, input_names=inputs, output_names=outputs,
                          opset_version=opset, dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)})
    return _pads_fusable(buffer.getvalue())


def _pads_fusable(graph: bytes) -> bytes:
    """Drop the empty third input (no pad value, so zero) the legacy exporter gives every Pad.

    ONNX Runtime folds a Pad into the next Conv only when each of its inputs is a constant, and an
    empty name is not one: with it every "SAME" Pad stays a separate copy that also breaks the NCHWc
    layout around it. Without it: no Pad left in lite0's graph, 1.7x faster at 224 px, the same values.
    """
    try:
        import onnx
    except ImportError:  # the graph still runs, slower
        return graph
    model = onnx.load_from_string(graph)
    pads = [node for node in model.graph.node if node.op_type == "Pad" and len(node.input) == 3 and not node.input[2]]
    for node in pads:
        del node.input[2]
    return model.SerializeToString() if pads else graph


@contextlib.contextmanager
def modes_kept(module):
    """Each submodule's training flag as it was before the block."""
    modes = [(layer, layer.training) for layer in module.modules()]
    try:
        yield
    finally:
        for layer, training in modes:
            layer.training = training


@contextlib.contextmanager
def static_same_padding(module, example: tuple):
    """While exporting `module`, timm's TF-style "SAME" convolutions pad by constants for `example`'s size.

    `Conv2dSame` (tf_* backbones' strided convolutions) computes its padding from the input's shape
    on every call; the legacy exporter records that as ~10 shape operations and a Pad with run-time
    amounts per layer, which keeps ONNX Runtime from folding the Pad into the Conv: lite0 at 224 px
    ran 1.7x slower than the same network from the dynamo exporter (docs/benchmarks.md). For a fixed
    input size the amounts are constants, as the dynamo exporter finds: one forward of `example`
    records each layer's input size, the layers are given constant padding (an instance attribute,
    removed afterwards: the module is left as it was). A layer seen at two sizes keeps its own.
    """
    import torch
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    layers = [layer for layer in module.modules() if isinstance(layer, Conv2dSame)]
    sizes: dict = {layer: set() for layer in layers}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: sizes[layer].add(tuple(args[0].shape[-2:])))
             for layer in layers]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    fixed = [layer for layer in layers if len(sizes[layer]) == 1]
    try:
        for layer in fixed:
            padding = pad_same_arg(list(*sizes[layer]), layer.weight.shape[-2:], layer.stride, layer.dilation)
            layer.forward = functools.partial(_constant_padding_conv, layer, tuple(int(p) for p in padding))
        yield
    finally:
        for layer in fixed:
            layer.__dict__.pop("forward", None)


def _constant_padding_conv(layer, padding: tuple[int, int, int, int], x):
    import torch.nn.functional as F

    return F.conv2d(F.pad(x, padding), layer.weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)


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
