"""Bundle round trip and the errors a damaged or foreign bundle gives."""
import json

import numpy as np
import pytest
import torch

from effitune import bundle as bundles
from effitune.errors import UserError
from effitune.models.backbones import create_backbone
from effitune.models.network import Network
from effitune.predict import Predictor


def save_random_bundle(folder, classes=("a", "b", "c"), size=32):
    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", len(classes), pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    meta = {"classes": list(classes), "backbone": "tf_efficientnet_lite0",
            "preprocessing": {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3}}
    bundles.save_bundle(folder, network.state_dict(), meta)
    return network


def test_round_trip_same_logits(tmp_path):
    network = save_random_bundle(tmp_path / "model")
    predictor = Predictor(tmp_path / "model")
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = network(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(predictor.logits(images), expected, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".model*"))  # no staging folders left behind


def test_preprocessing_is_typed_and_reads_older_bundles(tmp_path):
    save_random_bundle(tmp_path / "model", size=40)  # size, mean and std only, as older bundles wrote
    prep = Predictor(tmp_path / "model").preprocessing
    assert prep == bundles.Preprocessing(40, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert prep.interpolation == "bicubic" and "center crop" in prep.resize
    written = prep.to_dict()
    assert json.loads(json.dumps(written)) == written and written["mean"] == [0.5] * 3
    assert bundles.Preprocessing.from_meta({"preprocessing": written}) == prep


def test_saving_over_an_existing_bundle_is_atomic(tmp_path):
    save_random_bundle(tmp_path / "model")
    save_random_bundle(tmp_path / "model", classes=("x", "y"))
    assert Predictor(tmp_path / "model").classes == ["x", "y"]


def test_not_a_bundle(tmp_path):
    with pytest.raises(UserError, match="not an effitune model bundle"):
        Predictor(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        Predictor(tmp_path / "nowhere")
    save_random_bundle(tmp_path / "run" / "model")
    with pytest.raises(UserError, match="is a run folder; its model bundle is .*model: pass that"):
        Predictor(tmp_path / "run")
    with pytest.raises(UserError, match="pass the folder that holds it"):
        Predictor(tmp_path / "run" / "model" / "effitune.json")


@pytest.mark.parametrize("version", ["2", None, 1.5, True, 0])
def test_a_bad_format_version_is_named_as_such(tmp_path, version):
    save_random_bundle(tmp_path / "model")
    bundles.update_meta(tmp_path / "model", format_version=version)
    with pytest.raises(UserError, match="'format_version' should be a whole number"):
        Predictor(tmp_path / "model")


def test_corrupted_weights(tmp_path):
    save_random_bundle(tmp_path / "model")
    weights = tmp_path / "model" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupted"):
        Predictor(tmp_path / "model")


def test_class_count_mismatch(tmp_path):
    save_random_bundle(tmp_path / "model")
    meta_path = tmp_path / "model" / "effitune.json"
    meta = json.loads(meta_path.read_text())
    meta["classes"] = ["a", "b", "c", "d"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit .* 4 classes"):
        Predictor(tmp_path / "model")


def test_newer_format_refused(tmp_path):
    save_random_bundle(tmp_path / "model")
    bundles.update_meta(tmp_path / "model", format_version=99)
    with pytest.raises(UserError, match="Upgrade effitune"):
        Predictor(tmp_path / "model")


@pytest.mark.parametrize("field, value, message", [
    (("classes",), "a,b,c", "'classes' should be a list of distinct class names"),
    ((), ["a", "b"], "damaged \\(a JSON object was expected\\)"),
    (("classes",), ["a", "a", "c"], "'classes' should be a list of distinct"),
    (("preprocessing", "size"), "32", "'preprocessing.size' should be the image side"),
    (("preprocessing", "std"), [0.5, 0, 0.5], "'preprocessing.std' should be a list of 3 positive numbers"),
    (("preprocessing", "mean"), None, "'preprocessing.mean' should be a list of 3 numbers"),
    (("temperature",), "1.2", "'temperature' should be a positive number"),
    (("preprocessing", "size"), float("nan"), "'preprocessing.size' should be the image side"),
    (("unknown",), {"score": "msp", "threshold": "high"}, "'unknown.threshold' should be a number"),
    (("embedding",), {"frozen_depth": 1.5}, "'embedding.frozen_depth' should be a whole number"),
])
def test_hand_edited_metadata_names_the_field(tmp_path, field, value, message):
    save_random_bundle(tmp_path / "model")
    meta_path = tmp_path / "model" / "effitune.json"
    meta = json.loads(meta_path.read_text())
    if field:
        parent = meta
        for key in field[:-1]:
            parent = parent[key]
        parent[field[-1]] = value
    meta_path.write_text(json.dumps(meta if field else value))
    with pytest.raises(UserError, match=message):
        Predictor(tmp_path / "model")


def test_a_missing_required_field_is_named(tmp_path):
    save_random_bundle(tmp_path / "model")
    meta_path = tmp_path / "model" / "effitune.json"
    meta = json.loads(meta_path.read_text())
    del meta["preprocessing"]["size"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lacks 'preprocessing.size'"):
        Predictor(tmp_path / "model")
