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

import copy
import json
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..bundle import read_meta, update_meta, weights_fingerprint
from ..data.images import is_url, load_for_model
from ..data.split import manifest_hash, read_manifest
from ..errors import UserError
from ..models.network import Network
from ..ood import stratified_sample
from ..predict import OnnxEngine, TorchEngine, expand_sources, load_network, run_in_batches
from . import ONNX_FILES, torchscript_graph

OPSET = 18
INPUT, OUTPUTS = "images", ("logits", "features")
PARITY_IMAGES = 128
DEFAULT_RESIZE = "shorter side to size, then center crop size x size"  # data.images.resize_center_crop


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
    if int8 and calibration is None and manifest_images(bundle, meta, "train", 16) is None:
        from .quantize import no_calibration
        raise no_calibration(bundle)  # before anything is written
    if int8 and calibration is not None and not _exists(calibration):
        raise UserError(f"--calibration {calibration} does not exist. Pass a folder (or files) of typical training "
                        "images.")
    network = load_network(bundle, meta)
    images, described = parity_images(bundle, meta, samples)
    model, exporter = to_onnx(network, int(meta["preprocessing"]["size"]))  # before TorchEngine: NCHW layout
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


def _exists(sources) -> bool:
    """A calibration folder, file or glob pattern that names something (arrays and URLs are not checked here)."""
    import glob

    if isinstance(sources, np.ndarray):
        return True
    return any(is_url(source) or Path(source).exists() or glob.glob(str(source)) for source in
               ([sources] if isinstance(sources, (str, Path)) else sources))


def record_export(bundle: Path, **sections: dict) -> dict:
    """Merge sections into effitune.json's `export` (other formats already recorded stay), each with the
    fingerprint of the weights it was made from (`Predictor` refuses a file copied from another bundle)."""
    fingerprint = weights_fingerprint(bundle)
    sections = {name: {**section, "weights_sha1": fingerprint} for name, section in sections.items()}
    exported = {**read_meta(bundle).get("export", {}), **sections}
    return update_meta(bundle, export=exported)


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
                      "TorchScript exporter", stacklevel=2)
    return onnx.load_from_string(torchscript_onnx(network, size)), "torchscript"


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
    warnings.warn(f"running in PyTorch instead of ONNX Runtime (slower, same results): {reason}", stacklevel=3)


def add_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Preprocessing and classes as metadata_props (JSON values), readable by any ONNX consumer."""
    prep = meta["preprocessing"]
    props = {"size": prep["size"], "mean": prep["mean"], "std": prep["std"],
             "interpolation": prep.get("interpolation", "bicubic"), "resize": prep.get("resize", DEFAULT_RESIZE),
             "input": "float32 RGB in [0, 1], NCHW; normalization (mean/std) is inside the graph",
             "outputs": "logits (N, classes); features (N, D [+ P]): pooled penultimate features [then the "
                        "pooled output of the layers training left frozen]",
             "classes": meta["classes"], "temperature": meta.get("temperature") or 1.0,
             "embedding": meta.get("embedding") or {},
             "backbone": meta["backbone"]}
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in props.items()})
    model.producer_name, model.producer_version = "effitune", __version__
    model.doc_string = f"effitune {meta['backbone']} classifier, {len(meta['classes'])} classes, {prep['size']} px"


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
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        onnx.save(model, temporary)
        parity = check_parity(OnnxEngine(temporary), images, reference, TOLERANCES[precision])
        parity["images"] = described
        if not parity["passed"]:
            raise UserError(
                f"{path.name} not written: ONNX Runtime disagrees with PyTorch on {parity['n']} {described} "
                f"(max |logit difference| {parity['max_abs_logit_diff']:.2e}, allowed "
                f"{parity['tolerance']['allowed_max_abs_logit_diff']:.1e}; top-1 agreement "
                f"{parity['top1_agreement']:.1%}, "
                f"needed {parity['tolerance']['min_top1_agreement']:.0%}). Keep serving with the PyTorch backend "
                "and report the backbone and versions (torch, onnx, onnxruntime) as a bug.")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return {"file": path.name, "bytes": path.stat().st_size, "precision": precision, "parity": parity}


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


# --- real images for the checks -----------------------------------------------------------------

def parity_images(bundle: Path, meta: dict, samples=None, limit: int = PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """Images to compare on: `samples`, else the run's own images, else noise (with a warning)."""
    size = int(meta["preprocessing"]["size"])
    if samples is not None:
        images = as_images(samples, size)
        return images, "given images"
    for split in ("test", "val", "train"):
        found = manifest_images(bundle, meta, split, limit)
        if found is not None:
            return found[0], f"{split}-split images"
    warnings.warn(f"{bundle}: no manifest.csv next to the bundle and no samples given; checking ONNX parity on "
                  "random noise, which says little about real images. Pass samples (CLI: --samples DIR).",
                  stacklevel=3)
    return np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8), "random-noise images"


def as_images(samples, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) from an array of that shape or from image paths / folders / globs."""
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[1:] != (size, size, 3) or not len(samples):
            raise UserError(f"samples must be uint8 images of shape (N, {size}, {size}, 3); got {samples.dtype} "
                            f"{samples.shape}.")
        return samples
    paths = list(expand_sources([samples] if isinstance(samples, (str, Path)) else samples))
    images, _ = load_images(paths, size)
    if not len(images):
        raise UserError(f"No readable images in {samples}. Pass image files or a folder of images.")
    return images


def manifest_images(bundle: Path, meta: dict, split: str, limit: int | None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 images, class indices): a class-stratified sample of one split of BUNDLE/../manifest.csv.

    None when there is no manifest, it is not the one the bundle was trained on, or no image of the
    split can be read any more.
    """
    path = bundle.resolve().parent / "manifest.csv"
    if not path.is_file():
        return None
    if meta.get("manifest_sha1") and manifest_hash(path) != meta["manifest_sha1"]:
        warnings.warn(f"{path} changed since {bundle} was trained; not using its images", stacklevel=3)
        return None
    classes = list(meta["classes"])
    rows = [row for row in read_manifest(path) if row["split"] == split and row["label"] in classes]
    labels = np.array([classes.index(row["label"]) for row in rows], dtype=np.int64)
    chosen = stratified_sample(labels, limit, seed) if limit else np.arange(len(rows))
    images, readable = load_images([rows[i]["path"] for i in chosen], int(meta["preprocessing"]["size"]))
    return (images, labels[chosen][readable]) if len(images) else None


def load_images(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, indices of the paths that could be read); unreadable files are skipped."""
    images, readable = [], []
    for index, path in enumerate(paths):
        try:
            images.append(load_for_model(path, size))
            readable.append(index)
        except Exception:  # noqa: BLE001 - a moved or broken file is skipped; the others still count
            continue
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, np.array(readable, dtype=np.int64)
