"""Model-assisted data audit: what a model's features say about the labels and the images.

The file-level audit (`data/audit.py`) sees bytes and hashes; this one sees what the network sees:

- likely label errors, by cleanlab's confident learning (Northcutt et al., 2021; `filter_by=
  "prune_by_noise_rate"`), ranked by self-confidence so the list is worth reading from the top:
  out-of-fold probabilities from a logistic regression on features that never learned the labels. A
  network fine-tuned on the labels memorises its own flipped training images. `audit --model` reads
  the bundle's architecture with its ImageNet weights (`imagenet_features`: one more pass); the report
  written after training reads the bundle's frozen-prefix part, already computed (weaker when training
  unfroze deep: only low-level layers stay frozen);
- near duplicates: cosine similarity of the features, from a nearest-neighbour index (linear in n);
- outliers: mean cosine distance to the k nearest neighbours, from the same index;
- shortcuts: how well image metadata alone (size, format, EXIF orientation, file size, mean colour)
  predicts the class. A model can learn "class X is the 640x480 PNGs" as happily as the content.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from threadpoolctl import threadpool_limits
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..data.audit import _paths_table  # the file-level audit's tables: one look for both
from ..data.scan import printable
from ..errors import EffituneWarning, UserError
from . import neighbours as nearest

SIMILARITY = 0.97  # cosine similarity above which two images count as near duplicates
_IDENTICAL = 0.995  # ... and above which they are, for the model, the same picture
NEIGHBOURS = 5
_MAX_PAIRS = 10_000  # near-duplicate pairs kept (the most similar); the count covers them all
_FOLDS = 5
_PCA_DIMS = 128  # the label-error model sees at most this many principal components
PROBE_FIT_ROWS = 20_000  # rows each fold's probe fits on: its time stays bounded as the data grows
# Metadata groups for the shortcut check. "capture" ones say nothing about the content, so a class
# they predict is a pipeline artefact; "content" ones partly follow the content itself.
SHORTCUT_GROUPS = {
    "image size": ("capture", ("width", "height", "aspect")),
    "file format": ("capture", ("format",)),
    "EXIF orientation": ("capture", ("orientation",)),
    "file size": ("content", ("log_bytes", "bytes_per_pixel")),
    "mean colour": ("content", ("mean_r", "mean_g", "mean_b")),
}
_LIFT_ALERT = 0.3  # (accuracy - majority) / (1 - majority) from metadata alone
_SEPARATION_ALERT = 0.8  # a class's TPR - FPR (Youden's J) from metadata alone
_MIN_SUPPORT = 5


# ----------------------------------------------------------------------------------- label errors
def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = _FOLDS,
                              seed: int = 0, fit_rows: int | None = None) -> np.ndarray | None:
    """(n, classes) probabilities, each row from a model that never saw that image; None if too few.

    Each fold's probe fits on at most `fit_rows` (default `PROBE_FIT_ROWS`) of the other folds' rows,
    drawn per class: its cost is then bounded, and only the predictions grow with n.
    """
    from sklearn.model_selection import StratifiedKFold

    smallest = np.bincount(labels).min() if len(labels) else 0
    folds = min(folds, int(smallest))
    if folds < 2 or len(np.unique(labels)) < 2:
        return None
    fit_rows = fit_rows or PROBE_FIT_ROWS
    classes = int(labels.max()) + 1
    probabilities = np.zeros((len(labels), classes))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    with threadpool_limits(1):  # small dense problems: extra BLAS threads only contend (10-40x slower seen)
        for train, held_out in splitter.split(features, labels):
            train = _stratified_subset(train, labels, fit_rows, rng)
            model = _probe(features.shape[1], len(train), seed).fit(features[train], labels[train])
            probabilities[np.ix_(held_out, model.classes_)] = model.predict_proba(features[held_out])
    return probabilities


def _probe(dims: int, train_size: int, seed: int):
    """Cosine geometry (unit rows), then the leading components only: at most half as many as the
    training images, and never whitened, or the probe fits noise and its probabilities saturate."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    components = max(1, min(_PCA_DIMS, dims, train_size // 2))
    return make_pipeline(Normalizer(), PCA(components, random_state=seed), LogisticRegression(C=1.0, max_iter=2000))


def _stratified_subset(rows: np.ndarray, labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` of `rows`, each class keeping its share (and at least one row)."""
    if len(rows) <= limit:
        return rows
    kept = []
    for k in np.unique(labels[rows]):
        members = rows[labels[rows] == k]
        share = max(1, round(limit * len(members) / len(rows)))
        kept.append(rng.choice(members, size=min(share, len(members)), replace=False))
    return np.sort(np.concatenate(kept))


def find_label_issues(probabilities: np.ndarray, labels: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """cleanlab's label issues: ([{index, suggested, self_confidence, ...}], per-class thresholds).

    Which images: `cleanlab.filter.find_label_issues(filter_by="prune_by_noise_rate")`, the confident
    joint's estimate of how many labels of each class are wrong, the least likely ones pruned. Sorted
    most suspicious first, by self-confidence (the probability of the given label: cleanlab's
    `get_label_quality_scores(method="self_confidence")`); it ranked planted errors best on
    Fashion-MNIST (precision among the first N: 0.81 vs 0.55 by the margin to the next class).
    The thresholds are confident learning's per-class ones (mean self-confidence), for the report.
    """
    from cleanlab.filter import find_label_issues as cleanlab_issues

    classes = probabilities.shape[1]
    thresholds = np.array([probabilities[labels == k, k].mean() if (labels == k).any() else 1.0
                           for k in range(classes)])
    self_confidence = probabilities[np.arange(len(labels)), labels]
    flagged = np.flatnonzero(cleanlab_issues(labels, probabilities, filter_by="prune_by_noise_rate", n_jobs=1))
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1.0
    issues = []
    for i in flagged[np.argsort(self_confidence[flagged], kind="stable")]:
        k = int(others[i].argmax())
        issues.append({"index": int(i), "suggested": k, "self_confidence": float(self_confidence[i]),
                       "threshold": float(thresholds[labels[i]]), "suggested_probability": float(probabilities[i, k]),
                       "margin": float(self_confidence[i] - probabilities[i, k])})
    return issues, thresholds


# ------------------------------------------------------------------- neighbours in feature space
def neighbours(features: np.ndarray, threshold: float = SIMILARITY, k: int = NEIGHBOURS,
               max_pairs: int = _MAX_PAIRS, device: str = "cpu") -> tuple[list[tuple[int, int, float]], int, np.ndarray]:
    """(pairs i<j with cosine similarity >= threshold, most similar first; their total count;
    each row's mean cosine distance to its k nearest other rows), from centred features.

    Linear in the number of images above a few thousand (a faiss index; `evaluate/neighbours.py`).
    """
    return nearest.neighbours(features, threshold, k, max_pairs, device=device)


def outlier_cutoff(scores: np.ndarray) -> float:
    """Tukey's far-out fence, Q3 + 3 IQR: rare for any reasonable distribution of kNN distances."""
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    return float(q3 + 3 * (q3 - q1))


# ------------------------------------------------------------------------------------ shortcuts
def image_metadata(paths: Sequence[str], records: dict[str, dict] | None = None) -> list[dict]:
    """Metadata per image: from scan records where given (keyed by normalised path), else read now."""
    from ..config import DataConfig
    from ..data.scan import check_file

    records = records or {}
    limit = DataConfig().max_pixels
    rows = []
    for path in paths:
        record = records.get(os.path.normpath(path))
        if record is None or record.get("width") is None or record.get("mean_rgb") is None:
            record = check_file((path, "", None), max_pixels=limit, min_side=0)
        rows.append(_metadata_row(record))
    return rows


def _metadata_row(record: dict) -> dict:
    width, height = int(record.get("width") or 0), int(record.get("height") or 0)
    size = int(record.get("bytes") or 0)
    red, green, blue = record.get("mean_rgb") or (0.0, 0.0, 0.0)
    return {"width": width, "height": height, "aspect": width / height if height else 0.0,
            "format": str(record.get("format") or "?"), "orientation": int(record.get("orientation") or 1),
            "log_bytes": math.log1p(size), "bytes_per_pixel": size / max(1, width * height),
            "mean_r": float(red), "mean_g": float(green), "mean_b": float(blue)}


def shortcut_check(metadata: list[dict], labels: np.ndarray, classes: list[str], seed: int = 0) -> dict:
    """Cross-validated accuracy of a small decision tree that sees only metadata, per metadata group.

    A group is flagged when it beats the majority baseline by a wide margin, or when it picks out
    one class almost perfectly (TPR - FPR >= 0.8): whole-dataset accuracy hides one odd class among many.
    """
    counts = np.bincount(labels, minlength=len(classes))
    majority = float(counts.max() / counts.sum()) if len(labels) else 0.0
    result: dict[str, Any] = {"n": int(len(labels)), "chance": 1 / max(1, len(classes)), "majority": majority,
                              "groups": {}, "flagged": []}
    folds = min(_FOLDS, int(counts[counts > 0].min()) if len(labels) else 0)
    if folds < 2 or (counts > 0).sum() < 2:
        result["skipped"] = "too few images per class for cross-validation"
        return result
    groups = {"all metadata": ("all", tuple(c for _, cols in SHORTCUT_GROUPS.values() for c in cols)),
              **SHORTCUT_GROUPS}
    for name, (kind, columns) in groups.items():
        matrix = _design_matrix(metadata, columns)
        if matrix.shape[1] == 0 or np.all(matrix == matrix[0]):
            result["groups"][name] = {"kind": kind, "constant": True, "accuracy": majority, "lift": 0.0,
                                      "separated": {}}
            continue
        predicted = _tree_predictions(matrix, labels, folds, seed)
        accuracy = float((predicted == labels).mean())
        lift = (accuracy - majority) / (1 - majority) if majority < 1 else 0.0
        separated = _separation(predicted, labels, classes)
        result["groups"][name] = {"kind": kind, "constant": False, "accuracy": accuracy, "lift": lift,
                                  "separated": separated}
        if name != "all metadata" and (lift >= _LIFT_ALERT or any(j >= _SEPARATION_ALERT for j in separated.values())):
            result["flagged"].append(name)
    all_groups = result["groups"]["all metadata"]
    result["accuracy"] = all_groups["accuracy"]
    result["best_separated"] = all_groups["separated"]
    return result


def _design_matrix(metadata: list[dict], columns: Sequence[str]) -> np.ndarray:
    parts = []
    for column in columns:
        if column == "format":
            names = sorted({row["format"] for row in metadata})
            parts.append(np.array([[row["format"] == name for name in names] for row in metadata], dtype=float))
        else:
            parts.append(np.array([[row[column]] for row in metadata], dtype=float))
    return np.hstack(parts) if parts else np.zeros((len(metadata), 0))


def _tree_predictions(matrix: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(max_depth=6, min_samples_leaf=3, random_state=seed)
    with threadpool_limits(1):
        return cross_val_predict(tree, matrix, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))


def _separation(predicted: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    """{class: TPR - FPR} for classes with enough images, best separated first (only those >= 0.5)."""
    scores = {}
    for k, name in enumerate(classes):
        positive = labels == k
        if positive.sum() < _MIN_SUPPORT or (~positive).sum() == 0:
            continue
        youden = (predicted[positive] == k).mean() - (predicted[~positive] == k).mean()
        if youden >= 0.5:
            scores[name] = round(float(youden), 3)
    return dict(sorted(scores.items(), key=lambda item: -item[1]))


# ------------------------------------------------------------------------------------- the audit
@dataclass
class DataAudit:
    """What `audit_features` found; `to_dict()` for JSON, `render()` for the terminal."""

    n: int
    classes: list[str]
    out_of_fold_accuracy: float | None
    label_thresholds: dict[str, float]
    label_issues: list[dict]  # path, label, suggested, self_confidence, suggested_probability, ...
    label_features: str  # which features the label-error probe read (and why)
    similarity_threshold: float
    near_duplicate_count: int
    near_duplicates: list[dict]  # path_a, path_b, label_a, label_b, split_a, split_b, similarity
    outlier_cutoff: float | None
    outliers: list[dict]  # path, label, score, flagged; highest score first
    shortcut: dict
    warnings: list[str] = field(default_factory=list)
    # where the model looks, per class (`explain.heat_summary`; `audit --model` only)
    heat: dict = field(default_factory=lambda: {"skipped": "needs a model: effitune audit DATA --model BUNDLE"})

    @property
    def duplicates_across_classes(self) -> list[dict]:
        return [pair for pair in self.near_duplicates if pair["label_a"] != pair["label_b"]]

    @property
    def duplicates_across_splits(self) -> list[dict]:
        return [pair for pair in self.near_duplicates
                if pair["split_a"] and pair["split_b"] and pair["split_a"] != pair["split_b"]]

    @property
    def flagged_outliers(self) -> list[dict]:
        return [row for row in self.outliers if row["flagged"]]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["counts"] = {"label_issues": len(self.label_issues), "near_duplicates": self.near_duplicate_count,
                            "near_duplicates_across_classes": len(self.duplicates_across_classes),
                            "near_duplicates_across_splits": len(self.duplicates_across_splits),
                            "outliers": len(self.flagged_outliers)}
        return values

    def render(self) -> Group:
        parts: list[Any] = [Text(f"Model-assisted audit of {self.n} images "
                                 f"(out-of-fold accuracy of a linear probe: {_percent(self.out_of_fold_accuracy)})",
                                 style="bold")]
        if self.label_issues:
            parts.append(_paths_table(
                f"Likely label errors: {len(self.label_issues)}, least likely given label first (cleanlab, from "
                f"{self.label_features})", ["given", "suggested", "p(given)", "p(suggested)",
                                                                    "path"],
                [[r["label"], r["suggested"], f"{r['self_confidence']:.2f}", f"{r['suggested_probability']:.2f}",
                  r["path"]] for r in self.label_issues]))
        if self.near_duplicates:
            parts.append(_paths_table(
                f"Near duplicates (cosine >= {self.similarity_threshold}): {self.near_duplicate_count} pairs",
                ["similarity", "labels", "a", "b"],
                [[f"{p['similarity']:.4f}", f"{p['label_a']} / {p['label_b']}", p["path_a"], p["path_b"]]
                 for p in self.near_duplicates]))
        if self.flagged_outliers:
            parts.append(_paths_table(
                f"Outliers in feature space: {len(self.flagged_outliers)}", ["score", "label", "path"],
                [[f"{r['score']:.3f}", r["label"], r["path"]] for r in self.flagged_outliers]))
        parts.append(_shortcut_table(self.shortcut))
        if "classes" in self.heat:
            parts.append(_heat_table(self.heat))
        parts += [Text(f"! {warning}", style="yellow") for warning in self.warnings]
        return Group(*parts)


def audit_features(features: np.ndarray, labels: Sequence[str], paths: Sequence[str], *,
                   splits: Sequence[str | None] | None = None, metadata: list[dict] | None = None,
                   similarity: float = SIMILARITY, seed: int = 0, device: str = "cpu",
                   frozen_features: np.ndarray | None = None,
                   frozen_name: str = "the pooled output of the layers training left frozen") -> DataAudit:
    """The audit from pooled features (n, d), one label and path per row; `metadata` from `image_metadata`.

    `frozen_features`: (n, p) features of layers that never trained on these labels (ImageNet's, or the
    bundle's frozen prefix; `frozen_name` says which): the label-error probe reads them instead.
    `device`: "cuda" runs the neighbour search on the GPU (exact); on a CPU a faiss index keeps it linear.
    """
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    splits = list(splits) if splits is not None else [None] * len(y)
    usable = frozen_features is not None and np.asarray(frozen_features).shape[1] > 0
    label_features = (f"{frozen_name} ({np.asarray(frozen_features).shape[1]} dims): they never learned these "
                      "labels" if usable else
                      "the trained pooled features (this model has no frozen layers: it may have memorised some "
                      "wrong labels of its training images)")
    probabilities = out_of_fold_probabilities(frozen_features if usable else features, y, seed=seed)
    issues, thresholds = ([], np.ones(len(classes))) if probabilities is None else find_label_issues(probabilities, y)
    pairs, pair_count, knn = neighbours(features, similarity, device=device)
    cutoff = outlier_cutoff(knn) if len(knn) > 3 else None
    order = np.argsort(-knn)[:max(50, int(np.sum(knn > cutoff)) if cutoff is not None else 0)]
    result = DataAudit(
        n=len(y), classes=classes,
        out_of_fold_accuracy=float((probabilities.argmax(1) == y).mean()) if probabilities is not None else None,
        label_thresholds={name: float(t) for name, t in zip(classes, thresholds)}, label_features=label_features,
        label_issues=[{"path": paths[i["index"]], "label": labels[i["index"]], "split": splits[i["index"]],
                       **{k: v for k, v in i.items() if k != "index"}, "suggested": classes[i["suggested"]]}
                      for i in issues],
        similarity_threshold=similarity, near_duplicate_count=pair_count,
        near_duplicates=[{"path_a": paths[a], "path_b": paths[b], "label_a": labels[a], "label_b": labels[b],
                          "split_a": splits[a], "split_b": splits[b], "similarity": s} for a, b, s in pairs],
        outlier_cutoff=cutoff,
        outliers=[{"path": paths[i], "label": labels[i], "score": float(knn[i]),
                   "flagged": cutoff is not None and bool(knn[i] > cutoff)} for i in order],
        shortcut=shortcut_check(metadata, y, classes, seed) if metadata is not None else {"skipped": "no metadata"},
    )
    result.warnings = _warnings(result)
    return result


def _warnings(audit: DataAudit) -> list[str]:
    warnings = []
    if audit.label_issues:
        share = len(audit.label_issues) / max(1, audit.n)
        warnings.append(f"{len(audit.label_issues)} images ({share:.1%}) look mislabelled: their features sit with "
                        "another class. Review them, fix the labels that are wrong and train again.")
    if audit.duplicates_across_classes:
        warnings.append(f"{len(audit.duplicates_across_classes)} near-duplicate pairs carry different labels: "
                        "the same picture cannot be two classes.")
    across = audit.duplicates_across_splits
    if across:
        identical = sum(pair["similarity"] >= _IDENTICAL for pair in across)
        warnings.append(f"{len(across)} look-alike pairs (cosine >= {audit.similarity_threshold}) span splits, "
                        f"{identical} of them practically identical (>= {_IDENTICAL}): where they are the same "
                        "picture, the test score is inflated. Review the top pairs.")
    if audit.flagged_outliers:
        count = len(audit.flagged_outliers)
        warnings.append(f"{count} image{'s are' if count > 1 else ' is'} far from every other image (outliers): "
                        "check that they belong in the data set at all.")
    warnings += shortcut_warnings(audit.shortcut)
    return warnings


def shortcut_warnings(shortcut: dict) -> list[str]:
    lines = []
    for name in shortcut.get("flagged", []):
        group = shortcut["groups"][name]
        best = ", ".join(f"'{printable(c)}'" for c in list(group["separated"])[:3]) or "several classes"
        text = (f"Shortcut: {name} alone predicts the class with {group['accuracy']:.0%} accuracy (majority "
                f"{shortcut['majority']:.0%}) and separates {best} best.")
        if group["kind"] == "capture":
            text += (" That is how the files were made, not what they show: a model can learn it instead of the "
                     "content. Make the classes alike in it (resize, re-encode) or collect more varied images.")
        else:
            text += (" It partly follows the content; check that backgrounds, lighting or compression do not "
                     "differ by class.")
        lines.append(text)
    return lines


def heat_warnings(heat: dict) -> list[str]:
    lines = []
    for name, summary in heat.get("classes", {}).items():
        if summary.get("flagged") == "corner":
            where = (f"{summary['corner_share']:.0%} of the heat of {summary['images']} images sits in the "
                     f"{summary['corner']} corner (1/9 of the image). A mark or watermark there")
        elif summary.get("flagged") == "edges":
            where = (f"only {summary['centre_share']:.0%} of the heat of {summary['images']} images is in the middle "
                     "of the image (a quarter of it). A border or the background")
        else:
            continue
        lines.append(f"Where the model looks: for '{printable(name)}' {where} may be what the model learnt "
                     "instead of the object: look at `effitune explain` overlays of that class.")
    return lines


def _heat_table(heat: dict) -> Any:
    table = Table(title=f"Where the model looks (mean Grad-CAM of up to {heat['per_class']} images per class)")
    for column in ("class", "centre of heat (x, y)", "in the centre", "most in a corner", ""):
        table.add_column(column)
    for name, summary in heat["classes"].items():
        if not summary.get("images"):
            table.add_row(name, "no heat", "", "", "")
            continue
        x, y = summary["centroid"]
        flag = f"! {summary['flagged']}" if summary["flagged"] else ""
        table.add_row(name, f"{x:.2f}, {y:.2f}", f"{summary['centre_share']:.0%}",
                      f"{summary['corner_share']:.0%} {summary['corner']}", flag)
    return table


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _shortcut_table(shortcut: dict) -> Any:
    if "groups" not in shortcut or not shortcut["groups"]:
        return Text(f"shortcut check skipped: {shortcut.get('skipped', 'no metadata')}")
    table = Table(title=f"Can metadata alone predict the class? (majority {shortcut['majority']:.0%})")
    for name in ("metadata", "accuracy", "classes it separates (TPR-FPR)", "flag"):
        table.add_column(name)
    for name, group in shortcut["groups"].items():
        separated = ", ".join(f"{printable(c)} {j:.2f}" for c, j in list(group["separated"].items())[:3])
        table.add_row(name, "constant" if group["constant"] else f"{group['accuracy']:.0%}", separated,
                      "!" if name in shortcut["flagged"] else "")
    return table


# ----------------------------------------------------------------------- from a bundle and data
def audit_data(bundle: str | Path, data: str | Path, *, manifest: str | Path | None = None,
               device: str = "cpu", cache: str | Path | None = None,
               similarity: float = SIMILARITY) -> DataAudit:
    """Run the bundle over every labelled image in `data` and audit them (`effitune audit DATA --model`)."""
    from ..data.sources import read_source
    from ..predict import Predictor, embed

    source = read_source(data, manifest=manifest)
    rows, records = source.rows, source.records
    predictor = Predictor(bundle, device=device)
    features = embed(predictor, rows, cache=cache).features
    pooled, frozen = split_embedding(features, predictor.pooled_dim)
    named = {}  # which frozen features the probe reads, where not the bundle's own prefix
    imagenet, origin = imagenet_features(predictor, rows, cache=cache)
    if imagenet is not None:
        frozen, named["frozen_name"] = imagenet, (f"ImageNet features of {predictor.meta['backbone']} (pooled below "
                                                  f"its last {LABEL_DEPTH} stage, weights {origin})")
    else:
        warnings.warn(f"{origin}; the label-error probe reads this bundle's own features instead (its frozen "
                      "layers where it has them), which may have learned some of the wrong labels.", EffituneWarning,
                      stacklevel=2)
    audit = audit_features(pooled, [r["label"] for r in rows], [r["path"] for r in rows],
                           splits=[r.get("split") for r in rows],
                           metadata=image_metadata([r["path"] for r in rows], records), similarity=similarity,
                           device=device, frozen_features=frozen, **named)
    audit.heat = class_heat(predictor, rows, cache=cache)
    audit.warnings += heat_warnings(audit.heat)
    return audit


LABEL_DEPTH = 1  # ImageNet features for label errors: pooled output below the last stage (see imagenet_features)


def imagenet_features(predictor, rows: Sequence[dict], *, cache: str | Path | None = None,
                      depth: int = LABEL_DEPTH, batch_size: int = 128) -> tuple[np.ndarray | None, str]:
    """(pooled output below the last `depth` stages of the bundle's architecture with its ImageNet weights,
    where the weights came from), or (None, why) when the weights are not at hand.

    Fine-tuning, even of a few stages, moves the features a label probe would read; a bundle that trained
    deep keeps only low-level layers frozen. The ImageNet network never saw these labels at any depth.
    Measured on 5% flipped Fashion-MNIST labels with cleanlab (recall / precision among the first N;
    benchmarks/label_features.py): below the last stage 0.87 / 0.76 at 1,500 images and 0.92 / 0.85 at
    15,000; the whole pooled network 0.80 / 0.72 and 0.93 / 0.85; below the last 3 stages 0.88 / 0.68 and
    0.90 / 0.77; a bundle's own prefix after training 3 stages, at 1,500: 0.81 / 0.60.
    One more pass over the images (`row_images`: the run's cache where it has them).
    """
    import copy

    import torch

    from ..models.pretrained import load_pretrained
    from ..predict import row_images

    source = str(predictor.meta.get("weight_source", "")).split(" (")[0]
    weights = source[len("file:"):] if source.startswith("file:") and Path(source[len("file:"):]).is_file() else None
    network = copy.deepcopy(predictor.network).eval()
    try:
        origin = load_pretrained(network.backbone, predictor.meta["backbone"], weights)
    except UserError as error:
        return None, f"ImageNet weights for {predictor.meta['backbone']} are not at hand ({str(error).splitlines()[0]})"
    device = next(network.parameters()).device
    parts = []
    with torch.inference_mode():
        for batch in row_images(predictor, rows, cache=cache):
            for start in range(0, len(batch), batch_size):
                x = torch.from_numpy(batch[start:start + batch_size]).permute(0, 3, 1, 2).to(device)
                parts.append(network.prefix(x, depth).mean((2, 3)).float().cpu().numpy())
    return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), origin


def split_embedding(features: np.ndarray, pooled_dim: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A bundle's features -> (pooled part, frozen-prefix part or None): `Network.embedding`'s layout."""
    if pooled_dim is None or features.shape[1] <= pooled_dim:
        return features, None
    return features[:, :pooled_dim], features[:, pooled_dim:]


HEAT_PER_CLASS = 16  # images explained per class for the audit's heat check: its cost stays flat in N


def class_heat(predictor, rows: Sequence[dict], *, cache: str | Path | None = None,
               per_class: int = HEAT_PER_CLASS) -> dict:
    """`explain.heat_summary` of up to `per_class` images of each class (spread evenly over its rows),
    explained for their own class; the images come from the run's cache where it has them."""
    from ..explain import heat_summary
    from ..predict import row_images

    summaries = {}
    for name in sorted({row["label"] for row in rows}):
        if name not in predictor.classes:
            continue
        members = [row for row in rows if row["label"] == name]
        chosen = [members[i] for i in sorted(set(np.linspace(0, len(members) - 1, per_class).round().astype(int)))]
        images = [image for batch in row_images(predictor, chosen, cache=cache) for image in batch]
        summaries[name] = heat_summary([item.heatmap for item in predictor.explain(images, target=name)
                                        if item.heatmap is not None])
    return {"per_class": per_class, "classes": summaries, "flagged": [n for n, s in summaries.items() if s["flagged"]]}
