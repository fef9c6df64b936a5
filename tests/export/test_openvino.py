"""OpenVINO export: an IR built from the parity-checked ONNX graph, NNCF's INT8, both served and measured."""
from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
from test_onnx import copy_run, exported_run, first_image, images  # noqa: F401 - exported_run is a fixture

from effitune import bundle as bundles
from effitune.errors import UserError
from effitune.export import benchmark, export
from effitune.export import openvino as openvino_export
from effitune.export.artifacts import manifest_images
from effitune.pipeline import calibrate_unknown
from effitune.predict import Predictor


@pytest.fixture(scope="module")
def openvino_run(exported_run, tmp_path_factory):
    """The session's run with unknown-image statistics, exported to OpenVINO fp32 + INT8 (from its model.onnx)."""
    bundle = copy_run(exported_run, tmp_path_factory.mktemp("openvino") / "run", keep=("model.onnx",))
    calibrate_unknown(bundle, bundle.parent / "manifest.csv")
    return bundle, export(bundle, "openvino", int8=True)


def test_the_ir_is_checked_recorded_and_carries_the_preprocessing(openvino_run):
    bundle, results = openvino_run
    assert set(results) == {"openvino", "openvino-int8"}  # model.onnx was current: not exported again
    record = bundles.read_meta(bundle)["export"]["openvino"]
    parity = record["parity"]
    assert parity["passed"] and parity["images"] == "test-split images" and parity["max_abs_logit_diff"] < 1e-3
    xml, weights = bundle / "model.openvino.xml", bundle / "model.openvino.bin"
    assert record["bytes"] == xml.stat().st_size + weights.stat().st_size
    assert record["weights_sha1"] == bundles.weights_fingerprint(bundle)
    model = ov.Core().read_model(str(xml))
    assert json.loads(model.get_rt_info(["effitune", "classes"]).astype(str)) == ["blue", "green", "red"]
    assert json.loads(model.get_rt_info(["effitune", "size"]).astype(str)) == 32
    assert not list(bundle.glob(".*"))  # no temporary left


def test_openvino_backends_give_pytorchs_answers(openvino_run):
    bundle, _ = openvino_run
    batch = images(5)
    torch_logits, torch_features = Predictor(bundle, backend="torch").run(batch)
    float_ir = Predictor(bundle, backend="openvino")
    logits, features = float_ir.run(batch)
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(features, torch_features, atol=1e-3, rtol=1e-3)
    int8_logits, int8_features = Predictor(bundle, backend="openvino-int8").run(batch)
    assert int8_logits.shape == (5, 3) and int8_features.shape == features.shape
    assert np.corrcoef(int8_features.ravel(), features.ravel())[0, 1] > 0.9  # quantized, not another model


def test_int8_ir_is_smaller_judged_on_the_test_split_and_keeps_known_images(openvino_run):
    bundle, results = openvino_run
    meta = bundles.read_meta(bundle)
    record = meta["export"]["openvino-int8"]
    assert record["bytes"] < 0.4 * record["float_bytes"] and record["accuracy_images"] == 9
    assert record["drop_points"] == pytest.approx(100 * (record["float_accuracy"] - record["accuracy"]), abs=0.01)
    assert 0 <= record["top1_agreement"] <= 1 and 0 <= record["unknown_agreement"] <= 1
    section = meta["unknown"]
    fitted = section["backend_thresholds"]["openvino-int8"]
    predictor = Predictor(bundle, backend="openvino-int8")
    assert predictor.unknown.section["threshold"] == fitted[section["score"]]
    val_images = manifest_images(bundle, meta, "val", None)[0]
    kept = ~predictor.unknown.is_unknown(predictor.unknown.score(*predictor.run(val_images)))
    assert kept.mean() >= section["target_tpr"]  # its own thresholds keep the target share of known images


def test_a_disagreeing_ir_is_refused_and_nothing_is_left(exported_run, tmp_path, monkeypatch):
    bundle = copy_run(exported_run, tmp_path / "run", keep=("model.onnx",))

    class Broken(openvino_export.OpenVinoEngine):  # a 1% error in the logits: what a broken kernel might do
        def run(self, batch):
            logits, features = super().run(batch)
            return logits * np.float32(1.01) + np.float32(0.01), features

    monkeypatch.setattr(openvino_export, "OpenVinoEngine", Broken)
    with pytest.raises(UserError, match="model.openvino.xml not written: OpenVINO disagrees with PyTorch"):
        export(bundle, "openvino")
    assert sorted(p.name for p in bundle.iterdir()) == ["effitune.json", "model.onnx", "weights.safetensors"]
    assert "openvino" not in bundles.read_meta(bundle).get("export", {})


def test_without_a_current_onnx_graph_it_is_exported_first(openvino_run, tmp_path):
    bundle, _ = openvino_run
    lone = copy_run(bundle, tmp_path / "run")  # no model.onnx, no export record
    results = export(lone, "openvino")
    assert set(results) == {"onnx", "openvino"} and (lone / "model.onnx").is_file()
    assert Predictor(lone, backend="openvino").backend == "openvino"


def test_a_foreign_or_stale_ir_is_refused(openvino_run, tmp_path):
    bundle, _ = openvino_run
    foreign = copy_run(bundle, tmp_path / "run")
    for name in ("model.openvino.xml", "model.openvino.bin"):
        (foreign / name).write_bytes((bundle / name).read_bytes())
    with pytest.raises(UserError, match="not recorded in .*copied from another bundle"):
        Predictor(foreign, backend="openvino")
    assert Predictor(foreign).backend == "torch"  # auto never picks an IR by itself
    stale = copy_run(bundle, tmp_path / "stale", keep=("model.openvino.xml", "model.openvino.bin"))
    state = bundles.read_weights(stale)
    state = {name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    ir = {name: stale / name for name in ("model.openvino.xml", "model.openvino.bin")}
    bundles.save_bundle(stale, state, bundles.read_meta(stale), extra_files=ir)  # re-trained: IR of other weights
    with pytest.raises(UserError, match="exported from other weights"):
        Predictor(stale, backend="openvino")


def test_benchmark_rows_for_each_ir(openvino_run):
    bundle, _ = openvino_run
    rows = {row["backend"]: row for row in benchmark([bundle], runs=2, warmup=1, batch_size=4)}
    assert {"torch", "onnx", "openvino", "openvino-int8"} <= set(rows)
    record = bundles.read_meta(bundle)["export"]
    assert rows["openvino"]["bytes"] == record["openvino"]["bytes"]
    assert rows["openvino"]["accuracy"] == record["openvino-int8"]["float_accuracy"]
    assert rows["openvino-int8"]["accuracy"] == record["openvino-int8"]["accuracy"]
    assert all(row["latency_p50_ms"] > 0 for row in rows.values())


def test_fp16_and_unknown_formats_are_refused_with_the_choices(exported_run):
    with pytest.raises(UserError, match="--fp16 is for --format onnx"):
        export(exported_run, "openvino", fp16=True)
    with pytest.raises(UserError, match="Unknown export format 'coreml'. Choose one of: onnx, openvino, tflite"):
        export(exported_run, "coreml")


def test_served_over_http_from_the_int8_ir(openvino_run):
    from fastapi.testclient import TestClient

    from effitune.serve import create_app

    bundle, _ = openvino_run
    image = first_image(bundle)
    predictor = Predictor(bundle, backend="openvino-int8")
    with TestClient(create_app(predictor)) as client:
        response = client.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))])
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    direct = predictor.predict([image])[0]
    assert result["label"] == direct["label"]
    assert result["probability"] == pytest.approx(direct["probability"], abs=1e-6)
