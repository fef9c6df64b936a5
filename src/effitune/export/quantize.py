"""INT8 static quantization with ONNX Runtime: calibrated on training images, judged on the test split.

QDQ format, int8 per-channel weights, uint8 activations, MinMax calibration on ~200 class-stratified
training images. Measured on 2,000 images of Fashion-MNIST's official test part (96 px; fp32 ONNX ->
per-tensor / per-channel / per-channel with the stem conv kept in float):
lite0 (600/class) 0.890 -> 0.840 / 0.889 / 0.885; lite0 (150/class) 0.820 -> 0.746 / 0.829 / 0.821;
lite1 0.816 -> 0.767 / 0.810 / 0.814; lite2 0.796 -> 0.765 / 0.791 / 0.792.
Per-tensor weights lose 3-7 points (one scale cannot cover a depthwise conv's per-channel ranges);
per-channel stays within a point of fp32, and keeping the stem conv in float changes nothing beyond
noise, so everything is quantized by default. Lite models use ReLU6 (Clip): no Sigmoid/Swish to keep.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from .. import files
from ..bundle import Preprocessing, read_meta, update_meta
from ..errors import EffituneWarning, UserError
from ..ood import load_detector, thresholds_for
from ..runtime.batching import run_in_batches, to_model_input
from ..data.images import is_url
from ..runtime.engines import OnnxEngine, open_engine
from ..runtime import EXPORT_FILES, EXPORT_OPTIONS, QUANTIZED
from ..runtime.graph import INPUT
from .artifacts import as_images, manifest_images, record_export

CALIBRATION_IMAGES = 200
FEW_CALIBRATION_IMAGES = 32  # fewer: the INT8 file is written, with a warning
ACCURACY_IMAGES = 2000  # a test-split sample; enough to see a 1-point drop, small enough to stay quick
WARN_DROP_POINTS = 1.0
WARN_AGREEMENT = 0.97  # top-1 agreement with fp32 below which INT8 is flagged (the only check without labels)


def quantize_int8(bundle: str | Path, calibration: str | Path | None = None, *, images: int = CALIBRATION_IMAGES,
                  per_channel: bool = True, keep_stem_float: bool = False) -> dict:
    """BUNDLE/model.onnx -> BUNDLE/model.int8.onnx; records size and test accuracy under export.int8.

    Calibration images: `calibration` (a folder / files) when given, else the training split of the
    run's manifest.csv next to the bundle.
    """
    bundle = Path(bundle)
    meta, source, target, calibration_set, described = quantization_start(bundle, "onnx", calibration, images)
    with files.replacing(target) as temporary:
        settings = quantize_file(source, temporary, calibration_set, per_channel, keep_stem_float)
        judged, thresholds = judge_quantized(bundle, meta, OnnxEngine(source), OnnxEngine(temporary), calibration_set,
                                             described)
    result = {"file": target.name, "bytes": target.stat().st_size, "onnx_bytes": source.stat().st_size,
              "settings": settings, **judged, "onnx_accuracy": judged.get("float_accuracy")}
    return record_quantized(bundle, "int8", result, thresholds)


QUANTIZED_OF = {"onnx": "int8", "openvino": "openvino-int8", "tflite": "tflite-int8"}  # float backend -> INT8


def quantization_start(bundle: Path, float_backend: str, calibration, limit: int
                       ) -> tuple[dict, Path, Path, np.ndarray, str]:
    """What every INT8 export starts from: (meta, its float file, which must exist, the INT8 file to
    write, calibration images, where they come from)."""
    meta = read_meta(bundle)
    quantized = QUANTIZED_OF[float_backend]
    source, target = bundle / EXPORT_FILES[float_backend], bundle / EXPORT_FILES[quantized]
    if not source.is_file():
        raise UserError(f"{source} is missing: run `effitune export {bundle} {EXPORT_OPTIONS[quantized]}` (the float "
                        "model comes first: INT8 is made from it and judged against it).")
    return (meta, source, target, *calibration_images(bundle, meta, calibration, limit))


def judge_quantized(bundle: Path, meta: dict, float_engine, engine, calibration_set: np.ndarray,
                    described: str) -> tuple[dict, dict | None]:
    """What every INT8 export is judged on (ONNX Runtime, OpenVINO, LiteRT): accuracy on the test split
    against its float graph, top-1 agreement and the same unknown-image decisions, each graph with
    unknown-image thresholds of its own (fitted here on validation images). (result, thresholds)."""
    detector = load_detector(bundle, meta)
    thresholds = unknown_thresholds(bundle, meta, detector, engine)
    accuracy = compare(bundle, meta, float_engine, engine, calibration_set, detector, thresholds)
    result = {"calibration": {"images": len(calibration_set), "source": described}, **accuracy}
    warning = quantized_warning(accuracy, len(calibration_set))
    return ({**result, "warning": warning} if warning else result), thresholds


def record_quantized(bundle: Path, backend: str, result: dict, thresholds: dict | None) -> dict:
    """Once its file is in place: record an INT8 export under export.BACKEND, with its thresholds."""
    if result.get("warning"):
        warnings.warn(result["warning"], EffituneWarning, stacklevel=3)
    store_int8_thresholds(bundle, record_export(bundle, **{backend: result}), thresholds, backend)
    return result


def quantized_warning(accuracy: dict, calibration_images: int) -> str | None:
    parts = []
    if (accuracy.get("drop_points") or 0) > WARN_DROP_POINTS:
        parts.append(f"INT8 loses {accuracy['drop_points']:.1f} accuracy points against its float graph on "
                     f"{accuracy['accuracy_images']} test images (one image = "
                     f"{100 / accuracy['accuracy_images']:.2f} points); prefer the float graph where accuracy matters")
    elif accuracy["accuracy"] is None and accuracy["top1_agreement"] < WARN_AGREEMENT:
        parts.append(f"INT8 picks another class than its float graph for {1 - accuracy['top1_agreement']:.1%} of "
                     f"the {accuracy['agreement_images']}; prefer the float graph where accuracy matters, or "
                     "calibrate on more (and more typical) training images with --calibration")
    if calibration_images < FEW_CALIBRATION_IMAGES:
        parts.append(f"INT8 was calibrated on {calibration_images} image(s) only: its value ranges may not fit "
                     f"other images (and agreement measured on them says little); pass a folder of "
                     f"{CALIBRATION_IMAGES} or so typical training images with --calibration")
    return ". ".join(parts) or None


def refit_int8_thresholds(bundle: str | Path) -> dict | None:
    """After new unknown-image statistics: every INT8 graph's thresholds fitted again (the new `unknown`
    section), or None when the bundle has no INT8 graph."""
    bundle = Path(bundle)
    section = None
    for backend in QUANTIZED:
        if not (bundle / EXPORT_FILES[backend]).is_file():
            continue
        meta = read_meta(bundle)
        try:
            engine = open_engine(bundle, backend)
        except ImportError:  # its runtime is not installed here: it keeps no thresholds rather than stale ones
            engine = None
        thresholds = engine and unknown_thresholds(bundle, meta, load_detector(bundle, meta), engine)
        section = store_int8_thresholds(bundle, meta, thresholds, backend)
    return section


def store_int8_thresholds(bundle: Path, meta: dict, thresholds: dict | None, backend: str = "int8") -> dict | None:
    """Record an INT8 graph's thresholds, or none (an earlier graph's would no longer fit); the section."""
    section = meta.get("unknown")
    if section is None:
        return None
    fitted = {**section.get("backend_thresholds", {}), backend: thresholds}
    section = {**section, "backend_thresholds": {k: v for k, v in fitted.items() if v}}
    return update_meta(bundle, unknown=section)["unknown"]


def unknown_thresholds(bundle: Path, meta: dict, detector, engine, limit: int = 5000) -> dict | None:
    """Unknown-image thresholds for the INT8 graph, fitted on validation images as for fp32.

    Quantized features sit slightly apart from the fp32 training bank: on the demo model the fp32
    knn-frozen threshold kept 88% of known test images under INT8 instead of 95% (frozen-prefix
    similarities have a validation IQR of 0.016 and moved by 0.01). None: no statistics in the bundle,
    or no validation images (manifest.csv) to fit on; predictions then use the fp32 thresholds.
    """
    if detector is None:
        return None
    found = manifest_images(bundle, meta, "val", limit)
    if found is None:
        warnings.warn(f"no validation images next to {bundle} (manifest.csv): the INT8 graph uses the fp32 "
                      "unknown-image thresholds, which may reject a few more known images", EffituneWarning, stacklevel=3)
        return None
    return thresholds_for(detector.scores(*run_in_batches(engine, found[0], 32)), detector.section["target_tpr"])


def calibration_images(bundle: Path, meta: dict, calibration, limit: int) -> tuple[np.ndarray, str]:
    size = Preprocessing.from_meta(meta).size
    if calibration is not None:
        images = as_images(calibration, size)
        return images[np.random.default_rng(0).permutation(len(images))[:limit]], str(calibration)
    found = manifest_images(bundle, meta, "train", limit)
    if found is None:
        raise no_calibration(bundle)
    return found[0], "train split (manifest.csv)"


def export_start(bundle: str | Path, int8: bool, calibration) -> tuple[Path, dict]:
    """(bundle folder, its meta); an INT8 export without calibration images is refused before any work."""
    bundle = Path(bundle)
    meta = read_meta(bundle)
    if int8:
        require_calibration(bundle, meta, calibration)
    return bundle, meta


def require_calibration(bundle: Path, meta: dict, calibration) -> None:
    """Refuse an INT8 export before anything is written when it will have no calibration images."""
    if calibration is None and manifest_images(bundle, meta, "train", 16) is None:
        raise no_calibration(bundle)
    if calibration is not None and not _names_something(calibration):
        raise UserError(f"--calibration {calibration} does not exist. Pass a folder (or files) of typical training "
                        "images.")


def _names_something(sources) -> bool:
    """A calibration folder, file or glob pattern that names something (arrays and URLs are not checked here)."""
    import glob

    if isinstance(sources, np.ndarray):
        return True
    return any(is_url(source) or Path(source).exists() or glob.glob(str(source)) for source in
               ([sources] if isinstance(sources, (str, Path)) else sources))


def no_calibration(bundle: Path) -> UserError:
    return UserError(f"INT8 calibration needs training images, and {bundle.parent / 'manifest.csv'} (the run's "
                     "manifest) is not there or its images are gone. Pass --calibration DIR with a few hundred "
                     "training images.")


def quantize_file(source: Path, target: Path, images: np.ndarray, per_channel: bool, keep_stem_float: bool) -> dict:
    model = onnx.load(source)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]  # graph order is topological
    float_nodes = convs[:1] if keep_stem_float else []
    with quiet_root_logger():  # "consider pre-processing": measured, it changes nothing here
        quantize_static(model, target, BatchReader(images), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=float_nodes, calibrate_method=CalibrationMethod.MinMax)
    return {"format": "QDQ", "weights": "int8 " + ("per-channel" if per_channel else "per-tensor"),
            "activations": "uint8", "calibration": "minmax", "float_nodes": float_nodes}


@contextlib.contextmanager
def quiet_root_logger():
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


class BatchReader(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in small batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.batches = iter([{INPUT: to_model_input(images[i:i + batch_size])}
                             for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def compare(bundle: Path, meta: dict, fp32, int8, fallback: np.ndarray, detector=None,
            int8_thresholds: dict | None = None) -> dict:
    """Test accuracy of the float graph vs its INT8 one on the same images (top-1 agreement only without
    labels); any two engines."""
    found = manifest_images(bundle, meta, "test", ACCURACY_IMAGES)
    images = found[0] if found is not None else fallback
    out_fp32, out_int8 = run_in_batches(fp32, images, 32), run_in_batches(int8, images, 32)
    logits_fp32, logits_int8 = out_fp32[0], out_int8[0]
    agreement = {"top1_agreement": float((logits_fp32.argmax(1) == logits_int8.argmax(1)).mean())}
    if detector is not None and len(images):  # each graph with its own thresholds: same decisions?
        name = detector.score_name
        fp32_unknown = detector.is_unknown(detector.score(*out_fp32))
        int8_threshold = (int8_thresholds or detector.section["thresholds"])[name]
        agreement["unknown_agreement"] = float((fp32_unknown == (detector.score(*out_int8) < int8_threshold)).mean())
    if found is None:
        return {"accuracy": None, **agreement, "agreement_images": "calibration images"}
    labels = found[1]
    accuracy_fp32 = float((logits_fp32.argmax(1) == labels).mean())
    accuracy_int8 = float((logits_int8.argmax(1) == labels).mean())
    return {"accuracy": accuracy_int8, "float_accuracy": accuracy_fp32,
            "drop_points": round(100 * (accuracy_fp32 - accuracy_int8), 2), "accuracy_images": len(labels),
            **agreement, "agreement_images": "test split (manifest.csv)"}
