"""INT8 static quantization: calibrated on the run's training images, accuracy re-measured and recorded."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_onnx import copy_run, exported_run, images  # noqa: F401 - exported_run is a fixture

from effitune import bundle as bundles
from effitune.errors import UserError
from effitune.export.quantize import quantize_int8
from effitune.pipeline import calibrate_unknown
from effitune.predict import Predictor


@pytest.fixture(scope="module")
def quantized(exported_run, tmp_path_factory):
    bundle = copy_run(exported_run, tmp_path_factory.mktemp("int8") / "run", keep=("model.onnx",))
    return bundle, quantize_int8(bundle)


def test_int8_is_smaller_and_its_accuracy_is_recorded(quantized):
    bundle, result = quantized
    record = bundles.read_meta(bundle)["export"]["int8"]
    assert record == {**result, "weights_sha1": bundles.weights_fingerprint(bundle)}
    assert (bundle / "model.int8.onnx").stat().st_size == record["bytes"] < 0.4 * record["onnx_bytes"]
    assert record["calibration"] == {"images": 18, "source": "train split (manifest.csv)"}
    assert record["accuracy_images"] == 9 and 0 <= record["accuracy"] <= 1 and 0 <= record["onnx_accuracy"] <= 1
    assert record["drop_points"] == pytest.approx(100 * (record["onnx_accuracy"] - record["accuracy"]), abs=0.01)
    assert record["settings"]["weights"] == "int8 per-channel" and record["settings"]["float_nodes"] == []


def test_int8_backend_serves_predictions(quantized):
    bundle, _ = quantized
    predictor = Predictor(bundle, backend="int8")
    logits, features = predictor.run(images(3))
    assert logits.shape == (3, 3) and features.shape == (3, 1280) and np.isfinite(logits).all()


def test_int8_needs_the_fp32_export_first(exported_run, tmp_path):
    bundle = copy_run(exported_run, tmp_path / "run")
    with pytest.raises(UserError, match="model.onnx is missing"):
        quantize_int8(bundle)


def test_without_manifest_calibration_folder_is_required(exported_run, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(exported_run, lone, ignore=shutil.ignore_patterns("model.int8.onnx"))
    with pytest.raises(UserError, match="--calibration DIR"):
        quantize_int8(lone)
    result = quantize_int8(lone, exported_run.parent / "data" / "red", images=8)
    assert result["calibration"]["images"] == 8 and result["accuracy"] is None  # no labelled test split
    assert 0 <= result["top1_agreement"] <= 1 and (lone / "model.int8.onnx").is_file()


def test_export_int8_without_calibration_images_writes_nothing(exported_run, tmp_path):
    from effitune.export.onnx import export_onnx

    lone = tmp_path / "lone"
    shutil.copytree(exported_run, lone, ignore=shutil.ignore_patterns("model*.onnx"))
    with pytest.raises(UserError, match="--calibration DIR"):
        export_onnx(lone, int8=True, samples=exported_run.parent / "data")
    assert not list(lone.glob("*.onnx"))
    with pytest.raises(UserError, match="--calibration .*nowhere does not exist"):
        export_onnx(lone, int8=True, calibration=tmp_path / "nowhere")
    assert not list(lone.glob("*.onnx"))


def test_int8_calibrated_on_few_images_says_so(exported_run, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(exported_run, lone, ignore=shutil.ignore_patterns("model.int8.onnx"))
    with pytest.warns(UserWarning, match="calibrated on 2 image\\(s\\) only"):
        result = quantize_int8(lone, exported_run.parent / "data" / "red", images=2)
    assert result["calibration"]["images"] == 2 and (lone / "model.int8.onnx").is_file()


def test_int8_disagreeing_with_fp32_is_flagged(exported_run, tmp_path, monkeypatch):
    """Without a labelled test split the agreement with fp32 is the only check: a low one warns."""
    from effitune.export import quantize

    lone = tmp_path / "lone"
    shutil.copytree(exported_run, lone, ignore=shutil.ignore_patterns("model.int8.onnx"))
    monkeypatch.setattr(quantize, "WARN_AGREEMENT", 1.01)  # whatever it measures is "too low"
    with pytest.warns(UserWarning, match="picks another class than its float graph"):
        result = quantize_int8(lone, exported_run.parent / "data" / "red", images=8)
    assert "calibration images" in result["warning"] and (lone / "model.int8.onnx").is_file()


def test_int8_gets_unknown_thresholds_of_its_own(exported_run, tmp_path):
    """INT8 features sit a little apart from the fp32 bank: the thresholds are fitted again on its outputs."""
    from effitune.export.artifacts import manifest_images

    bundle = copy_run(exported_run, tmp_path / "run", keep=("model.onnx",))
    calibrate_unknown(bundle, bundle.parent / "manifest.csv")
    result = quantize_int8(bundle)
    meta = bundles.read_meta(bundle)
    section, fitted = meta["unknown"], meta["unknown"]["backend_thresholds"]["int8"]
    assert set(fitted) == set(section["thresholds"]) and 0 <= result["unknown_agreement"] <= 1
    int8, fp32 = Predictor(bundle, backend="int8"), Predictor(bundle, backend="onnx")
    assert int8.unknown.section["threshold"] == fitted[section["score"]]
    assert fp32.unknown.section["threshold"] == section["threshold"] and "threshold_backend" not in fp32.unknown.section
    val_images = manifest_images(bundle, meta, "val", None)[0]
    kept = ~int8.unknown.is_unknown(int8.unknown.score(*int8.run(val_images)))
    assert kept.mean() >= section["target_tpr"]  # the INT8 graph keeps the target share of validation images


def test_int8_thresholds_follow_the_graph_and_the_statistics(exported_run, tmp_path):
    bundle = copy_run(exported_run, tmp_path / "run", keep=("model.onnx",))
    manifest = bundle.parent / "manifest.csv"
    calibrate_unknown(bundle, manifest)
    quantize_int8(bundle)
    first = bundles.read_meta(bundle)["unknown"]["backend_thresholds"]["int8"]
    calibrate_unknown(bundle, manifest, target_tpr=0.8)  # new statistics: INT8's thresholds fitted again
    section = bundles.read_meta(bundle)["unknown"]
    assert section["target_tpr"] == 0.8 and section["backend_thresholds"]["int8"] != first
    lone = shutil.copytree(bundle, tmp_path / "lone")  # no manifest.csv beside it: no validation images
    with pytest.warns(UserWarning, match="fp32 unknown-image thresholds"):
        quantize_int8(lone, exported_run.parent / "data" / "red", images=8)
    assert "int8" not in bundles.read_meta(lone)["unknown"].get("backend_thresholds", {})  # not the old graph's
    assert Predictor(lone, backend="int8").unknown.section["threshold"] == section["threshold"]


def test_calibration_given_as_an_array_or_a_url_is_not_taken_for_a_missing_path():
    from effitune.export import quantize

    assert quantize._names_something(np.zeros((2, 8, 8, 3), np.uint8))
    assert quantize._names_something("s3://bucket/calibration/")
    assert not quantize._names_something("/nowhere/at/all")
