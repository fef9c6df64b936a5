"""The network as an ONNX graph in memory, for ONNX Runtime passes on a CPU (no file, no `effitune export`).

Training's caching pass over the frozen layers and the pass over every image after the phases run
such a graph: ~0.4 s of conversion (the legacy TorchScript exporter, sizes fixed), then 1.7-2.3x
PyTorch eager for lite0 on a CPU (docs/benchmarks.md). `check_parity` is the gate every graph passes
before it is used or written (`effitune export` writes files with the same gate).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..models.network import Network
from .batching import run_in_batches
from .engines import OnnxEngine, TorchEngine
from ..errors import EffituneWarning

OPSET = 18
INPUT, OUTPUTS = "images", ("logits", "features")

@dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float
    min_top1_agreement: float
    scaled: bool = False  # allowed difference x max(1, largest |logit|): a relative error


# fp32 differs from PyTorch only by operation order (~1e-5 measured on lite0); float16 keeps about three
# significant digits, so its error grows with the logits (3e-2 measured on logits up to ~10).
TOLERANCES = {"fp32": Tolerance(1e-3, 0.99), "fp16": Tolerance(1e-2, 0.99, scaled=True)}


class LogitsAndFeatures(nn.Module):
    """The exported module: one pass, both outputs."""

    def __init__(self, network: Network):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, features = self.network.embedding(images)
        return self.network.head(pooled), features


def torchscript_graph(module, example: tuple, inputs: list[str], outputs: list[str], opset: int) -> bytes:
    """`module` as an ONNX graph (bytes, no file) from the legacy TorchScript exporter, batch axis dynamic.

    ~0.4 s for lite0 (the dynamo exporter: ~8 s); what training's ONNX Runtime passes use (the frozen
    layers in `training.features`, the pass after the phases in `in_memory_engine`).
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


def torchscript_onnx(network: Network, size: int) -> bytes:
    """The bundle's graph from the legacy TorchScript exporter, for `size` x `size` images only."""
    return torchscript_graph(LogitsAndFeatures(network).eval(), (torch.rand(2, 3, size, size),), [INPUT],
                             list(OUTPUTS), OPSET)


def in_memory_engine(network: Network, images: np.ndarray) -> OnnxEngine | None:
    """`network` in ONNX Runtime, exported in memory (no file), for one long pass over many images on a CPU.

    Training's pass over every image after the phases uses it: 1.7-2.3x PyTorch eager for lite0 at
    96-224 px, export and check included (docs/benchmarks.md). None, with a warning, when the export
    or a first run fails, or when ONNX Runtime does not reproduce PyTorch on `images` (logits and
    features, within `effitune export`'s fp32 tolerance); the caller then keeps PyTorch.
    """
    try:
        network = copy.deepcopy(network).cpu().eval().to(memory_format=torch.contiguous_format)  # caller's stays
        engine = OnnxEngine(torchscript_onnx(network, int(images.shape[1])))
        reference = run_in_batches(TorchEngine(network), images, 32)
        parity = check_parity(engine, images, reference, TOLERANCES["fp32"])
    except Exception as error:  # noqa: BLE001 - an exporter or runtime gap costs speed, never the result
        _slower(f"the ONNX export failed ({type(error).__name__}: {error})")
        return None
    allowed = parity["tolerance"]["allowed_max_abs_logit_diff"]
    if not parity["passed"] or parity["max_abs_feature_diff"] > allowed:
        _slower(f"ONNX Runtime differs from PyTorch by up to {parity['max_abs_logit_diff']:.1e} in the logits and "
                f"{parity['max_abs_feature_diff']:.1e} in the features (allowed {allowed:.0e})")
        return None
    return engine


def _slower(reason: str) -> None:
    warnings.warn(f"running in PyTorch instead of ONNX Runtime (slower, same results): {reason}", EffituneWarning, stacklevel=3)


def check_parity(engine, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
                 tolerance: Tolerance) -> dict:
    logits, features = run_in_batches(engine, images, 32)
    expected_logits, expected_features = reference
    max_logit = float(np.abs(logits - expected_logits).max())
    allowed = tolerance.max_abs_logit_diff * (max(1.0, float(np.abs(expected_logits).max())) if tolerance.scaled else 1)
    agreement = float((logits.argmax(1) == expected_logits.argmax(1)).mean())
    return {"n": int(len(images)), "max_abs_logit_diff": max_logit,
            "max_abs_feature_diff": float(np.abs(features - expected_features).max()),
            "top1_agreement": agreement, "tolerance": {**asdict(tolerance), "allowed_max_abs_logit_diff": allowed},
            "passed": bool(max_logit <= allowed and agreement >= tolerance.min_top1_agreement)}
