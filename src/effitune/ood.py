"""Images that belong to no class: scores, a threshold calibrated on known images, bundle storage.

Every score is "higher = more like the training data":
- msp: the largest softmax probability at the bundle's temperature (Hendrycks & Gimpel, 2017);
- energy: T * logsumexp(logits / T) (Liu et al., 2020);
- knn: cosine similarity of the L2-normalized pooled features to the k-th nearest training feature
  (Sun et al., 2022), against a float16, class-stratified sample of the training features;
- mahalanobis: minus the smallest class-conditional Mahalanobis distance, one covariance shared by all
  classes (Lee et al., 2018), on normalized features; the covariance is kept as its leading
  eigenvectors plus one residual variance, so it stays small;
- knn-frozen: knn on the pooled features and knn on the pooled output of the layers training left
  frozen (ImageNet's own mid-level features, which fine-tuning cannot pull unknown images towards the
  classes), each standardized by its validation median and interquartile range; the lower counts.
  The features of a bundle that has them are [pooled | pooled frozen prefix] (`pooled_dim` columns
  first); every other score reads the pooled part alone. Using features from several layers follows
  Lee et al. (2018)'s feature ensemble; taking the minimum lets either layer veto an image.
- ensemble (the default where knn-frozen exists): the mean of energy, mahalanobis and knn-frozen, each
  standardized by its validation median and interquartile range. The logits, the class-conditional
  Gaussian and the neighbours see different things in a look-alike class. On the held-out-class
  benchmark (benchmarks/near_ood.py, Fashion-MNIST and digits) their mean has the best mean near-OOD
  AUROC of the scores that keep far-OOD AUROC >= 0.99 (energy alone, close on near-OOD, lets digits
  through); knn-frozen's extreme values keep far-away images out. Standardized means of scores are
  what OpenOOD calls score ensembles; this rule is ours, chosen by its mean over the benchmark's splits.
- examples: only when example images of no class were given (`--unknown-dir`): a logistic probe
  trained to tell the training features (the bank) from the examples' features, joined with the
  default score (`default_score`) as knn-frozen joins its parts: each standardized on validation,
  the lower counts. The probe learns what sets the examples apart (a cheap form of outlier exposure,
  Hendrycks et al., 2019); the default keeps its veto on unknowns unlike the examples.
The threshold is the validation score that keeps `target_tpr` of new known images (a conformal
quantile, `threshold_for`): an image that scores below it is reported as unknown. Tensors go to `ood.safetensors`, the choice and its numbers
to the `unknown` section of effitune.json; no pickle anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .bundle import read_meta, update_meta
from .errors import UserError
from .runtime.batching import softmax

OOD_FILE = "ood.safetensors"
BANK_SIZE = 2000  # training features kept for knn; Sun et al. (2022) lose little even at 1% of ImageNet
REFERENCE_SIZE = 1000  # validation features kept as the drift reference (held out, unlike the bank)
MIN_STANDARDIZE = 20  # validation images knn-frozen and ensemble need to standardize their parts (fewer: knn)
ENSEMBLE_PARTS = ("energy", "mahalanobis", "knn-frozen")  # what `ensemble` averages, each standardized
MIN_EXAMPLES = 10  # unknown example images the examples probe needs (fewer: the best score on them is chosen)
MAX_EXAMPLES = 5000  # examples the probe trains on at most (a seeded sample beyond)
PROBE_C = 10.0  # inverse L2 strength of the examples probe (benchmarks/near_ood.py: C 1 / 10 / 100 within 0.01)
EXPLAINED_VARIANCE = 0.9  # share of the shared covariance kept as explicit eigen-directions; the rest is isotropic
# name -> score(detector, logits, features, known): `known` holds the scores this call has computed so far,
# so a score built from others (`part`) reuses them instead of searching the neighbours again
SCORES: dict[str, Callable[["UnknownDetector", np.ndarray, np.ndarray, dict], np.ndarray]] = {}


def register_score(name: str):
    def add(function):
        if name in SCORES:
            raise ValueError(f"unknown-image score '{name}' is registered twice")
        SCORES[name] = function
        return function
    return add


def l2_normalize(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def stratified_sample(labels, size: int, seed: int = 0, shares: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of at most `size` items whose class mix follows `shares` (default: their own mix).

    With `shares` the sample is as large as its rarest class allows; without, every class keeps one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if shares is None and len(labels) <= size:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    wanted = counts / counts.sum() if shares is None else np.asarray(shares, dtype=np.float64)[classes]
    wanted = wanted / wanted.sum()
    total = min(size, float(np.min(counts[wanted > 0] / wanted[wanted > 0])))
    take = np.minimum(counts, np.round(total * wanted).astype(np.int64))
    if shares is None:
        take = np.maximum(take, 1)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                                   for c, n in zip(classes, take)]))


def default_k(bank_size: int) -> int:
    """Sun et al. scale k with the bank (k=50 for 50k CIFAR images, k=10 for 1% of ImageNet)."""
    return int(np.clip(round(bank_size / 1000), 1, 50))


@dataclass
class UnknownDetector:
    """What scoring needs: the temperature and the training-feature statistics from ood.safetensors."""

    temperature: float
    bank: np.ndarray  # (N, D) normalized training features
    means: np.ndarray  # (C, D) class means of normalized training features
    components: np.ndarray  # (r, D) leading eigenvectors of the shared covariance
    eigenvalues: np.ndarray  # (r,)
    residual_variance: float  # variance per direction outside the components
    k: int
    reference: np.ndarray  # (M, D) normalized validation features, training class mix: the drift reference
    reference_predicted: np.ndarray  # (M,) the class predicted for each reference image
    section: dict  # the bundle's `unknown` section (score, threshold, ...); {} before calibration
    pooled_dim: int | None = None  # leading feature columns that are the pooled features (None: all)
    prefix_bank: np.ndarray | None = None  # (N, P) normalized pooled frozen-prefix features of the bank images
    standardize: dict | None = None  # {"knn": [median, iqr], "prefix": [median, iqr]} of validation scores
    probe: np.ndarray | None = None  # (D + 1,) weights and bias of the known-vs-examples probe, or None
    probe_standardize: dict | None = None  # {"base": score, score: [median, iqr], "probe": [median, iqr]}
    ensemble_standardize: dict | None = None  # {part: [median, iqr]} of the ENSEMBLE_PARTS' validation scores

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels: np.ndarray, val_logits: np.ndarray,
            val_features: np.ndarray, val_labels: np.ndarray, temperature: float = 1.0, bank_size: int = BANK_SIZE,
            seed: int = 0, pooled_dim: int | None = None) -> "UnknownDetector":
        """Statistics from (a sample of) the training features; the reference from validation images.

        `pooled_dim`: features are [pooled | pooled frozen prefix] with this many pooled columns.
        """
        labels = np.asarray(train_labels)
        if not len(labels):
            raise UserError("Unknown-image statistics need training images; the train split is empty.")
        train_features, val_features = np.asarray(train_features), np.asarray(val_features)
        width = train_features.shape[1] if pooled_dim is None else pooled_dim
        prefix = train_features[:, width:]
        train_features, val_pooled = train_features[:, :width], val_features[:, :width]
        normalized = l2_normalize(train_features)
        classes, index = np.unique(labels, return_inverse=True)
        means = np.stack([normalized[index == i].mean(axis=0) for i in range(len(classes))])
        components, eigenvalues, residual = _shared_covariance(normalized - means[index])
        keep = stratified_sample(labels, bank_size, seed)
        # Held-out images (training images sit closer to the bank), drawn in the training class mix.
        mix = np.bincount(labels, minlength=int(max(labels.max(), np.max(val_labels, initial=0))) + 1) / len(labels)
        chosen = stratified_sample(val_labels, REFERENCE_SIZE, seed, shares=mix)
        detector = cls(float(temperature), _as_stored(normalized[keep]), means, components, eigenvalues, residual,
                       default_k(len(keep)), _as_stored(l2_normalize(val_pooled)[chosen]),
                       np.asarray(val_logits).argmax(axis=1)[chosen], {}, width)
        if prefix.shape[1]:
            detector.prefix_bank = _as_stored(l2_normalize(prefix[keep]))
            if len(val_features) >= MIN_STANDARDIZE:
                detector.standardize = {name: _median_and_spread(values)
                                        for name, values in detector._knn_parts(val_features).items()}
                parts = detector.scores(val_logits, val_features, ENSEMBLE_PARTS)
                detector.ensemble_standardize = {name: _median_and_spread(parts[name]) for name in ENSEMBLE_PARTS}
        return detector

    @property
    def available(self) -> list[str]:
        """The scores this detector can compute (knn-frozen and ensemble need the frozen-prefix features,
        examples a probe)."""
        needs = {"knn-frozen": self.standardize, "ensemble": self.ensemble_standardize, "examples": self.probe}
        return [name for name in SCORES if needs.get(name, True) is not None]

    @property
    def default_score(self) -> str:
        """The score used when no example images of no class are given (an older bundle: knn-frozen)."""
        return next(name for name in ("ensemble", "knn-frozen", "knn") if name in self.available)

    def pooled(self, features: np.ndarray) -> np.ndarray:
        """The pooled-feature columns of `features`."""
        return np.asarray(features)[:, :self.pooled_dim] if self.pooled_dim is not None else np.asarray(features)

    def _knn_parts(self, features: np.ndarray, pooled_knn: Callable[[], np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
        """{"knn": pooled knn, "prefix": knn on the frozen-prefix part}; `pooled_knn` gives the first where a
        `scores` call has it already."""
        features = np.asarray(features, np.float32)
        width = self.pooled_dim
        if features.shape[1] != width + self.prefix_bank.shape[1]:
            raise UserError(f"The features have {features.shape[1]} columns; this bundle's unknown-image statistics "
                            f"expect {width} pooled + {self.prefix_bank.shape[1]} frozen-prefix columns. Was the "
                            "ONNX file exported from another bundle? Export it again.")
        return {"knn": pooled_knn() if pooled_knn else kth_similarity(l2_normalize(features[:, :width]), self.bank,
                                                                       self.k),
                "prefix": kth_similarity(l2_normalize(features[:, width:]), self.prefix_bank, self.k)}

    def scores(self, logits: np.ndarray, features: np.ndarray, names: Iterable[str] | None = None) -> dict:
        """{score name: (N,) scores} for the named scores (default: all)."""
        unavailable = [name for name in (names or []) if name not in self.available]
        if unavailable:
            needs = (f"at least {MIN_EXAMPLES} example images of no class (--unknown-dir)"
                     if unavailable[0] == "examples" else
                     f"frozen-prefix features and at least {MIN_STANDARDIZE} validation images")
            raise UserError(f"unknown-image score '{unavailable[0]}' needs {needs}, which this bundle's statistics "
                            f"lack; use one of {', '.join(self.available)}.")
        logits, features, known = np.asarray(logits, np.float32), np.asarray(features, np.float32), {}
        return {name: part(self, name, logits, features, known) for name in (names or self.available)}

    @property
    def score_name(self) -> str:
        return self.section["score"]

    def score(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.scores(logits, features, [self.score_name])[self.score_name]

    def probe_inputs(self, features: np.ndarray) -> np.ndarray:
        """What the examples probe reads: the normalized pooled part, then the normalized prefix part."""
        features = np.asarray(features, np.float32)
        if self.prefix_bank is None:
            return l2_normalize(self.pooled(features))
        return np.hstack([l2_normalize(features[:, :self.pooled_dim]), l2_normalize(features[:, self.pooled_dim:])])

    def probe_logit(self, features: np.ndarray) -> np.ndarray:
        """The probe's log-odds that an image is known rather than like the examples."""
        return (self.probe_inputs(features) @ self.probe[:-1] + self.probe[-1]).astype(np.float32)

    def fit_probe(self, example_features: np.ndarray, val_logits: np.ndarray, val_features: np.ndarray,
                  seed: int = 0) -> None:
        """Train the examples probe: the bank (known) against the examples (unknown), classes weighted alike.

        The known side is the training bank, not the validation images, so the threshold's validation
        scores stay fresh to the probe. Its standardization (median, interquartile range) is that of the
        validation scores, as knn-frozen's.
        """
        from sklearn.linear_model import LogisticRegression

        examples = np.asarray(example_features, np.float32)
        if len(examples) > MAX_EXAMPLES:
            examples = examples[np.sort(np.random.default_rng(seed).choice(len(examples), MAX_EXAMPLES, replace=False))]
        known = self.bank if self.prefix_bank is None else np.hstack([self.bank, self.prefix_bank])
        inputs = np.vstack([known, self.probe_inputs(examples)])
        truth = np.r_[np.ones(len(known)), np.zeros(len(examples))]
        model = LogisticRegression(C=PROBE_C, max_iter=5000, class_weight="balanced").fit(inputs, truth)
        self.probe = np.r_[model.coef_[0], model.intercept_].astype(np.float32)
        base = self.default_score
        self.probe_standardize = {
            "base": base, base: _median_and_spread(self.scores(val_logits, val_features, [base])[base]),
            "probe": _median_and_spread(self.probe_logit(val_features))}

    def use_backend(self, backend: str) -> "UnknownDetector":
        """Thresholds fitted for this engine's features (INT8 export), where the bundle has them."""
        fitted = self.section.get("backend_thresholds", {}).get(backend)
        if fitted and self.score_name in fitted:
            self.section = {**self.section, "thresholds": fitted, "threshold": fitted[self.score_name],
                            "threshold_backend": backend}
        return self

    def is_unknown(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) < self.section["threshold"]

    def save(self, folder: str | Path) -> None:
        tensors = {"bank": self.bank.astype(np.float16), "class_means": self.means.astype(np.float32),
                   "components": self.components.astype(np.float32),  # float16 would break orthonormality
                   "eigenvalues": self.eigenvalues.astype(np.float32), "reference": self.reference.astype(np.float16),
                   "reference_predicted": self.reference_predicted.astype(np.int32)}
        metadata = {"k": str(self.k), "residual_variance": repr(self.residual_variance),
                    "temperature": repr(self.temperature)}
        if self.pooled_dim is not None:
            metadata["pooled_dim"] = str(self.pooled_dim)
        if self.prefix_bank is not None:
            tensors["prefix_bank"] = self.prefix_bank.astype(np.float16)
        if self.standardize is not None:
            metadata["standardize"] = json.dumps(self.standardize)
        if self.ensemble_standardize is not None:
            metadata["ensemble_standardize"] = json.dumps(self.ensemble_standardize)
        if self.probe is not None:
            tensors["probe"] = self.probe.astype(np.float32)
            metadata["probe_standardize"] = json.dumps(self.probe_standardize)
        # safetensors.numpy writes a transposed view's memory in the wrong order: make every array contiguous
        save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()},
                  str(Path(folder) / OOD_FILE), metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, section: dict) -> "UnknownDetector":
        path = Path(folder) / OOD_FILE
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "np") as stream:
                info = stream.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{path} is missing or damaged ({error}). Copy the bundle again or re-train.") from None
        as_float = {name: tensors[name].astype(np.float32) for name in tensors}
        return cls(float(info["temperature"]), as_float["bank"], as_float["class_means"], as_float["components"],
                   as_float["eigenvalues"], float(info["residual_variance"]), int(info["k"]), as_float["reference"],
                   tensors["reference_predicted"].astype(np.int64), dict(section),
                   int(info["pooled_dim"]) if "pooled_dim" in info else None, as_float.get("prefix_bank"),
                   json.loads(info["standardize"]) if "standardize" in info else None, as_float.get("probe"),
                   json.loads(info["probe_standardize"]) if "probe_standardize" in info else None,
                   json.loads(info["ensemble_standardize"]) if "ensemble_standardize" in info else None)


def _as_stored(features: np.ndarray) -> np.ndarray:
    """Round to float16 as ood.safetensors does, so calibration scores with exactly what is stored."""
    return features.astype(np.float16).astype(np.float32)


def _median_and_spread(scores: np.ndarray) -> list[float]:
    """Median and interquartile range (floored: a constant score must not divide by zero)."""
    low, median, high = np.percentile(np.asarray(scores, np.float64), [25, 50, 75])
    return [float(median), float(max(high - low, 1e-3 * max(abs(median), 1.0)))]


def _shared_covariance(centered: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Leading eigen-directions of the within-class covariance, and the mean variance left outside them."""
    covariance = centered.T @ centered / max(1, len(centered) - 1)
    eigenvalues, vectors = np.linalg.eigh(covariance.astype(np.float64))
    eigenvalues, vectors = np.clip(eigenvalues[::-1], 0, None), vectors[:, ::-1]
    total = float(eigenvalues.sum()) or 1.0
    rank = int(np.searchsorted(np.cumsum(eigenvalues) / total, EXPLAINED_VARIANCE) + 1)
    rank = min(rank, len(eigenvalues) - 1, max(1, len(centered) - 1))
    floor = 1e-4 * total / len(eigenvalues)  # shrinkage: no direction is treated as noise-free
    residual = max(float(eigenvalues[rank:].mean()) if rank < len(eigenvalues) else 0.0, floor)
    kept = np.maximum(eigenvalues[:rank], residual)
    return vectors[:, :rank].T.astype(np.float32), kept.astype(np.float32), residual


def part(detector: UnknownDetector, name: str, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    """Score `name`, computed once per `scores` call (`known`: what the call has computed so far)."""
    if name not in known:
        known[name] = SCORES[name](detector, logits, features, known)
    return known[name]


@register_score("msp")
def _msp(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    return softmax(logits, detector.temperature).max(axis=1)


@register_score("energy")
def _energy(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    z = logits / detector.temperature
    top = z.max(axis=1)
    return detector.temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


@register_score("knn")
def _knn(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    return kth_similarity(l2_normalize(detector.pooled(features)), detector.bank, detector.k)


@register_score("knn-frozen")
def _knn_frozen(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    parts = detector._knn_parts(features, lambda: part(detector, "knn", logits, features, known))
    return np.min([(parts[name] - median) / spread for name, (median, spread) in detector.standardize.items()],
                  axis=0).astype(np.float32)


@register_score("ensemble")
def _ensemble(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    spread = detector.ensemble_standardize
    return np.mean([(part(detector, name, logits, features, known) - spread[name][0]) / spread[name][1]
                    for name in ENSEMBLE_PARTS], axis=0).astype(np.float32)


@register_score("examples")
def _examples(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    spread = detector.probe_standardize
    base = spread["base"]
    parts = {base: part(detector, base, logits, features, known), "probe": detector.probe_logit(features)}
    return np.min([(parts[name] - spread[name][0]) / spread[name][1] for name in (base, "probe")],
                  axis=0).astype(np.float32)


def kth_similarity(queries: np.ndarray, bank: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Cosine similarity of each (normalized) query to its k-th most similar bank row."""
    k = min(k, len(bank))
    out = np.empty(len(queries), np.float32)
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ bank.T
        out[start:start + chunk] = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
    return out


@register_score("mahalanobis")
def _mahalanobis(detector: UnknownDetector, logits: np.ndarray, features: np.ndarray, known: dict) -> np.ndarray:
    x, means = l2_normalize(detector.pooled(features)), detector.means
    squared = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]  # ||x - mu_c||^2
    px, pm = x @ detector.components.T, means @ detector.components.T
    inside = _weighted_squared_distance(px, pm, 1 / detector.eigenvalues)
    plain_inside = _weighted_squared_distance(px, pm, np.ones_like(detector.eigenvalues))
    outside = np.maximum(squared - plain_inside, 0) / detector.residual_variance
    return -(inside + outside).min(axis=1)


def _weighted_squared_distance(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) matrix of sum_j w_j (a_ij - b_cj)^2."""
    return ((a ** 2) @ weights)[:, None] - 2 * (a * weights) @ b.T + ((b ** 2) @ weights)[None]


# --- calibration --------------------------------------------------------------------------------

def threshold_for(scores: np.ndarray, target_tpr: float) -> float:
    """The threshold that accepts (score >= threshold) a new known image with probability >= `target_tpr`.

    Split conformal (Vovk et al. 2005; Angelopoulos & Bates 2021): the k-th smallest of n validation
    scores with k = floor((1 - target_tpr) * (n + 1)) accepts a fresh image of the same distribution with
    probability 1 - k / (n + 1). The plain empirical quantile falls short by about 1 / (n + 1): 5 points
    with 20 validation images. Below n = 1 / (1 - target_tpr) - 1 no threshold reaches the target and the
    smallest score is used.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if not len(ordered):
        return float("-inf")
    rank = int(np.floor((1 - target_tpr) * (len(ordered) + 1) + 1e-9))  # 1-based; 1e-9: 0.05 * 20 is 0.99999
    return float(ordered[min(max(rank, 1), len(ordered)) - 1])


def thresholds_for(scores: dict[str, np.ndarray], target_tpr: float) -> dict[str, float]:
    """`threshold_for` each score of `detector.scores`."""
    return {name: threshold_for(values, target_tpr) for name, values in scores.items()}


def ood_metrics(known: np.ndarray, unknown: np.ndarray) -> dict:
    """AUROC (known = positive, higher score = known) and the FPR on unknowns at 95% TPR on knowns."""
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    scores = np.r_[known, unknown].astype(np.float64)
    fpr, tpr, _ = roc_curve(truth, scores)
    return {"auroc": float(roc_auc_score(truth, scores)), "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95)])}


def calibrate(detector: UnknownDetector, val_logits: np.ndarray, val_features: np.ndarray, target_tpr: float,
              score: str = "auto", unknown: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> dict:
    """Fill `detector.section`: thresholds for every score at `target_tpr`, and which score predict uses.

    "auto" is ensemble where the bundle has frozen-prefix features (the best mean near-OOD AUROC of
    benchmarks/near_ood.py, far-OOD kept), else knn (ahead of msp and energy on OpenOOD v1.5's far-OOD sets).
    With unknown example images (`unknown`: their logits and features), at least MIN_EXAMPLES of them,
    the examples probe is fitted and "auto" is the `examples` score; with fewer, the score with the best
    AUROC against them (ties keep the earlier score).
    """
    if score != "auto" and score not in SCORES:
        raise UserError(f"unknown.score '{score}' is not a score; use auto or one of {', '.join(SCORES)}.")
    if not len(val_logits):
        raise UserError("Unknown-image calibration needs validation images; the val split is empty.")
    given = 0 if unknown is None else len(unknown[0])
    detector.probe = detector.probe_standardize = None
    if given >= MIN_EXAMPLES:
        detector.fit_probe(unknown[1], val_logits, val_features, seed)
    val = detector.scores(val_logits, val_features)
    thresholds = thresholds_for(val, target_tpr)
    section = {"target_tpr": float(target_tpr), "thresholds": thresholds, "k": detector.k,
               "bank_size": len(detector.bank), "n_val": int(len(val_logits))}
    default = "ensemble" if detector.prefix_bank is not None else "knn"  # ensemble may fall back, with a reason
    chosen, how = (score, "configured") if score != "auto" else (default, "default (no unknown examples given)")
    if chosen == "examples" and chosen not in detector.available:
        raise UserError(f"unknown.score 'examples' needs at least {MIN_EXAMPLES} example images of no class "
                        f"(--unknown-dir); {given} were given. Add examples or choose another score.")
    if chosen not in detector.available:  # no frozen layers (all trained), a tiny val split, an older bundle
        fallback = detector.default_score
        chosen, how = fallback, (f"{fallback}: {chosen} needs pooled features of layers training left frozen, "
                                 f"standardized on at least {MIN_STANDARDIZE} validation images; this bundle's "
                                 "statistics lack them")
    if given:
        examples = detector.scores(*unknown)
        # the probe trained on these examples: its AUROC on them would flatter it, so it is left out
        aurocs = {name: ood_metrics(val[name], examples[name])["auroc"] for name in detector.available
                  if name != "examples"}
        section["example_auroc"] = aurocs
        section["n_unknown_examples"] = int(given)
        if score == "auto" and detector.probe is not None:
            chosen = "examples"
            how = (f"a probe of {given} unknown examples against the training features, joined with "
                   f"{detector.default_score} "
                   "(the lower counts)")
        elif score == "auto":
            chosen = max(aurocs, key=aurocs.get)
            how = (f"best AUROC on {given} unknown examples vs validation images (the examples probe needs "
                   f"{MIN_EXAMPLES})")
    section.update(score=chosen, selected_by=how, threshold=thresholds[chosen],
                   val_tpr=float((val[chosen] >= thresholds[chosen]).mean()))
    detector.section = section
    return section


def attach(folder: str | Path, detector: UnknownDetector) -> dict:
    """Write ood.safetensors into a bundle and its `unknown` section into effitune.json."""
    detector.save(folder)
    return update_meta(folder, unknown=detector.section)


def load_detector(folder: str | Path, meta: dict) -> UnknownDetector | None:
    """The bundle's detector, or None for a bundle without unknown-image statistics."""
    section = meta.get("unknown")
    return UnknownDetector.load(folder, section) if section else None


def require_detector(predictor) -> UnknownDetector:
    detector = getattr(predictor, "unknown", None) or load_detector(predictor.folder, predictor.meta)
    if detector is None:
        raise UserError(f"{predictor.folder} has no unknown-image statistics (it was made before effitune "
                        "fitted them). Re-train, or add them with effitune.pipeline.calibrate_unknown("
                        "bundle, run/manifest.csv).")
    return detector


def fit_and_attach(folder: str | Path, temperature: float, train: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray, np.ndarray], target_tpr: float = 0.95, score: str = "auto",
                   unknown: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0,
                   bank_size: int = BANK_SIZE, pooled_dim: int | None = None) -> dict:
    """train = (features, labels), val = (logits, features, labels), unknown = (logits, features) examples.

    `pooled_dim`: pooled columns of the features (default: the bundle's `embedding`, else all).
    """
    if pooled_dim is None:
        pooled_dim = read_meta(folder).get("embedding", {}).get("pooled_dim")
    detector = UnknownDetector.fit(train[0], train[1], *val, temperature, bank_size, seed, pooled_dim)
    calibrate(detector, val[0], val[1], target_tpr, score, unknown, seed)
    return attach(folder, detector)["unknown"]


# --- evaluation on known and unknown images -------------------------------------------------------

def acceptance(scores: np.ndarray, threshold: float, correct: np.ndarray) -> dict:
    """Share of known images accepted at `threshold`, and the accuracy on those (selective accuracy)."""
    accepted = np.asarray(scores) >= threshold
    return {"known_accepted": float(accepted.mean()) if len(accepted) else float("nan"),
            "selective_accuracy": float(correct[accepted].mean()) if accepted.any() else float("nan")}


def evaluate_arrays(detector: UnknownDetector, known: tuple[np.ndarray, np.ndarray, np.ndarray],
                    unknown: tuple[np.ndarray, np.ndarray]) -> dict:
    """known = (logits, features, labels), unknown = (logits, features). Per score: AUROC, FPR at 95%
    TPR, and at the bundle's calibrated threshold the share of known images accepted, their accuracy
    (selective accuracy) and the share of unknown images rejected."""
    correct = known[0].argmax(1) == known[2]
    known_scores, unknown_scores = detector.scores(*known[:2]), detector.scores(*unknown)
    rows = {}
    for name in detector.available:
        threshold = detector.section["thresholds"][name]
        rows[name] = {**ood_metrics(known_scores[name], unknown_scores[name]),
                      **acceptance(known_scores[name], threshold, correct),
                      "unknown_rejected": float((unknown_scores[name] < threshold).mean()), "threshold": threshold}
    return {"n_known": int(len(correct)), "n_unknown": int(len(unknown[0])), "accuracy": float(correct.mean()),
            "score_used": detector.score_name, "target_tpr": detector.section["target_tpr"], "scores": rows}
