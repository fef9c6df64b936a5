"""LiteRT (TFLite) export: converted by litert-torch, float and full-integer INT8, each checked, served and measured.

One conversion of each kind per module (`tflite_run`, through the CLI); the refusal tests reuse its bytes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_onnx import copy_run, exported_run, first_image, images  # noqa: F401 - exported_run is a fixture
from typer.testing import CliRunner

from effitune import bundle as bundles
from effitune.cli import app
from effitune.errors import UserError
from effitune.export import benchmark, export
from effitune.export import tflite as tflite_export
from effitune.export.artifacts import manifest_images
from effitune.pipeline import calibrate_unknown
from effitune.predict import Predictor
from effitune.runtime.engines import LiteRtEngine


@pytest.fixture(scope="module")
def tflite_run(exported_run, tmp_path_factory):
    """The session's run with unknown-image statistics, exported by `effitune export --format tflite --int8`."""
    bundle = copy_run(exported_run, tmp_path_factory.mktemp("tflite") / "run")
    calibrate_unknown(bundle, bundle.parent / "manifest.csv")
    result = CliRunner().invoke(app, ["export", str(bundle), "--format", "tflite", "--int8", "--json"])
    assert result.exit_code == 0, result.output
    return bundle, json.loads(result.stdout)


def test_float_model_is_checked_recorded_and_carries_the_preprocessing(tflite_run):
    bundle, results = tflite_run
    assert set(results) == {"tflite", "tflite-int8"}
    record = bundles.read_meta(bundle)["export"]["tflite"]
    assert record["parity"]["passed"] and record["parity"]["max_abs_logit_diff"] < 1e-3
    assert record["parity"]["images"] == "test-split images"
    assert record["bytes"] == (bundle / "model.tflite").stat().st_size
    for name in ("model.tflite", "model.int8.tflite"):
        carried = tflite_export.read_metadata(bundle / name)
        assert carried["classes"] == ["blue", "green", "red"] and carried["size"] == 32 and carried["mean"] == [0.5] * 3
    assert not list(bundle.glob(".*"))  # no temporary left


def test_phone_layout_float_and_full_integer(tflite_run):
    bundle, _ = tflite_run
    float_model, int8_model = LiteRtEngine(bundle / "model.tflite"), LiteRtEngine(bundle / "model.int8.tflite")
    assert float_model.input["shape"].tolist() == [1, 32, 32, 3] and float_model.input["dtype"] == np.float32
    assert int8_model.input["dtype"] == np.int8  # full integer: the Edge TPU / NNAPI case
    assert {d["dtype"] for d in int8_model.interpreter.get_output_details()} == {np.int8}
    assert (float_model.logit_width, float_model.feature_width) == (3, 1280)


def test_litert_backends_give_pytorchs_answers(tflite_run):
    bundle, _ = tflite_run
    batch = images(5)  # more than the exported batch of 1: the input is resized
    torch_logits, torch_features = Predictor(bundle, backend="torch").run(batch)
    logits, features = Predictor(bundle, backend="tflite").run(batch)
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(features, torch_features, atol=1e-3, rtol=1e-3)
    one_logits, _ = Predictor(bundle, backend="tflite").run(batch[:1])
    np.testing.assert_allclose(one_logits, torch_logits[:1], atol=1e-4, rtol=1e-4)
    int8_logits, int8_features = Predictor(bundle, backend="tflite-int8").run(batch)
    assert int8_logits.shape == (5, 3) and np.isfinite(int8_logits).all()
    assert np.corrcoef(int8_features.ravel(), features.ravel())[0, 1] > 0.9  # quantized, not another model


def test_int8_is_smaller_judged_and_has_thresholds_of_its_own(tflite_run):
    bundle, results = tflite_run
    meta = bundles.read_meta(bundle)
    record = meta["export"]["tflite-int8"]
    assert record == {**results["tflite-int8"], "weights_sha1": bundles.weights_fingerprint(bundle)}
    assert record["bytes"] < 0.4 * record["float_bytes"] and record["accuracy_images"] == 9
    assert 0 <= record["top1_agreement"] <= 1 and 0 <= record["unknown_agreement"] <= 1
    section = meta["unknown"]
    predictor = Predictor(bundle, backend="tflite-int8")
    assert predictor.unknown.section["threshold"] == section["backend_thresholds"]["tflite-int8"][section["score"]]
    val_images = manifest_images(bundle, meta, "val", None)[0]
    kept = ~predictor.unknown.is_unknown(predictor.unknown.score(*predictor.run(val_images)))
    assert kept.mean() >= section["target_tpr"]


def test_a_disagreeing_model_is_refused_and_nothing_is_left(tflite_run, tmp_path, monkeypatch):
    bundle, _ = tflite_run
    fresh = copy_run(bundle, tmp_path / "run")
    converted = (bundle / "model.tflite").read_bytes()
    monkeypatch.setattr(tflite_export, "convert", lambda bundle, meta, calibration=None: converted)

    class Broken(LiteRtEngine):  # a 1% error in the logits: what a broken kernel might do
        def run(self, batch):
            logits, features = super().run(batch)
            return logits * np.float32(1.01) + np.float32(0.01), features

    monkeypatch.setattr(tflite_export, "LiteRtEngine", Broken)
    with pytest.raises(UserError, match="model.tflite not written: LiteRT disagrees with PyTorch"):
        export(fresh, "tflite")
    assert not list(fresh.glob("*.tflite")) and not list(fresh.glob(".*"))  # no file, no temporary
    assert "tflite" not in bundles.read_meta(fresh).get("export", {})


def test_a_missing_file_names_the_export_and_int8_needs_calibration(tflite_run, tmp_path):
    bundle, _ = tflite_run
    fresh = copy_run(bundle, tmp_path / "run")
    with pytest.raises(UserError, match="--format tflite --int8"):
        Predictor(fresh, backend="tflite-int8")
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("effitune.json", "weights.safetensors"):
        (lone / name).write_bytes((fresh / name).read_bytes())
    with pytest.raises(UserError, match="--calibration DIR"):
        export(lone, "tflite", int8=True)  # refused before any conversion
    assert sorted(p.name for p in lone.iterdir()) == ["effitune.json", "weights.safetensors"]


def test_benchmark_rows_for_each_model(tflite_run):
    bundle, _ = tflite_run
    rows = {row["backend"]: row for row in benchmark([bundle], runs=2, warmup=1, batch_size=4)}
    assert {"torch", "tflite", "tflite-int8"} <= set(rows)
    record = bundles.read_meta(bundle)["export"]
    assert rows["tflite"]["accuracy"] == record["tflite-int8"]["float_accuracy"]
    assert rows["tflite-int8"]["bytes"] == record["tflite-int8"]["bytes"]


def test_predict_cli_runs_the_litert_model(tflite_run):
    bundle, _ = tflite_run
    image = first_image(bundle)
    result = CliRunner().invoke(app, ["predict", str(bundle), str(image), "--backend", "tflite", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.splitlines()[0])
    assert line["label"] == Predictor(bundle, backend="torch").predict([image])[0]["label"]
