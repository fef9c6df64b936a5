"""Evaluate a bundle on labelled images: a manifest's split, or a whole folder / CSV."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..bundle import read_meta
from ..data.split import MANIFEST_COLUMNS, manifest_hash, read_manifest
from ..errors import UserError
from ..predict import Predictor, softmax
from .metrics import classification_metrics


def labelled_paths(data: str | Path, split: str | None = None) -> list[tuple[str, str]]:
    """(path, label) of labelled images: a manifest's or split CSV's `split` (default test), a split
    folder's (train/ val/ test/, default test), or all of a plain folder or CSV (`split` must be None)."""
    return [(row["path"], row["label"]) for row in labelled_rows(data, split)]


def labelled_rows(data: str | Path, split: str | None = None) -> list[dict]:
    """`labelled_paths` as rows (path, label, sha1 where known)."""
    data = Path(data)
    if data.suffix == ".csv" and data.is_file():
        with open(data, encoding="utf-8", errors="surrogateescape") as stream:
            header = stream.readline()
        if set(MANIFEST_COLUMNS) <= {name.strip().lower() for name in header.split(",")}:  # a manifest
            rows = [r for r in read_manifest(data) if r["split"] == (split or "test")]
            if not rows:
                raise UserError(f"{data} has no rows in split '{split or 'test'}'. Use --split train|val|test.")
            return rows
    from ..data.scan import load_ok_records, scan

    records = load_ok_records(scan(data, progress=False, min_classes=1).records_path)
    if not any(r.get("split") for r in records):
        if split is not None:
            raise UserError(f"{data} is not split (no train/ val/ test/ folders, no split column): it is "
                            f"evaluated whole. Leave out --split {split}, or pass the run's manifest.csv.")
        return records
    chosen = [r for r in records if r.get("split") == (split or "test")]
    if not chosen:
        raise UserError(f"{data} has no images in its '{split or 'test'}' split. Use --split train|val|test.")
    return chosen


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
                    predictor: Predictor | None = None) -> dict:
    """Metrics of `bundle` on labelled images (`labelled_paths`); `trained_on`: how many of them the
    model was trained or validated on (a warning says so when any)."""
    predictor = predictor or Predictor(bundle)
    rows = labelled_rows(data, split)
    pairs = [(row["path"], row["label"]) for row in rows]
    seen = trained_on(bundle, rows)
    if seen:
        warnings.warn(f"{seen} of the {len(pairs)} images in {data} trained or validated this model (they are in "
                      f"the train/val split of {Path(bundle).parent / 'manifest.csv'}): the accuracy is optimistic. "
                      "Evaluate on the run's test split: effitune evaluate BUNDLE RUN/manifest.csv.", stacklevel=2)
    unknown = sorted({label for _, label in pairs} - set(predictor.classes))
    if unknown:
        raise UserError(f"{data} has classes the model does not know: {unknown[:5]}. The bundle knows "
                        f"{predictor.classes[:10]}{'...' if len(predictor.classes) > 10 else ''}.")
    index = {name: i for i, name in enumerate(predictor.classes)}
    labels = np.array([index[label] for _, label in pairs])
    chunk = 256  # images in RAM at a time: evaluation memory does not grow with the data set
    chunks = (np.stack([_image(predictor, path, data) for path, _ in pairs[start:start + chunk]])
              for start in range(0, len(pairs), chunk))
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
