"""Unknown images and drift: calibration on synthetic arrays, then a tiny real bundle through the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_colour_dataset
from effitune import bundle as bundles
from effitune import drift, ood
from effitune.cli import app
from effitune.evaluate.unknown import evaluate_unknown
from effitune.models.backbones import create_backbone
from effitune.models.network import Network
from effitune.predict import Predictor
from test_bundle import save_random_bundle

runner = CliRunner()


def clusters(n_per_class: int, classes: int = 4, dim: int = 32, seed: int = 0, shift: float = 0.0):
    """(logits, features, labels): Gaussian class clusters; logits from a matching linear head."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (classes, dim)) * 3
    labels = np.repeat(np.arange(classes), n_per_class)
    features = centres[labels] + rng.normal(0, 1, (len(labels), dim)) + shift
    return (features @ centres.T / dim).astype(np.float32), features.astype(np.float32), labels


@pytest.fixture(scope="module")
def detector():
    _, train_features, train_labels = clusters(300, seed=1)
    val_logits, val_features, val_labels = clusters(250, seed=2)
    found = ood.UnknownDetector.fit(train_features, train_labels, val_logits, val_features, val_labels, 1.5,
                                    bank_size=600)
    ood.calibrate(found, val_logits, val_features, 0.9)
    return found, (val_logits, val_features)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99])
def test_threshold_keeps_the_target_share(target):
    scores = np.random.default_rng(0).normal(size=1000)
    assert (scores >= ood.threshold_for(scores, target)).mean() == pytest.approx(target, abs=0.01)


@pytest.mark.parametrize("n_val", [20, 45, 200])
def test_threshold_keeps_the_target_share_of_new_images_with_few_validation_images(n_val):
    """Averaged over many validation sets, a fresh known image is accepted with probability >= 95%."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    accepted = [norm.sf(ood.threshold_for(rng.normal(size=n_val), 0.95)) for _ in range(4000)]
    assert 0.95 <= np.mean(accepted) <= 0.95 + 1 / (n_val + 1) + 0.002  # the empirical quantile: ~0.95 - 1/(n+1)


def test_calibration_keeps_the_target_share_of_validation_for_every_score(detector):
    found, (val_logits, val_features) = detector
    val = found.scores(val_logits, val_features)
    assert set(val) == {"msp", "energy", "knn", "mahalanobis"}
    for name, values in val.items():
        kept = (values >= found.section["thresholds"][name]).mean()
        assert kept == pytest.approx(0.9, abs=0.01), name
    assert found.section["score"] == "knn" and found.section["val_tpr"] == pytest.approx(0.9, abs=0.01)
    # fresh images of the same distribution are accepted at about the same rate
    logits, features, _ = clusters(250, seed=3)
    assert (~found.is_unknown(found.score(logits, features))).mean() == pytest.approx(0.9, abs=0.04)


def test_feature_scores_separate_far_features(detector):
    found, (val_logits, val_features) = detector
    far_logits, far_features, _ = clusters(100, seed=4, shift=8.0)
    known, unknown = found.scores(val_logits, val_features), found.scores(far_logits, far_features)
    for name in ("knn", "mahalanobis"):
        assert ood.ood_metrics(known[name], unknown[name])["auroc"] > 0.99, name


def look_alikes(n: int, seed: int, dim: int = 32):
    """(logits, features): images of class 0 moved 2 units along one direction, a new class beside it."""
    logits, features, _ = clusters(n, classes=1, seed=seed)
    direction = np.random.default_rng(7).normal(size=dim)
    features = features + 2.0 * (direction / np.linalg.norm(direction)).astype(np.float32)
    return logits, features


def test_auto_picks_the_best_score_on_too_few_unknown_examples(detector):
    found, (val_logits, val_features) = detector
    examples = clusters(2, seed=5, shift=8.0)[:2]  # 8 examples: fewer than the probe needs
    section = ood.calibrate(found, val_logits, val_features, 0.9, "auto", examples)
    assert found.probe is None and "examples" not in section["thresholds"]
    assert section["score"] == max(section["example_auroc"], key=section["example_auroc"].get)
    assert section["n_unknown_examples"] == 8 and "probe needs 10" in section["selected_by"]
    ood.calibrate(found, val_logits, val_features, 0.9)  # back to the default for the other tests


def test_unknown_examples_teach_a_probe_that_rejects_look_alikes(detector, tmp_path):
    found, (val_logits, val_features) = detector
    before = found.scores(*look_alikes(100, seed=11))["knn"]
    section = ood.calibrate(found, val_logits, val_features, 0.9, "auto", look_alikes(60, seed=10))
    assert section["score"] == "examples" and "probe of 60 unknown examples" in section["selected_by"]
    assert "examples" not in section["example_auroc"]  # trained on them: its AUROC there would flatter it
    known = found.scores(val_logits, val_features)
    new_look_alikes = found.scores(*look_alikes(100, seed=11))  # other images of the same new class
    np.testing.assert_allclose(new_look_alikes["knn"], before)  # the other scores are untouched
    plain = {name: ood.ood_metrics(known[name], new_look_alikes[name])["auroc"] for name in known}
    assert max(plain[name] for name in ("knn", "mahalanobis")) < 0.85  # hard for the feature scores
    assert plain["examples"] > 0.94 and plain["examples"] > plain["knn"] + 0.1
    far = found.scores(*clusters(100, seed=4, shift=8.0)[:2])  # unlike the examples: the default's veto holds
    assert ood.ood_metrics(known["examples"], far["examples"])["auroc"] > 0.99
    assert section["val_tpr"] == pytest.approx(0.9, abs=0.01)
    fresh = found.score(*clusters(250, seed=3)[:2])  # the threshold still keeps new known images
    assert (~found.is_unknown(fresh)).mean() == pytest.approx(0.9, abs=0.04)
    found.save(tmp_path)
    loaded = ood.UnknownDetector.load(tmp_path, found.section)
    np.testing.assert_allclose(loaded.score(val_logits, val_features), found.score(val_logits, val_features),
                               rtol=1e-5, atol=1e-5)
    section = ood.calibrate(found, val_logits, val_features, 0.9)  # no examples: no probe, the default again
    assert found.probe is None and section["score"] == "knn" and "examples" not in found.available
    with pytest.raises(ood.UserError, match="needs at least 10 example images of no class"):
        ood.calibrate(found, val_logits, val_features, 0.9, "examples")
    ood.calibrate(found, val_logits, val_features, 0.9)


def test_saved_detector_scores_the_same(detector, tmp_path):
    found, (val_logits, val_features) = detector
    found.save(tmp_path)
    loaded = ood.UnknownDetector.load(tmp_path, found.section)
    for name, values in found.scores(val_logits, val_features).items():
        np.testing.assert_allclose(loaded.scores(val_logits, val_features)[name], values, rtol=1e-5, atol=1e-5)
    assert (tmp_path / ood.OOD_FILE).stat().st_size < 200_000


def with_prefix(parts, dim: int = 16, shift: float = 0.0, seed: int = 0):
    """(logits, [features | prefix features], labels): a second feature block, one cluster for every class."""
    logits, features, labels = parts
    prefix = np.random.default_rng(seed).normal(0, 1, (len(labels), dim)) + 3 + shift
    return logits, np.concatenate([features, prefix.astype(np.float32)], 1), labels


def test_knn_frozen_sees_unknowns_the_pooled_features_miss():
    _, train_features, train_labels = with_prefix(clusters(300, seed=1), seed=1)
    val_logits, val_features, val_labels = with_prefix(clusters(250, seed=2), seed=2)
    found = ood.UnknownDetector.fit(train_features, train_labels, val_logits, val_features, val_labels,
                                    bank_size=600, pooled_dim=32)
    section = ood.calibrate(found, val_logits, val_features, 0.9)
    assert section["score"] == "ensemble" and {"knn-frozen", "ensemble"} <= set(section["thresholds"])
    assert found.bank.shape[1] == 32 and found.prefix_bank.shape[1] == 16 and found.reference.shape[1] == 32
    assert found.section["val_tpr"] == pytest.approx(0.9, abs=0.01)
    # unknowns like the classes in the pooled features, far off in the frozen-prefix ones
    unknown_logits, unknown_features, _ = with_prefix(clusters(100, seed=4), shift=-6.0, seed=4)
    known, unknown = found.scores(val_logits, val_features), found.scores(unknown_logits, unknown_features)
    assert ood.ood_metrics(known["knn"], unknown["knn"])["auroc"] < 0.7
    assert ood.ood_metrics(known["knn-frozen"], unknown["knn-frozen"])["auroc"] > 0.99
    assert ood.ood_metrics(known["ensemble"], unknown["ensemble"])["auroc"] > 0.99  # knn-frozen's veto carries over
    # and far off in the pooled features only: still caught (the lower standardized score counts)
    far_logits, far_features, _ = with_prefix(clusters(100, seed=5, shift=8.0), seed=5)
    far = found.scores(far_logits, far_features)
    assert ood.ood_metrics(known["knn-frozen"], far["knn-frozen"])["auroc"] > 0.99
    assert ood.ood_metrics(known["ensemble"], found.score(far_logits, far_features))["auroc"] > 0.99
    with pytest.raises(ood.UserError, match="frozen-prefix columns"):
        found.score(val_logits, val_features[:, :40])


def test_ensemble_is_the_mean_of_its_standardized_parts_and_older_bundles_keep_knn_frozen(tmp_path):
    _, train_features, train_labels = with_prefix(clusters(100, seed=1), seed=1)
    val_logits, val_features, val_labels = with_prefix(clusters(100, seed=2), seed=2)
    found = ood.UnknownDetector.fit(train_features, train_labels, val_logits, val_features, val_labels, 1.5,
                                    bank_size=200, pooled_dim=32)
    ood.calibrate(found, val_logits, val_features, 0.9)
    test_logits, test_features, _ = with_prefix(clusters(30, seed=3, shift=1.0), seed=3)
    parts = found.scores(test_logits, test_features, ood.ENSEMBLE_PARTS)
    # standardized on validation: each part's validation median maps to 0 and its interquartile range to 1
    val_parts = found.scores(val_logits, val_features, ood.ENSEMBLE_PARTS)
    expected = np.mean([(parts[name] - np.median(val_parts[name])) / np.subtract(*np.percentile(val_parts[name], [75, 25]))
                        for name in ood.ENSEMBLE_PARTS], axis=0)
    np.testing.assert_allclose(found.score(test_logits, test_features), expected, rtol=1e-4, atol=1e-4)
    found.save(tmp_path)
    loaded = ood.UnknownDetector.load(tmp_path, found.section)
    np.testing.assert_allclose(loaded.score(test_logits, test_features), expected, rtol=1e-4, atol=1e-4)
    # a bundle fitted before the ensemble existed: knn-frozen stays its default, even when calibrated again
    loaded.ensemble_standardize = None
    assert "ensemble" not in loaded.available and loaded.default_score == "knn-frozen"
    section = ood.calibrate(loaded, val_logits, val_features, 0.9)
    assert section["score"] == "knn-frozen" and "ensemble needs" in section["selected_by"]


def test_knn_frozen_round_trips_and_is_refused_without_prefix_features(detector, tmp_path):
    _, train_features, train_labels = with_prefix(clusters(100, seed=1), seed=1)
    val_logits, val_features, val_labels = with_prefix(clusters(100, seed=2), seed=2)
    found = ood.UnknownDetector.fit(train_features, train_labels, val_logits, val_features, val_labels,
                                    bank_size=200, pooled_dim=32)
    ood.calibrate(found, val_logits, val_features, 0.9)
    found.save(tmp_path)
    loaded = ood.UnknownDetector.load(tmp_path, found.section)
    np.testing.assert_allclose(loaded.score(val_logits, val_features), found.score(val_logits, val_features),
                               rtol=1e-5, atol=1e-5)
    plain, (plain_logits, plain_features) = detector  # fitted on pooled features alone (older bundles)
    assert "knn-frozen" not in plain.available and plain.section["score"] == "knn"
    section = ood.calibrate(plain, plain_logits, plain_features, 0.9, "knn-frozen")  # e.g. every layer trained
    assert section["score"] == "knn" and "layers training left frozen" in section["selected_by"]
    ood.calibrate(plain, plain_logits, plain_features, 0.9)  # back to the default for the other tests
    with pytest.raises(ood.UserError, match="not a score"):
        ood.calibrate(plain, plain_logits, plain_features, 0.9, "knn-typo")


def test_knn_frozen_needs_enough_validation_images_to_standardize():
    _, train_features, train_labels = with_prefix(clusters(50, seed=1), seed=1)
    val_logits, val_features, val_labels = with_prefix(clusters(4, seed=2), seed=2)  # 16 validation images
    found = ood.UnknownDetector.fit(train_features, train_labels, val_logits, val_features, val_labels,
                                    bank_size=100, pooled_dim=32)
    section = ood.calibrate(found, val_logits, val_features, 0.9)
    assert found.standardize is None and section["score"] == "knn" and "validation images" in section["selected_by"]
    assert found.score(val_logits, val_features).shape == (16,)  # the pooled part alone is read


def test_stratified_sample_follows_the_class_mix():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    chosen = ood.stratified_sample(labels, 100)
    assert np.bincount(labels[chosen]).tolist() == [60, 30, 10]
    matched = ood.stratified_sample(labels, 1000, shares=np.array([1, 1, 1]) / 3)
    assert np.bincount(labels[matched]).tolist() == [100, 100, 100]


def test_mmd_permutation_test():
    rng = np.random.default_rng(0)
    same = ood.l2_normalize(rng.normal(size=(200, 16))), ood.l2_normalize(rng.normal(size=(200, 16)))
    shifted = ood.l2_normalize(rng.normal(size=(200, 16)) + 0.5)
    assert drift.mmd_permutation_test(*same)[1] > drift.ALPHA
    score, p_value, null = drift.mmd_permutation_test(shifted, same[1])
    assert p_value < drift.ALPHA and score > null


def test_drift_report_on_arrays(detector):
    found, _ = detector
    classes = list("abcd")
    held_out = drift.drift_report(found, classes, *clusters(100, seed=6)[:2])
    shifted = drift.drift_report(found, classes, *clusters(100, seed=7, shift=8.0)[:2])
    assert held_out["verdict"] == "no drift detected" and abs(held_out["drift_score"]) < 0.01
    assert shifted["verdict"] == "strong" and shifted["unknown_share"] > 0.9
    # the message says which test found it and quotes each test's own p-value
    assert held_out["message"].startswith("No drift detected: feature shift MMD^2")
    few = drift.drift_report(found, classes, *clusters(5, seed=6)[:2])
    assert few["verdict"] == "too few images to tell" and few["message"].startswith("Too few images to tell")
    assert shifted["message"].startswith("Strong drift: the features moved and more images look unknown.")
    assert f"(p = {shifted['p_value']:.3f})" in shifted["message"]
    assert f"(p = {shifted['unknown_p_value']:.3f})" in shifted["message"]
    assert [row["class"] for row in shifted["per_class"]] == classes


# --- a tiny real bundle: packaged ImageNet backbone, random head, statistics from colour images ----

def images_in(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    data = make_colour_dataset(root / "data", per_class=30, size=(40, 40))
    classes = sorted(p.name for p in data.iterdir())
    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", len(classes))
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    meta = {"classes": classes, "backbone": "tf_efficientnet_lite0",
            "preprocessing": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
            "embedding": {"frozen_depth": 3, "pooled_dim": 1280, "prefix_dim": 80}}  # as training writes it
    folder = bundles.save_bundle(root / "model", network.state_dict(), meta)
    predictor = Predictor(folder)
    parts = {}
    for name, remainder in (("train", 0), ("val", 1), ("held_out", 2)):
        chosen = [p for p in images_in(data) if int(p.stem.split("_")[-1]) % 3 == remainder]
        logits, features = predictor.run(np.stack([predictor.preprocess(p) for p in chosen]))
        parts[name] = (chosen, logits, features, np.array([classes.index(p.parent.name) for p in chosen]))
    assert parts["train"][2].shape[1] == 1280 + 80  # [pooled | pooled frozen prefix]
    ood.fit_and_attach(folder, 1.0, (parts["train"][2], parts["train"][3]), parts["val"][1:], target_tpr=0.95,
                       pooled_dim=predictor.pooled_dim)
    noise = root / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noise / f"noise_{i:02d}.png")
    held_out = root / "held_out"
    for path in parts["held_out"][0]:
        (held_out / path.parent.name).mkdir(parents=True, exist_ok=True)
        (held_out / path.parent.name / path.name).write_bytes(path.read_bytes())
    return folder, held_out, noise


def predict_json(*args) -> list[dict]:
    result = runner.invoke(app, ["predict", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_bundle_carries_the_unknown_section(tiny_bundle):
    folder, _, _ = tiny_bundle
    section = json.loads((folder / "effitune.json").read_text())["unknown"]
    assert section["score"] == "ensemble" and section["target_tpr"] == 0.95 and section["val_tpr"] >= 0.95
    assert (folder / ood.OOD_FILE).is_file()


def test_predict_json_reports_unknown_and_no_reject_keeps_the_class(tiny_bundle):
    folder, held_out, noise = tiny_bundle
    known_file, noise_file = images_in(held_out)[0], images_in(noise)[0]
    rejected = predict_json(folder, known_file, noise_file)
    keys = {"path", "label", "probability", "top_k", "unknown", "unknown_score", "score_name"}
    assert all(set(line) == keys for line in rejected)
    assert rejected[0]["unknown"] is False and rejected[0]["label"] is not None
    assert rejected[1]["unknown"] is True and rejected[1]["label"] is None and rejected[1]["score_name"] == "ensemble"
    kept = predict_json(folder, known_file, noise_file, "--no-reject")
    assert kept[1]["unknown"] is True and kept[1]["label"] == kept[1]["top_k"][0]["label"]
    assert [line["unknown_score"] for line in kept] == pytest.approx([line["unknown_score"] for line in rejected])


def test_ood_eval_json(tiny_bundle):
    folder, held_out, noise = tiny_bundle
    result = runner.invoke(app, ["ood-eval", str(folder), "--known", str(held_out), "--unknown", str(noise), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_unknown"] == 20 and set(report["scores"]) == set(ood.SCORES) - {"examples"}
    assert all(report["scores"][name]["auroc"] > 0.95 for name in ("knn", "knn-frozen", "ensemble"))
    assert {"fpr_at_95_tpr", "selective_accuracy", "known_accepted", "unknown_rejected"} <= set(report["scores"]["knn"])
    mixed = runner.invoke(app, ["ood-eval", str(folder), "--known", str(held_out), "--unknown", str(noise),
                                "--unknown", str(images_in(held_out)[0])])
    assert "warning: 1 of the unknown images are also known images" in " ".join(mixed.stderr.split())


def test_unknown_examples_travel_in_the_bundle_to_predict(tiny_bundle, tmp_path):
    import shutil

    folder, held_out, noise = tiny_bundle
    copy = shutil.copytree(folder, tmp_path / "model")
    predictor = Predictor(copy)
    known, noisy = images_in(held_out), images_in(noise)
    logits, features = predictor.run(np.stack([predictor.preprocess(p) for p in known]))
    labels = np.array([predictor.classes.index(p.parent.name) for p in known])
    examples = predictor.run(np.stack([predictor.preprocess(p) for p in noisy[:12]]))
    section = ood.fit_and_attach(copy, 1.0, (features, labels), (logits, features, labels), unknown=examples,
                                 pooled_dim=predictor.pooled_dim)
    assert section["score"] == "examples" and section["n_unknown_examples"] == 12
    lines = predict_json(copy, *noisy[12:])
    assert all(line["unknown"] and line["score_name"] == "examples" for line in lines)


@pytest.mark.parametrize("which, verdicts", [("held_out", {"no drift detected"}), ("noise", {"strong"})])
def test_drift_cli(tiny_bundle, which, verdicts):
    folder, held_out, noise = tiny_bundle
    result = runner.invoke(app, ["drift", str(folder), str({"held_out": held_out, "noise": noise}[which]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] in verdicts, report["message"]
    if which == "held_out":
        # 30 validation images set the threshold (bank of 30, k = 1): knn alone flags 5 of these 30, knn-frozen 6
        assert abs(report["drift_score"]) < 0.05 and report["unknown_share"] <= 0.25


def test_drift_without_statistics_is_a_clear_error(tmp_path):
    save_random_bundle(tmp_path / "model")
    result = runner.invoke(app, ["drift", str(tmp_path / "model"), str(tmp_path)])
    assert result.exit_code == 2 and "no unknown-image statistics" in result.output


def test_onnx_export_carries_the_frozen_prefix_features(tiny_bundle, tmp_path):
    import shutil

    from effitune.export import export_onnx

    folder, held_out, _ = tiny_bundle
    copy = shutil.copytree(folder, tmp_path / "model")
    images = np.stack([Predictor(copy).preprocess(p) for p in images_in(held_out)[:6]])
    export_onnx(copy, samples=images)
    torch_run, onnx_run = Predictor(copy, backend="torch"), Predictor(copy, backend="onnx")
    (torch_logits, torch_features), (onnx_logits, onnx_features) = torch_run.run(images), onnx_run.run(images)
    assert onnx_features.shape == torch_features.shape == (6, 1280 + 80)
    np.testing.assert_allclose(onnx_run.unknown.score(onnx_logits, onnx_features),
                               torch_run.unknown.score(torch_logits, torch_features), rtol=1e-3, atol=1e-3)
    from effitune.export.quantize import quantize_int8

    with pytest.warns(UserWarning, match="fp32 unknown-image thresholds"):  # no manifest.csv: no val to refit on
        result = quantize_int8(copy, held_out, images=12)  # INT8 reports whether unknown decisions survive it
    assert 0 <= result["unknown_agreement"] <= 1 and Predictor(copy, backend="int8").run(images)[1].shape[1] == 1360


def test_an_onnx_file_with_other_features_than_the_bundle_is_refused(tiny_bundle, tmp_path):
    import shutil

    from effitune.export import export_onnx

    folder, held_out, _ = tiny_bundle
    copy = shutil.copytree(folder, tmp_path / "model")
    export_onnx(copy, samples=np.stack([Predictor(copy).preprocess(p) for p in images_in(held_out)[:4]]))
    bundles.update_meta(copy, embedding={"frozen_depth": 2, "pooled_dim": 1280, "prefix_dim": 112})
    with pytest.raises(ood.UserError, match="Export it again"):
        Predictor(copy, backend="onnx")


@pytest.mark.parametrize("best, depth", [("stage1", 0), ("stage2-depth2", 2), ("stage2-all", None)])
def test_training_records_the_frozen_prefix_of_the_best_phase(best, depth):
    from effitune.pipeline import _embedding

    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3)
    phases = [{"phase": name, "best": name == best} for name in ("stage1", "stage2-depth2", "stage2-all")]
    embedding = _embedding(network, phases)
    if depth is None:  # every layer trained: nothing untouched to compare with
        assert embedding == {}
        return
    assert embedding["frozen_depth"] == depth
    network.frozen_depth = depth
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled, features = network.eval().embedding(images)
        expected = network.features(images), network.prefix(images, depth).mean((2, 3))
    assert features.shape[1] == embedding["pooled_dim"] + embedding["prefix_dim"]
    torch.testing.assert_close(pooled, expected[0])  # the pooled part is what the head sees
    torch.testing.assert_close(features, torch.cat(expected, 1))


def test_training_fits_the_ensemble_and_it_rejects_noise(tmp_path):
    """The default path end to end: train() records the frozen prefix, fits the ensemble, predict rejects noise."""
    import effitune

    data = make_colour_dataset(tmp_path / "data", per_class=50, size=(40, 40))
    config = effitune.load_config(overrides={"data.image_size": 32, "train.unfreeze": "1", "train.batch_size": 16,
                                             "train.stage1.epochs": 2, "train.stage2.epochs": 2})
    result = effitune.train(data, out=tmp_path / "run", config=config, progress=False,
                            cache_root=tmp_path / "cache")
    meta = bundles.read_meta(result.bundle)
    assert meta["unknown"]["n_val"] >= ood.MIN_STANDARDIZE and meta["unknown"]["score"] == "ensemble"
    depth = 1 if next(p["phase"] for p in meta["phases"] if p["best"]) == "stage2-depth1" else 0
    assert meta["embedding"]["frozen_depth"] == depth
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    report = evaluate_unknown(Predictor(result.bundle), tmp_path / "run" / "manifest.csv", [noise])
    assert report["score_used"] == "ensemble" and report["scores"]["ensemble"]["auroc"] > 0.9
