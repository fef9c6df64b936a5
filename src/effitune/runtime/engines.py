"""The engines that run a bundle's network, and which one a bundle gets.

`TorchEngine` (PyTorch, CPU or GPU), `OnnxEngine` (ONNX Runtime, CPU), `OpenVinoEngine` (OpenVINO, Intel
CPUs and GPUs) and `LiteRtEngine` (LiteRT, formerly TFLite: phones and edge accelerators) share one
method, `run(uint8 NHWC images) -> (logits, features)`; `open_engine` opens a bundle's exported file,
`choose_backend` picks a backend for a bundle folder and `load_network` rebuilds the bundle's network
from its weights.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..bundle import Preprocessing, read_meta, read_weights
from ..errors import UserError
from ..models.network import Network, build_network
from . import EXPORT_FILES, EXPORT_OPTIONS, ONNX_FILES, OPENVINO_FILES, TFLITE_FILES
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


class OpenVinoEngine:
    """Runs an OpenVINO IR (`effitune export --format openvino`) on the CPU: same `run` as TorchEngine.

    The IR is built from the parity-checked ONNX graph, so it takes the same input (float32 NCHW in
    [0, 1], normalization inside). Inference precision is held at f32 (OpenVINO would pick bf16 on CPUs
    with AMX, which the parity gate did not check); an INT8 IR runs its int8 kernels either way.
    """

    def __init__(self, model: str | Path, threads: int | None = None):
        import openvino as ov

        self.path = Path(model)
        self.name = next((b for b, f in OPENVINO_FILES.items() if f == self.path.name), "openvino")
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(self.path)), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or available_cores(),
            "INFERENCE_PRECISION_HINT": "f32"})
        self.request, self.lock = compiled.create_infer_request(), threading.Lock()  # one request: serialised
        widths = {o.get_any_name(): o.get_partial_shape()[-1] for o in compiled.outputs}
        self.feature_width, self.logit_width = (int(widths[k].get_length()) if k in widths and widths[k].is_static
                                                else None for k in ("features", "logits"))

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), features (N, D [+ P])), float32."""
        with self.lock:
            results = self.request.infer({0: to_model_input(images)})
            named = {port.get_any_name(): value for port, value in results.items()}
            return np.array(named["logits"], np.float32), np.array(named["features"], np.float32)


class LiteRtEngine:
    """Runs a LiteRT (TFLite) model (`effitune export --format tflite`) with the LiteRT interpreter on the
    CPU (XNNPACK): same `run` as TorchEngine.

    The model takes NHWC images as phones deliver them: float32 in [0, 1] (normalization inside), or,
    for the full-integer model, int8 with the input's own scale and zero point; int8 outputs are
    dequantized here. Its batch is 1 as exported; a larger batch resizes the input once.
    """

    def __init__(self, model: str | Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(model)
        self.name = next((b for b, f in TFLITE_FILES.items() if f == self.path.name), "tflite")
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads or available_cores())
        self.interpreter.allocate_tensors()
        self.lock = threading.Lock()  # an interpreter runs one call at a time
        self.input = self.interpreter.get_input_details()[0]
        outputs = sorted(self.interpreter.get_output_details(), key=lambda d: d["name"])  # output_0: logits
        if len(outputs) != 2 or len(self.input["shape"]) != 4 or self.input["shape"][-1] != 3:
            raise ValueError(f"expected one NHWC image input and two outputs (logits, features); got inputs "
                             f"{self.input['shape'].tolist()} and {len(outputs)} outputs")
        self.output_indices = [d["index"] for d in outputs]
        self.logit_width, self.feature_width = (int(d["shape"][-1]) for d in outputs)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), features (N, D [+ P])), float32."""
        with self.lock:
            batch = self._quantized_input(images)
            if tuple(self.input["shape"]) != batch.shape:
                self.interpreter.resize_tensor_input(self.input["index"], list(batch.shape))
                self.interpreter.allocate_tensors()
                self.input = self.interpreter.get_input_details()[0]
            self.interpreter.set_tensor(self.input["index"], batch)
            self.interpreter.invoke()
            details = {d["index"]: d for d in self.interpreter.get_output_details()}
            logits, features = (dequantized(self.interpreter.get_tensor(i), details[i]) for i in self.output_indices)
            return logits, features

    def _quantized_input(self, images: np.ndarray) -> np.ndarray:
        scaled = np.asarray(images, np.float32) / np.float32(255)
        if self.input["dtype"] == np.float32:
            return np.ascontiguousarray(scaled)
        scale, zero_point = self.input["quantization"]
        limits = np.iinfo(self.input["dtype"])
        return np.clip(np.round(scaled / scale + zero_point), limits.min, limits.max).astype(self.input["dtype"])


def dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    if values.dtype == np.float32:
        return values.copy()
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)


ENGINES = {**{backend: OnnxEngine for backend in ONNX_FILES}, **{backend: OpenVinoEngine for backend in OPENVINO_FILES},
           **{backend: LiteRtEngine for backend in TFLITE_FILES}}


def open_engine(folder: Path, backend: str, threads: int | None = None):
    """The engine for one of the bundle's exported files (`EXPORT_FILES[backend]`)."""
    return ENGINES[backend](folder / EXPORT_FILES[backend], threads)


BACKENDS = ("auto", "torch", *EXPORT_FILES)


def choose_backend(folder: Path, backend: str, device: str = "cpu") -> str:
    """`auto`: ONNX Runtime when the bundle holds a parity-checked model.onnx and we run on the CPU."""
    if backend not in BACKENDS:
        raise UserError(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "onnx" if device == "cpu" and (folder / ONNX_FILES["onnx"]).is_file() else "torch"
    if backend != "torch" and not (folder / EXPORT_FILES[backend]).is_file():
        raise UserError(f"{folder / EXPORT_FILES[backend]} is missing: create it with "
                        f"`effitune export {folder} {EXPORT_OPTIONS[backend]}`, or use backend 'torch'.")
    return backend
