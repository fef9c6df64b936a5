"""The engines that run a bundle's network, and which one a bundle gets.

`TorchEngine` (PyTorch, CPU or GPU) and `OnnxEngine` (ONNX Runtime, CPU) share one method,
`run(uint8 NHWC images) -> (logits, features)`; `choose_backend` picks one for a bundle folder and
`load_network` rebuilds the bundle's network from its weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..bundle import Preprocessing, read_meta, read_weights
from ..errors import UserError
from ..models.network import Network, build_network
from . import ONNX_FILES
from .batching import to_model_input



def network_from_meta(meta: dict) -> Network:
    """The bundle's network without its weights: backbone, classes and preprocessing from effitune.json."""
    prep = Preprocessing.from_meta(meta)
    network, _ = build_network(meta["backbone"], len(meta["classes"]), pretrained=False, mean=prep.mean,
                               std=prep.std)
    network.frozen_depth = meta.get("embedding", {}).get("frozen_depth")  # bundles before it: pooled only
    return network


def load_network(folder: str | Path, meta: dict | None = None) -> Network:
    meta = meta or read_meta(folder)
    network = network_from_meta(meta)
    state = read_weights(folder)
    expected = network.state_dict()
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    if mismatched or missing:
        detail = (f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)}, expected "
                  f"{tuple(expected[mismatched[0]].shape)}" if mismatched else f"{len(missing)} tensors missing, "
                  f"e.g. {missing[0]}")
        raise UserError(f"{folder}: weights do not fit {meta['backbone']} with {len(meta['classes'])} classes "
                        f"({detail}). The weights and effitune.json come from different models; re-train or "
                        "copy the bundle again.")
    network.load_state_dict(state, strict=True)
    return network.eval()


class TorchEngine:
    """Runs the bundle's network with PyTorch. Other engines (ONNX Runtime) offer the same `run`.

    In channels_last memory format (NHWC, as the images arrive): 1.5x faster than the default layout
    for lite0 on a CPU at 96 and 224 px (docs/benchmarks.md); the values are the same. The network
    is converted in place (no copy of the weights): export a network before giving it to an engine.
    """

    name = "torch"

    def __init__(self, network: Network, device: str = "cpu"):
        self.network, self.device = network.to(device).eval().to(memory_format=torch.channels_last), device

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), features (N, D [+ P]): see Network.embedding), float32."""
        batch = torch.from_numpy(np.require(images, requirements="CW")).to(self.device).permute(0, 3, 1, 2)  # NHWC
        pooled, features = self.network.embedding(batch)
        return self.network.head(pooled).float().cpu().numpy(), features.float().cpu().numpy()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OnnxEngine:
    """Runs an exported graph (`effitune export`) with ONNX Runtime on the CPU: same `run` as TorchEngine.

    `model`: the .onnx file, or the serialized graph itself (bytes: nothing written to disk).
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()  # one request uses every core
        options.inter_op_num_threads = 1  # a chain of convs has no parallel branches to spread over
        options.log_severity_level = 3
        in_memory = isinstance(model, bytes)
        self.path = None if in_memory else Path(model)
        self.name = "onnx" if in_memory else next((b for b, f in ONNX_FILES.items() if f == self.path.name), "onnx")
        self.session = ort.InferenceSession(model if in_memory else str(model), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        widths = {o.name: o.shape[-1] for o in self.session.get_outputs() if o.shape and isinstance(o.shape[-1], int)}
        self.feature_width, self.logit_width = widths.get("features"), widths.get("logits")

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), features (N, D [+ P])), float32."""
        logits, features = self.session.run(["logits", "features"], {self.input: to_model_input(images)})
        return logits, features


BACKENDS = ("auto", "torch", *ONNX_FILES)


def choose_backend(folder: Path, backend: str, device: str = "cpu") -> str:
    """`auto`: ONNX Runtime when the bundle holds a parity-checked model.onnx and we run on the CPU."""
    if backend not in BACKENDS:
        raise UserError(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "onnx" if device == "cpu" and (folder / ONNX_FILES["onnx"]).is_file() else "torch"
    if backend != "torch" and not (folder / ONNX_FILES[backend]).is_file():
        flag = {"onnx": "", "fp16": " --fp16", "int8": " --int8"}[backend]
        raise UserError(f"{folder / ONNX_FILES[backend]} is missing: create it with "
                        f"`effitune export {folder} --format onnx{flag}`, or use backend 'torch'.")
    return backend
