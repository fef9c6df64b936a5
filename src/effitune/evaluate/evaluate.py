"""Evaluate a bundle on labelled images: a manifest's split, or a whole folder / CSV."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..bundle import read_meta
from ..data.manifest import manifest_hash, read_manifest
from ..data.sources import labelled_rows
from ..errors import EffituneWarning, UserError
from ..predict import Predictor, row_images
from ..runtime.batching import softmax
from .metrics import classification_metrics


def trained_on(bundle: str | Path, rows: list[dict]) -> int:
    """How many of `rows` are train or val images of the run that made `bundle` (its manifest.csv, when
    the bundle still sits in its run folder), by path or by content (a copied or moved image counts):
    evaluating on them flatters the model."""
    manifest = Path(bundle).resolve().parent / "manifest.csv"
    trained = read_meta(bundle).get("manifest_sha1")
    if not manifest.is_file() or (trained and manifest_hash(manifest) != trained):
        return 0  # no run folder around the bundle, or another run's manifest
    seen = [r for r in read_manifest(manifest) if r["split"] in ("train", "val")]
    contents = {r["sha1"] for r in seen if r.get("sha1")}
    paths = {os.path.normpath(r["path"]) for r in seen}
    return sum(r.get("sha1") in contents or os.path.normpath(r["path"]) in paths for r in rows)


def evaluate_bundle(bundle: str | Path, data: str | Path, split: str | None = None,
                    predictor: Predictor | None = None, cache: str | Path | None = None) -> dict:
    """Metrics of `bundle` on labelled images (`data.sources.labelled_rows`: a split source's `split`,
    default test, or an unsplit one whole); `trained_on`: how many of them the
    model was trained or validated on (a warning says so when any). A run's own images are read from
    its resize-once cache (`cache`: the run's `cache_root`, default effitune's), others decoded."""
    predictor = predictor or Predictor(bundle)
    rows = labelled_rows(data, split)
    pairs = [(row["path"], row["label"]) for row in rows]
    seen = trained_on(bundle, rows)
    if seen:
        warnings.warn(f"{seen} of the {len(pairs)} images in {data} trained or validated this model (they are in "
                      f"the train/val split of {Path(bundle).parent / 'manifest.csv'}): the accuracy is optimistic. "
                      "Evaluate on the run's test split: effitune evaluate BUNDLE RUN/manifest.csv.", EffituneWarning, stacklevel=2)
    unknown = sorted({label for _, label in pairs} - set(predictor.classes))
    if unknown:
        raise UserError(f"{data} has classes the model does not know: {unknown[:5]}. The bundle knows "
                        f"{predictor.classes[:10]}{'...' if len(predictor.classes) > 10 else ''}.")
    index = {name: i for i, name in enumerate(predictor.classes)}
    labels = np.array([index[label] for _, label in pairs])
    chunks = row_images(predictor, rows, cache=cache, read=lambda path: _image(predictor, path, data))
    logits = predictor.run_pass(chunks, len(pairs))[0]  # ONNX Runtime on a CPU when it agrees with PyTorch
    return {**classification_metrics(softmax(logits, predictor.temperature), labels, predictor.classes),
            "trained_on": seen}


def _image(predictor: Predictor, path: str, data: str | Path) -> np.ndarray:
    try:
        return predictor.preprocess(path)
    except Exception as error:  # noqa: BLE001 - a missing or broken file (or URL) is the user's to fix
        reason = "it does not exist" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise UserError(f"{path} (listed in {data}) cannot be read: {reason}. Restore or remove it, then run "
                        "`effitune split` again.") from None
