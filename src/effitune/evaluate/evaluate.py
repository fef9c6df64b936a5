"""Evaluate a bundle on labelled images: a manifest's split, or a whole folder / CSV."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.split import read_manifest
from ..errors import UserError
from ..predict import Predictor, softmax
from .metrics import classification_metrics


def labelled_paths(data: str | Path, split: str = "test") -> list[tuple[str, str]]:
    data = Path(data)
    if data.suffix == ".csv" and data.is_file():
        with open(data, encoding="utf-8", errors="surrogateescape") as stream:
            header = stream.readline()
        if "split" in header:
            rows = [r for r in read_manifest(data) if r["split"] == split]
            if not rows:
                raise UserError(f"{data} has no rows in split '{split}'. Use --split train|val|test.")
            return [(r["path"], r["label"]) for r in rows]
    from ..data.scan import load_ok_records, scan

    result = scan(data, progress=False)
    return [(r["path"], r["label"]) for r in load_ok_records(result.records_path)]


def evaluate_bundle(bundle: str | Path, data: str | Path, split: str = "test", predictor: Predictor | None = None) -> dict:
    predictor = predictor or Predictor(bundle)
    pairs = labelled_paths(data, split)
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
    return classification_metrics(softmax(logits, predictor.temperature), labels, predictor.classes)


def _image(predictor: Predictor, path: str, data: str | Path) -> np.ndarray:
    try:
        return predictor.preprocess(path)
    except Exception as error:  # noqa: BLE001 - a missing or broken file (or URL) is the user's to fix
        reason = "it does not exist" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise UserError(f"{path} (listed in {data}) cannot be read: {reason}. Restore or remove it, then run "
                        "`effitune split` again.") from None
