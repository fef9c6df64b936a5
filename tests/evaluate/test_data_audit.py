"""The model-assisted audit finds defects planted in a generated data set, and little else.

Features come from an untrained head on ImageNet-pretrained lite0 weights at 48 px: the audit only
needs features that separate the classes, not a trained classifier, and pretrained features tell
textures apart. Classes are textures in random colours (so colour is no shortcut). Planted: six
flipped labels, two images copied into another class, one class whose files all have another size,
and one outlier (a smooth photo-like image among textures).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import random_image
from effitune import bundle as bundles
from effitune.cli import app
from effitune.evaluate.data_audit import (audit_data, audit_features, find_label_issues, image_metadata,
                                          neighbours, shortcut_check)
from effitune.models.backbones import create_backbone
from effitune.models.network import Network

PATTERNS = {
    "checks": lambda x, y, period: np.sign(np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period)),
    "rings": lambda x, y, period: np.sin(2 * np.pi * np.hypot(x - x.mean(), y - y.mean()) / period),
    "stripes": lambda x, y, period: np.sin(2 * np.pi * y / period),
    "waves": lambda x, y, period: np.sin(2 * np.pi * (x + 3 * np.sin(2 * np.pi * y / (3 * period))) / period),
}
SIZE, ODD_SIZE = (48, 40), (64, 64)
FLIPS = [("checks", 0, "rings"), ("checks", 1, "waves"), ("rings", 2, "checks"), ("rings", 3, "waves"),
         ("waves", 4, "checks"), ("waves", 5, "rings")]
COPIES = [("checks", 6, "waves"), ("rings", 7, "checks")]
ODD = "stripes"


def texture(label: str, seed: int, size: tuple[int, int]) -> Image.Image:
    """One texture of its class: random two colours, period, rotation and phase, light noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(float)
    angle = rng.uniform(-0.4, 0.4)
    u = x * np.cos(angle) - y * np.sin(angle) + rng.uniform(0, 20)
    v = x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, 20)
    wave = PATTERNS[label](u, v, rng.uniform(5, 9))[..., None]
    first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = (0.5 + 0.5 * wave) * first + (0.5 - 0.5 * wave) * second + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_textures(root: Path, per_class: int = 24, odd: str | None = None, seed: int = 0) -> dict[str, list[Path]]:
    """PNG and JPEG alternating; class `odd` (if any) saved at another size."""
    written = {}
    for c, label in enumerate(PATTERNS):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        written[label] = []
        for i in range(per_class):
            path = folder / f"{label}_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
            texture(label, seed * 100_003 + 7919 * c + i, ODD_SIZE if label == odd else SIZE).save(path, quality=92)
            written[label].append(path)
    return written


def plant_defects(root: Path) -> dict:
    """Move FLIPS into the wrong class, copy COPIES into another class, add one photo-like outlier."""
    written = make_textures(root, odd=ODD)
    flipped, copied = {}, set()
    for label, index, wrong in FLIPS:
        source = written[label][index]
        target = root / wrong / f"flipped_{source.name}"
        shutil.move(source, target)
        flipped[str(target)] = label
    for label, index, other in COPIES:
        source = written[label][index]
        target = root / other / f"copy_{source.name}"
        shutil.copyfile(source, target)
        copied.add(frozenset({str(source), str(target)}))
    outlier = root / "rings" / "outlier.png"
    random_image(12345, SIZE).save(outlier)
    return {"flipped": flipped, "copied": copied, "copies": {p for pair in copied for p in pair},
            "outlier": str(outlier)}


def save_pretrained_bundle(folder: Path, classes: list[str], size: int = 48) -> Path:
    backbone, source = create_backbone("tf_efficientnet_lite0", len(classes))
    cfg = backbone.pretrained_cfg
    network = Network(backbone, tuple(cfg["mean"]), tuple(cfg["std"]))
    meta = {"classes": classes, "backbone": "tf_efficientnet_lite0", "weight_source": source,
            "preprocessing": {"size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"])}}
    return bundles.save_bundle(folder, network.state_dict(), meta)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    truth = plant_defects(root / "data")
    bundle = save_pretrained_bundle(root / "model", sorted(PATTERNS))
    return root, truth, bundle, audit_data(bundle, root / "data")


def test_flipped_labels_are_found_with_few_false_alarms(planted):
    _, truth, _, audit = planted
    flagged = {issue["path"] for issue in audit.label_issues}
    found = flagged & set(truth["flipped"])
    explained = set(truth["flipped"]) | truth["copies"] | {truth["outlier"]}
    false_alarms = flagged - explained
    print(f"label errors: recall {len(found)}/{len(truth['flipped'])}, false alarms {len(false_alarms)} "
          f"of {audit.n - len(explained)} clean images: {sorted(false_alarms)}")
    assert len(found) >= 5
    assert len(false_alarms) <= 2
    # the probe read ImageNet's features of the bundle's architecture, not the bundle's own
    assert audit.label_features.startswith("ImageNet features of tf_efficientnet_lite0") and "packaged" in audit.label_features
    for issue in audit.label_issues:
        if issue["path"] in truth["flipped"]:  # the suggestion names the class the image was taken from
            assert issue["suggested"] == truth["flipped"][issue["path"]]


def test_same_image_in_two_classes_is_a_cross_class_duplicate(planted):
    _, truth, _, audit = planted
    across = {frozenset({p["path_a"], p["path_b"]}) for p in audit.duplicates_across_classes}
    found = across & truth["copied"]
    print(f"cross-class duplicates: recall {len(found)}/{len(truth['copied'])}, "
          f"false alarms {len(across - truth['copied'])}")
    assert found == truth["copied"]
    assert len(across - truth["copied"]) == 0
    assert all(p["similarity"] > 0.999 for p in audit.near_duplicates
               if frozenset({p["path_a"], p["path_b"]}) in truth["copied"])


def test_a_class_with_its_own_image_size_is_a_shortcut(planted):
    _, _, _, audit = planted
    shortcut = audit.shortcut
    assert "image size" in shortcut["flagged"]
    assert next(iter(shortcut["groups"]["image size"]["separated"])) == ODD
    assert "file format" not in shortcut["flagged"] and "EXIF orientation" not in shortcut["flagged"]
    assert any(w.startswith("Shortcut: image size") and f"'{ODD}'" in w for w in audit.warnings)


def test_clean_sizes_raise_no_shortcut_alarm(tmp_path):
    written = make_textures(tmp_path / "data", per_class=20, seed=3)
    paths = [str(p) for label in written for p in written[label]]
    labels = np.array([i for i, label in enumerate(written) for _ in written[label]])
    result = shortcut_check(image_metadata(paths), labels, list(written))
    assert result["groups"]["image size"]["constant"]
    assert not {"image size", "file format", "EXIF orientation"} & set(result["flagged"])
    # varied sizes that do not follow the class: still no alarm
    rng = np.random.default_rng(0)
    metadata = [{**row, "width": int(w), "height": int(h), "aspect": w / h}
                for row, w, h in zip(image_metadata(paths), rng.integers(200, 900, len(paths)),
                                     rng.integers(200, 900, len(paths)))]
    assert "image size" not in shortcut_check(metadata, labels, list(written))["flagged"]


def test_outlier_ranks_first(planted):
    _, truth, _, audit = planted
    assert audit.outliers[0]["path"] == truth["outlier"]
    assert audit.outliers[0]["flagged"]
    print(f"outliers flagged: {len(audit.flagged_outliers)} (planted 1)")


def test_label_issue_rule_on_known_probabilities():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probabilities = np.array([[.9, .1], [.8, .2], [.1, .9], [.1, .9], [.3, .7], [.1, .9]])
    issues, thresholds = find_label_issues(probabilities, labels)
    assert np.allclose(thresholds, [(.9 + .8 + .1) / 3, (.9 + .7 + .9) / 3])
    assert [i["index"] for i in issues] == [2]  # only the one below its class and above the other's
    assert issues[0]["suggested"] == 1


def test_label_issues_come_least_likely_given_label_first():
    labels = np.repeat(np.arange(3), 40)
    probabilities = np.full((120, 3), 0.05)
    probabilities[np.arange(120), labels] = 0.9
    wrong = {5: 0.01, 50: 0.06, 90: 0.03}  # given-label probability of three mislabelled images
    for index, given in wrong.items():  # ... confidently of the next class
        probabilities[index] = 0.01
        probabilities[index, labels[index]] = given
        probabilities[index, (labels[index] + 1) % 3] = 0.99 - given
    issues, _ = find_label_issues(probabilities, labels)
    found = [issue["index"] for issue in issues]
    assert set(found) == set(wrong) and found == sorted(wrong, key=wrong.get)
    assert [issue["suggested"] for issue in issues] == [(labels[i] + 1) % 3 for i in found]


def test_label_errors_read_the_frozen_features_a_fine_tuned_model_cannot_bend():
    """A network fine-tuned on wrong labels pulls those images to the wrong class in its pooled features;
    the frozen layers still place them with their true class, and the probe reads those."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 60)
    given = truth.copy()
    flipped = np.array([3, 70, 130, 150])
    given[flipped] = (truth[flipped] + 1) % 3
    centres = rng.normal(0, 1, (3, 24)) * 4
    memorised = centres[given] + rng.normal(0, 1, (180, 24))  # trained features follow the given labels
    frozen = centres[truth][:, :16] + rng.normal(0, 1, (180, 16))  # untouched layers follow the content
    names = [f"class_{k}" for k in given]
    paths = [f"/data/{i}.png" for i in range(180)]
    plain = audit_features(memorised, names, paths)
    assert not {i["path"] for i in plain.label_issues} & {paths[i] for i in flipped}
    assert "trained pooled features" in plain.label_features
    audit = audit_features(memorised, names, paths, frozen_features=frozen)
    assert {paths[i] for i in flipped} <= {i["path"] for i in audit.label_issues}
    assert "frozen (16 dims)" in audit.label_features and "label_features" in audit.to_dict()


def test_neighbours_blocked_matches_brute_force(monkeypatch):
    from effitune.evaluate import neighbours as nearest

    monkeypatch.setattr(nearest, "_BLOCK", 7)  # many blocks, uneven last one
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 16)).astype(np.float32)
    features[5] = features[30] * 2  # same direction: cosine 1
    pairs, total, knn = neighbours(features, threshold=0.5, k=3)
    unit = features - features.mean(0)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    similarity = unit @ unit.T
    expected = {(i, j) for i in range(40) for j in range(i + 1, 40) if similarity[i, j] >= 0.5}
    assert {(a, b) for a, b, _ in pairs} == expected and total == len(expected)
    assert pairs[0][:2] == (5, 30)
    np.fill_diagonal(similarity, -np.inf)
    assert np.allclose(knn, 1 - np.sort(similarity, axis=1)[:, -3:].mean(axis=1), atol=1e-5)


def test_audit_without_enough_images_per_class_still_reports(tmp_path):
    features = np.random.default_rng(0).normal(size=(3, 8))
    audit = audit_features(features, ["a", "b", "b"], ["x", "y", "z"])
    assert audit.label_issues == [] and audit.out_of_fold_accuracy is None
    json.dumps(audit.to_dict())


def test_cli_audit_with_model(planted):
    root, truth, bundle, _ = planted
    result = CliRunner().invoke(app, ["audit", str(root / "data"), "--model", str(bundle), "--out",
                                      str(root / "scan"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["class_counts"]  # the file-level audit is still there
    model = report["model_audit"]
    assert len(set(truth["flipped"]) & {issue["path"] for issue in model["label_issues"]}) >= 5
    assert model["counts"]["near_duplicates_across_classes"] == len(truth["copied"])
    assert "image size" in model["shortcut"]["flagged"]


def test_the_label_probe_fits_on_a_bounded_sample(monkeypatch):
    """Each fold's probe fits on at most fit_rows rows (every class kept): its cost does not grow with n."""
    from effitune.evaluate import data_audit

    fitted = []
    original = data_audit._probe

    def counting(dims, train_size, seed):
        fitted.append(train_size)
        return original(dims, train_size, seed)

    monkeypatch.setattr(data_audit, "_probe", counting)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [400, 150, 50])
    features = rng.normal(size=(600, 8)) + 3 * np.eye(8)[labels]
    probabilities = data_audit.out_of_fold_probabilities(features, labels, fit_rows=120)
    assert fitted and max(fitted) <= 120 + 3
    assert probabilities.shape == (600, 3) and np.allclose(probabilities.sum(1), 1)
    assert (probabilities.argmax(1) == labels).mean() > 0.9  # still a working probe


def test_without_imagenet_weights_the_label_probe_says_what_it_read(planted, monkeypatch):
    from effitune.errors import EffituneWarning, UserError
    from effitune.models import pretrained

    def missing(*args, **kwargs):
        raise UserError("No ImageNet weights for this backbone offline.\nPass --weights FILE.")

    monkeypatch.setattr(pretrained, "load_pretrained", missing)
    root, _, bundle, _ = planted
    with pytest.warns(EffituneWarning, match=r"not at hand \(No ImageNet weights for this backbone offline\.\); the label-error probe reads"):
        audit = audit_data(bundle, root / "data")
    assert "ImageNet" not in audit.label_features and "trained pooled features" in audit.label_features
