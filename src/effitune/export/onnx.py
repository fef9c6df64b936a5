"""ONNX export of a bundle, written only when ONNX Runtime reproduces PyTorch on real images.

The graph takes `images` (float32 RGB in [0, 1], NCHW, dynamic batch; normalization is inside) and
gives `logits` and `features` (the pooled penultimate features the unknown-image scores need). The
preprocessing travels in the file's metadata_props, so a consumer without effitune can feed it.

Exporter: `torch.onnx.export(dynamo=True)`. With torch 2.14 both exporters reproduce timm's
tf_efficientnet_lite* to ~1e-5, but the legacy TorchScript one (`dynamo=False`, deprecated) keeps the
TF-"SAME" padding dynamic: ~230 Shape/Gather/Ceil/Pad nodes around the 49 convolutions. The dynamo
exporter specializes that padding on the bundle's fixed image size and leaves a plain Conv/Clip graph,
which is also what INT8 quantization wants. It is slower (~8 s vs ~3 s for lite0), and the legacy
exporter remains the fallback if it fails.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from .. import files
from ..bundle import Preprocessing, read_meta
from ..errors import EffituneWarning, UserError
from ..models.network import Network
from ..runtime import ONNX_FILES
from ..runtime.batching import run_in_batches
from ..runtime.engines import OnnxEngine, TorchEngine, load_network
from ..runtime.graph import INPUT, OPSET, OUTPUTS, LogitsAndFeatures, torchscript_onnx
from ..version import __version__
from .artifacts import parity_gate, parity_images, record_export



def export_onnx(bundle: str | Path, *, int8: bool = False, fp16: bool = False,
                samples: np.ndarray | Iterable[str | Path] | None = None,
                calibration: str | Path | None = None) -> dict:
    """Write BUNDLE/model.onnx (and model.fp16.onnx / model.int8.onnx); return what was checked.

    `samples`: images for the parity check when the run's manifest.csv is not next to the bundle
    (uint8 (N, size, size, 3) or image paths/folders). `calibration`: INT8 calibration images when
    there is no manifest (see `quantize_int8`).
    """
    bundle = Path(bundle)
    meta = read_meta(bundle)
    if int8:
        from .quantize import require_calibration
        require_calibration(bundle, meta, calibration)  # before anything is written
    network = load_network(bundle, meta)
    images, described = parity_images(bundle, meta, samples)
    model, exporter = to_onnx(network, Preprocessing.from_meta(meta).size)  # before TorchEngine: NCHW layout
    reference = run_in_batches(TorchEngine(network), images, 32)
    add_metadata(model, meta)
    info = {"exporter": exporter, "opset": OPSET, "torch": torch.__version__}
    results = {"onnx": {**write_checked(model, bundle / ONNX_FILES["onnx"], images, reference, "fp32", described),
                        **info}}
    if fp16:
        results["fp16"] = {**write_checked(to_float16(model), bundle / ONNX_FILES["fp16"], images, reference,
                                           "fp16", described), **info}
    record_export(bundle, **results)
    if int8:
        from .quantize import quantize_int8
        results["int8"] = quantize_int8(bundle, calibration)
    return results


# --- conversion ---------------------------------------------------------------------------------

def to_onnx(network: Network, size: int) -> tuple[onnx.ModelProto, str]:
    """(ModelProto with weights inside, exporter used)."""
    module = LogitsAndFeatures(network).eval()
    example = (torch.rand(2, 3, size, size),)  # batch 2: a batch of 1 would be specialized away
    try:
        program = torch.onnx.export(module, example, dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                    verbose=False)
        return program.model_proto, "dynamo"
    except Exception as error:  # noqa: BLE001 - any failure of the new exporter -> the proven one
        warnings.warn(f"the dynamo ONNX exporter failed ({type(error).__name__}: {error}); using the legacy "
                      "TorchScript exporter", EffituneWarning, stacklevel=2)
    return onnx.load_from_string(torchscript_onnx(network, size)), "torchscript"


def add_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Preprocessing and classes as metadata_props (JSON values), readable by any ONNX consumer."""
    prep = Preprocessing.from_meta(meta)
    props = {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std),
             "interpolation": prep.interpolation, "resize": prep.resize, "decode": prep.decode,
             "input": "float32 RGB in [0, 1], NCHW; normalization (mean/std) is inside the graph",
             "outputs": "logits (N, classes); features (N, D [+ P]): pooled penultimate features [then the "
                        "pooled output of the layers training left frozen]",
             "classes": meta["classes"], "temperature": meta.get("temperature") or 1.0,
             "embedding": meta.get("embedding") or {},
             "backbone": meta["backbone"]}
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in props.items()})
    model.producer_name, model.producer_version = "effitune", __version__
    model.doc_string = f"effitune {meta['backbone']} classifier, {len(meta['classes'])} classes, {prep.size} px"


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and arithmetic in float16, inputs/outputs kept float32 (same feeding code)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxconverter_common.float16 import convert_float_to_float16
        except ImportError:
            raise UserError("--fp16 needs a float16 converter: `pip install onnxconverter-common` (or an "
                            "onnxruntime that ships onnxruntime.transformers.float16).") from None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "values clipped to the float16 range": checked below
        return convert_float_to_float16(copy, keep_io_types=True)


# --- the parity gate ----------------------------------------------------------------------------

def write_checked(model: onnx.ModelProto, path: Path, images: np.ndarray,
                  reference: tuple[np.ndarray, np.ndarray], precision: str, described: str) -> dict:
    """Save to a temporary file, compare with PyTorch, and rename into place only if it agrees."""
    with files.replacing(path) as temporary:
        onnx.save(model, temporary)
        parity = parity_gate(OnnxEngine(temporary), images, reference, path, described, "ONNX Runtime",
                             "Keep serving with the PyTorch backend", precision)
    return {"file": path.name, "bytes": path.stat().st_size, "precision": precision, "parity": parity}
