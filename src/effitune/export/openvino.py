"""OpenVINO IR of a bundle (Intel CPUs, integrated GPUs and NPUs), built from the parity-checked ONNX graph.

`ov.convert_model` reads model.onnx (exported first when it is missing or stale), so the IR has the
same input (float32 RGB in [0, 1], NCHW, dynamic batch, normalization inside) and outputs (`logits`,
`features`). The preprocessing and classes travel in the IR's rt_info under `effitune`. The IR is
written only when OpenVINO reproduces PyTorch on real images (the same gate as ONNX). `--int8`
quantizes it with NNCF's post-training quantization (`nncf.quantize`, its default symmetric
"performance" preset), calibrated on ~200 of the run's training images, and is judged on the test
split against the float IR, with unknown-image thresholds of its own.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import openvino as ov

from .. import files
from ..bundle import Preprocessing, read_meta, weights_fingerprint
from ..runtime import ONNX_FILES, OPENVINO_FILES
from ..runtime.batching import run_in_batches, to_model_input
from ..runtime.engines import OpenVinoEngine, TorchEngine, load_network
from .artifacts import parity_gate, parity_images, record_export
from .quantize import CALIBRATION_IMAGES, judge_quantized, quantization_start, export_start, record_quantized


def export_openvino(bundle: str | Path, *, int8: bool = False,
                    samples: np.ndarray | Iterable[str | Path] | None = None,
                    calibration: str | Path | None = None) -> dict:
    """Write BUNDLE/model.openvino.xml (+ .bin) and, with `int8`, model.int8.openvino.xml; what was checked."""
    bundle, meta = export_start(bundle, int8, calibration)
    results = {}
    if not onnx_is_current(bundle, meta):
        from .onnx import export_onnx
        results.update(export_onnx(bundle, samples=samples))
        meta = read_meta(bundle)
    images, described = parity_images(bundle, meta, samples)
    reference = run_in_batches(TorchEngine(load_network(bundle, meta)), images, 32)
    model = ov.convert_model(str(bundle / ONNX_FILES["onnx"]))
    add_metadata(model, meta)
    results["openvino"] = write_checked(model, bundle / OPENVINO_FILES["openvino"], images, reference, described)
    record_export(bundle, openvino=results["openvino"])
    if int8:
        results["openvino-int8"] = quantize_openvino(bundle, calibration)
    return results


def onnx_is_current(bundle: Path, meta: dict) -> bool:
    """model.onnx is there, recorded, and made from these weights (else it is exported again first)."""
    record = meta.get("export", {}).get("onnx")
    return ((bundle / ONNX_FILES["onnx"]).is_file() and isinstance(record, dict)
            and record.get("weights_sha1") == weights_fingerprint(bundle))


def add_metadata(model: ov.Model, meta: dict) -> None:
    """Preprocessing and classes in the IR's rt_info (`model.get_rt_info(["effitune", "classes"])`)."""
    prep = Preprocessing.from_meta(meta)
    for key, value in {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std),
                       "interpolation": prep.interpolation, "resize": prep.resize, "decode": prep.decode,
                       "classes": list(meta["classes"]), "temperature": meta.get("temperature") or 1.0,
                       "backbone": meta["backbone"],
                       "input": "float32 RGB in [0, 1], NCHW; normalization (mean/std) is inside the graph"}.items():
        model.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["effitune", key])


def write_checked(model: ov.Model, path: Path, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
                  described: str) -> dict:
    """Save the IR beside its target, compare with PyTorch, and move both files into place only if it agrees."""
    with ir_replacing(path) as temporary:
        ov.save_model(model, str(temporary), compress_to_fp16=False)  # fp32 weights: the parity is fp32's
        parity = parity_gate(OpenVinoEngine(temporary), images, reference, path, described, "OpenVINO",
                             "Keep the ONNX backend")
    return {"file": path.name, "bytes": ir_bytes(path), "precision": "fp32", "parity": parity,
            "openvino": ov.__version__}


def quantize_openvino(bundle: str | Path, calibration: str | Path | None = None, *,
                      images: int = CALIBRATION_IMAGES) -> dict:
    """BUNDLE/model.openvino.xml -> BUNDLE/model.int8.openvino.xml with NNCF; recorded under export."""
    import nncf

    bundle = Path(bundle)
    meta, source, target, calibration_set, described = quantization_start(bundle, "openvino", calibration, images)
    dataset = nncf.Dataset([to_model_input(calibration_set[i:i + 1]) for i in range(len(calibration_set))])
    with quiet_nncf():
        quantized = nncf.quantize(ov.Core().read_model(str(source)), dataset, subset_size=len(calibration_set),
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
    with ir_replacing(target) as temporary:
        ov.save_model(quantized, str(temporary))
        judged, thresholds = judge_quantized(bundle, meta, OpenVinoEngine(source), OpenVinoEngine(temporary),
                                             calibration_set, described)
    settings = {"tool": f"nncf {nncf.__version__}", "preset": "performance (symmetric int8)",
                "weights": "int8 per-channel", "activations": "int8 per-tensor"}
    result = {"file": target.name, "bytes": ir_bytes(target), "float_bytes": ir_bytes(source), "settings": settings,
              **judged}
    return record_quantized(bundle, "openvino-int8", result, thresholds)


@contextlib.contextmanager
def quiet_nncf():
    """NNCF logs its steps and draws a progress bar (rich, on stdout); library code stays quiet."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def ir_replacing(path: Path):
    """`files.replacing` for an IR's pair of files: ov.save_model writes NAME.bin beside NAME.xml; on
    success the .bin lands first, then the .xml that reads it; on an error neither changes."""
    with files.replacing(path, suffix=".xml") as temporary:
        weights = temporary.with_suffix(".bin")
        try:
            yield temporary
            weights.replace(path.with_suffix(".bin"))
        finally:
            weights.unlink(missing_ok=True)


def ir_bytes(path: Path) -> int:
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size
