"""Has what the model is shown changed since training? One check, three views.

1. The share of new images the bundle flags as unknown, against the share flagged among the
   validation images at calibration (about 5%), with a one-sided Fisher exact test (the validation
   share is itself an estimate, so a small validation split does not raise false alarms).
2. A two-sample test on the L2-normalized pooled features: the kernel maximum mean discrepancy
   (MMD^2, unbiased; Gretton et al., 2012) between the new images and the bundle's held-out
   validation features, RBF kernel with the median-heuristic bandwidth, p-value by permutation.
3. The predicted-class mix of the new images against the validation images' predicted mix.
The drift score is the MMD^2. The verdict: drift when either test is significant; strong when the
MMD^2 or the unknown share is large, moderate otherwise.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy.stats import fisher_exact

from .errors import UserError
from .ood import UnknownDetector, l2_normalize, require_detector
from .predict import embed

MAX_IMAGES = 1000  # new images compared (a random subsample beyond this): the kernel is (n + m)^2
PERMUTATIONS = 500
ALPHA = 0.01  # significance level of the permutation test
STRONG_MMD2 = 0.1  # MMD^2 (median-heuristic RBF) from which a significant shift is called strong
STRONG_UNKNOWN_SHARE = 0.3  # ... or when this share of the new images is flagged unknown
FEW_IMAGES = 30  # below this, no significant shift means "too few images to tell", not "no drift"


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS,
                         seed: int = 0) -> tuple[float, float, float]:
    """(unbiased MMD^2 of x vs y, permutation p-value, the null distribution's 1 - ALPHA quantile)."""
    pooled = np.concatenate([x, y]).astype(np.float64)
    squared = np.maximum((pooled ** 2).sum(1)[:, None] + (pooled ** 2).sum(1)[None] - 2 * pooled @ pooled.T, 0)
    off_diagonal = squared[~np.eye(len(pooled), dtype=bool)]
    kernel = np.exp(-squared / max(float(np.median(off_diagonal)), 1e-12))
    rng = np.random.default_rng(seed)
    members = np.zeros((len(pooled), permutations + 1))
    members[:len(x), 0] = 1  # column 0: the observed split; the rest: random relabelings
    for column in range(1, permutations + 1):
        members[rng.permutation(len(pooled))[:len(x)], column] = 1
    statistics = _unbiased_mmd2(kernel, members, len(x), len(y))
    observed, null = statistics[0], statistics[1:]
    p_value = (1 + (null >= observed).sum()) / (1 + permutations)
    return float(observed), float(p_value), float(np.quantile(null, 1 - ALPHA))


def _unbiased_mmd2(kernel: np.ndarray, members: np.ndarray, n: int, m: int) -> np.ndarray:
    """MMD^2 for every column of a 0/1 membership matrix (1 = first sample); the kernel's diagonal is 1."""
    others = 1 - members
    k_members = kernel @ members
    within_x = (members * k_members).sum(0) - n
    within_y = (others * (kernel @ others)).sum(0) - m
    across = (others * k_members).sum(0)
    return within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2 * across / (n * m)


def drift_report(detector: UnknownDetector, classes: list[str], logits: np.ndarray, features: np.ndarray,
                 seed: int = 0) -> dict:
    """The drift check on already computed (logits, features) of the new images."""
    if len(logits) < 2 or len(detector.reference) < 2:
        raise UserError(f"The drift check needs at least 2 new and 2 reference images; got {len(logits)} new and "
                        f"{len(detector.reference)} reference (validation) images.")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(features), MAX_IMAGES, replace=False)) if len(features) > MAX_IMAGES \
        else np.arange(len(features))
    pooled = l2_normalize(detector.pooled(features)[sample])
    score, p_value, null_quantile = mmd_permutation_test(pooled, detector.reference,
                                                         seed=seed)
    flagged = int(detector.is_unknown(detector.score(logits, features)).sum())
    unknown_share = flagged / len(logits)
    expected = 1 - float(detector.section["val_tpr"])
    val_flagged = round(expected * detector.section["n_val"])
    table = [[flagged, len(logits) - flagged], [val_flagged, detector.section["n_val"] - val_flagged]]
    unknown_p = float(fisher_exact(table, alternative="greater").pvalue)
    predicted = np.bincount(logits.argmax(1), minlength=len(classes)) / len(logits)
    reference_share = np.bincount(detector.reference_predicted, minlength=len(classes)) / len(detector.reference)
    verdict = _verdict(score, min(p_value, unknown_p), unknown_share)
    if verdict == "no drift detected" and len(logits) < FEW_IMAGES:
        verdict = "too few images to tell"
    moved = int(np.argmax(np.abs(predicted - reference_share)))
    class_note = f"largest class change: {classes[moved]} {reference_share[moved]:.0%} -> {predicted[moved]:.0%}"
    return {
        "n_images": int(len(logits)), "n_compared": int(len(sample)), "n_reference": int(len(detector.reference)),
        "drift_score": score, "score_name": "mmd2_rbf_median", "p_value": p_value,
        "null_threshold": null_quantile, "alpha": ALPHA,
        "unknown_share": unknown_share, "expected_unknown_share": expected, "unknown_p_value": unknown_p,
        "unknown_score_name": detector.score_name,
        "class_shift": float(0.5 * np.abs(predicted - reference_share).sum()),  # total variation distance
        "per_class": [{"class": name, "reference_share": float(reference_share[i]), "new_share": float(predicted[i])}
                      for i, name in enumerate(classes)],
        "verdict": verdict, "message": _message(verdict, score, p_value, unknown_share, expected, unknown_p,
                                                       class_note),
    }


def _verdict(score: float, p_value: float, unknown_share: float) -> str:
    if p_value >= ALPHA:
        return "no drift detected"
    if score >= STRONG_MMD2 or unknown_share >= STRONG_UNKNOWN_SHARE:
        return "strong"
    return "moderate"


def _message(verdict: str, score: float, p_value: float, unknown_share: float, expected: float,
             unknown_p: float, class_note: str) -> str:
    features = f"feature shift MMD^2 {score:.4f} (p = {p_value:.3f})"
    flagged = (f"{unknown_share:.0%} of the new images look like no known class, against {expected:.0%} of the "
               f"validation images (p = {unknown_p:.3f})")
    if verdict == "no drift detected":
        return f"No drift detected: {features}; {flagged}."
    if verdict == "too few images to tell":
        return (f"Too few images to tell: nothing significant, but fewer than {FEW_IMAGES} new images cannot show a "
                f"moderate drift. {features}; {flagged}.")
    because = " and ".join(name for name, p in (("the features moved", p_value), ("more images look unknown",
                                                                                  unknown_p)) if p < ALPHA)
    advice = ("the model is seeing a different kind of image: check the source, label a sample and re-train"
              if verdict == "strong" else "the new images differ measurably from validation: check accuracy on a "
              "labelled sample")
    return f"{verdict.capitalize()} drift: {because}. {features}; {flagged}; {class_note}; {advice}."


def check(predictor, sources: Iterable, seed: int = 0) -> dict:
    """The drift check for image files / folders / globs against the bundle's reference."""
    detector = require_detector(predictor)
    embedded = embed(predictor, sources)
    paths, logits, features, failed = embedded.paths, embedded.logits, embedded.features, embedded.failed
    if len(paths) < 2:
        raise UserError(f"The drift check needs at least 2 readable images; found {len(paths)} "
                        f"({len(failed)} unreadable).")
    return {**drift_report(detector, predictor.classes, logits, features, seed), "n_unreadable": len(failed)}
