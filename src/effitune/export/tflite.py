"""LiteRT (formerly TFLite) model of a bundle for phones and edge accelerators, converted by litert-torch.

litert-torch converts the PyTorch network directly (torch.export -> StableHLO -> LiteRT flatbuffer), with
no TensorFlow. The model takes one NHWC image as a phone's camera delivers it: float32 RGB in [0, 1],
normalization inside; it gives `logits` and `features` (outputs 0 and 1). The preprocessing and classes
travel in the file's metadata (entry `effitune`, JSON) as well as in the bundle.

`--int8` is full-integer quantization, the Edge TPU / NNAPI / Hexagon case: PT2E static quantization
(litert-torch's PT2EQuantizer: int8 per-channel symmetric weights, int8 activations, histogram
observers) calibrated on ~1,000 of the run's training images; input and outputs are int8 too, with
their scale and zero point in the file (LiteRtEngine applies them). It is judged on the test split
against the float model, with unknown-image thresholds of its own. Each file is written only when
the LiteRT interpreter reproduces PyTorch (float: the fp32 parity gate) on real images.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .. import files
from ..bundle import Preprocessing
from ..runtime import TFLITE_FILES
from ..runtime.batching import run_in_batches
from ..runtime.engines import LiteRtEngine, TorchEngine, load_network
from ..version import __version__
from .artifacts import parity_gate, parity_images, record_export
from .quantize import judge_quantized, quantization_start, export_start, record_quantized

METADATA_NAME = "effitune"
# Full-integer INT8 needs more calibration images than ONNX Runtime's QDQ (200): measured on the demo bundle
# (904 test images, float 0.8894), histogram observers with 200 training images gave 0.8695, with 1,000
# 0.8916; MinMax observers with 200, 0.8739 (docs/benchmarks.md).
CALIBRATION_IMAGES = 1000


def export_tflite(bundle: str | Path, *, int8: bool = False,
                  samples: np.ndarray | Iterable[str | Path] | None = None,
                  calibration: str | Path | None = None) -> dict:
    """Write BUNDLE/model.tflite and, with `int8`, model.int8.tflite; return what was checked."""
    bundle, meta = export_start(bundle, int8, calibration)
    images, described = parity_images(bundle, meta, samples)
    converted = convert(bundle, meta)
    reference = run_in_batches(TorchEngine(load_network(bundle, meta)), images, 32)
    results = {"tflite": write_checked(with_metadata(converted, meta), bundle / TFLITE_FILES["tflite"], images,
                                       reference, described)}
    record_export(bundle, tflite=results["tflite"])
    if int8:
        results["tflite-int8"] = quantize_tflite(bundle, calibration)
    return results


class PhoneModel(torch.nn.Module):
    """The exported module: NHWC images in (a phone's layout), logits and features out.

    Two changes that leave the values as they are but let PT2E quantize every op, so that the INT8
    model is integer from its input on: normalization as a multiply and an add (ops the quantizer
    annotates; a subtract and a divide would stay float at the model's entrance), and the classifier
    without the head's dropout (the identity in inference, but a node that would give the pooled
    features two sets of int8 parameters, which the converter refuses).
    """

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.register_buffer("scale", 1 / network.std)
        self.register_buffer("shift", -network.mean / network.std)
        network.normalize = self.normalize  # this copy of the network only (export loads its own)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, features = self.network.embedding(images.permute(0, 3, 1, 2))
        return self.network.backbone.get_classifier()(pooled), features


def convert(bundle: Path, meta: dict, calibration: np.ndarray | None = None) -> bytes:
    """The LiteRT flatbuffer of the bundle's network (float32; full-integer INT8 when calibration images are
    given), converted in a child process.

    litert-torch brings JAX and its threads (and XLA's native libraries) into the process that imports it;
    a caller that forks later (DataLoader workers, a server) would fork a multithreaded JAX, which JAX
    warns may deadlock, and the test suite crashed once with all of them loaded in one process. A spawned
    child (a few seconds to start) keeps them out of the caller.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(convert_here, str(bundle), meta, calibration).result()


def convert_here(bundle: str, meta: dict, calibration: np.ndarray | None = None) -> bytes:
    """`convert`, in this process."""
    import litert_torch

    network, size = load_network(bundle, meta), Preprocessing.from_meta(meta).size

    module = PhoneModel(network.eval()).eval()
    example = (torch.rand(1, size, size, 3),)
    with quiet_litert():
        if calibration is None:
            return litert_torch.convert(module, example).model_content()
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        prepared = quantize_pt2e.prepare_pt2e(torch.export.export(module, example).module(), quantizer)
        move_exported_model_to_eval(prepared)
        with torch.no_grad():
            for image in calibration:  # observers see one image at a time, as the model will
                prepared(torch.from_numpy(image[None].astype(np.float32) / 255))
        quantized = move_exported_model_to_eval(quantize_pt2e.convert_pt2e(prepared, fold_quantize=False))
        return litert_torch.convert(quantized, example,
                                    quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)).model_content()


@contextlib.contextmanager
def quiet_litert():
    """litert-torch shows its progress on stdout unless told not to; library code stays quiet."""
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous


def write_checked(model: bytes, path: Path, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
                  described: str) -> dict:
    """Save to a temporary file, compare with PyTorch, and rename into place only if it agrees."""
    with files.replacing(path, suffix=".tflite") as temporary:
        temporary.write_bytes(model)
        parity = parity_gate(LiteRtEngine(temporary), images, reference, path, described, "LiteRT",
                             "Deploy the ONNX export instead")
    return {"file": path.name, "bytes": path.stat().st_size, "precision": "fp32", "parity": parity,
            "input": "float32 NHWC in [0, 1], batch 1", "converter": converter_version()}


def quantize_tflite(bundle: str | Path, calibration: str | Path | None = None, *,
                    images: int = CALIBRATION_IMAGES) -> dict:
    """BUNDLE/model.int8.tflite, full-integer, calibrated; judged against model.tflite and recorded."""
    bundle = Path(bundle)
    meta, source, target, calibration_set, described = quantization_start(bundle, "tflite", calibration, images)
    model = convert(bundle, meta, calibration_set)
    with files.replacing(target, suffix=".tflite") as temporary:
        temporary.write_bytes(with_metadata(model, meta))
        judged, thresholds = judge_quantized(bundle, meta, LiteRtEngine(source), LiteRtEngine(temporary),
                                             calibration_set, described)
    settings = {"tool": f"litert-torch {converter_version()} PT2E", "weights": "int8 per-channel symmetric",
                "activations": "int8 per-tensor (histogram)", "input": "int8 NHWC, batch 1", "outputs": "int8"}
    result = {"file": target.name, "bytes": target.stat().st_size, "float_bytes": source.stat().st_size,
              "settings": settings, **judged}
    return record_quantized(bundle, "tflite-int8", result, thresholds)


def converter_version() -> str:
    from importlib.metadata import version

    return version("litert-torch")


# --- metadata: the bundle's preprocessing inside the file ------------------------------------------

def metadata(meta: dict) -> dict:
    prep = Preprocessing.from_meta(meta)
    return {"producer": f"effitune {__version__}", "backbone": meta["backbone"], "classes": list(meta["classes"]),
            "size": prep.size, "mean": list(prep.mean), "std": list(prep.std), "interpolation": prep.interpolation,
            "resize": prep.resize, "decode": prep.decode, "temperature": meta.get("temperature") or 1.0,
            "input": "NHWC RGB in [0, 1] (int8 model: quantized with the input's scale and zero point); "
                     "normalization (mean/std) is inside the model",
            "outputs": ["logits (1, classes)", "features (1, D [+ P]): pooled penultimate features"]}


def with_metadata(model: bytes, meta: dict) -> bytes:
    """The flatbuffer with a metadata entry `effitune` (JSON), through the LiteRT schema's object API.

    The interpreter ignores metadata it does not know; `read_metadata` (or any flatbuffer reader of the
    LiteRT schema) gives it back.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata(meta)).encode(), np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tree.buffers) - 1
    tree.metadata = [m for m in (tree.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    builder = flatbuffers.Builder(len(model) + 4096)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(path: str | Path) -> dict | None:
    """The `effitune` metadata of a .tflite file, or None."""
    from ai_edge_litert import schema_py_generated as schema

    data = bytearray(Path(path).read_bytes())
    model = schema.Model.GetRootAs(data, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None
