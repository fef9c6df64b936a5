"""How well a bundle tells images of no class from known ones: every unknown-image score side by side."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from ..data.sources import labelled_rows
from ..errors import EffituneWarning, UserError
from ..ood import evaluate_arrays, require_detector
from ..predict import Predictor, embed


def evaluate_unknown(predictor: Predictor, known: str | Path, unknown: Iterable, split: str | None = None) -> dict:
    """Every score on labelled known images (any data source; a split one's `split`, default test) vs
    images of no class (files, folders, globs): AUROC, FPR at 95% TPR and the calibrated threshold's
    acceptance (`ood.evaluate_arrays`), plus how many images could not be read."""
    detector = require_detector(predictor)
    label_of = {row["path"]: row["label"] for row in labelled_rows(known, split)}
    seen = embed(predictor, list(label_of))
    other = embed(predictor, unknown)
    both = {os.path.realpath(path) for path in seen.paths} & {os.path.realpath(path) for path in other.paths}
    if both:
        warnings.warn(f"{len(both)} of the unknown images are also known images (e.g. {sorted(both)[0]}): the "
                      "scores will look worse than they are. Give images of no class as the unknown set.",
                      EffituneWarning, stacklevel=2)
    if not len(seen.paths) or not len(other.paths):
        raise UserError(f"ood-eval needs readable known and unknown images; found {len(seen.paths)} known and "
                        f"{len(other.paths)} unknown ({len(other.failed)} unreadable).")
    labels = np.array([predictor.classes.index(label_of[p]) for p in seen.paths])
    return {**evaluate_arrays(detector, (seen.logits, seen.features, labels), (other.logits, other.features)),
            "n_unreadable": len(other.failed)}
