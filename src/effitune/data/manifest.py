"""manifest.csv: the split a run trains on, one row per image (path, label, split, sha1, width, height).

Written once by `split` (or by hand), read by every later step; its SHA-1 travels in the bundle, so a
report or an export can tell whether a manifest is the one a model was trained on.
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

from .. import files
from ..errors import UserError

MANIFEST_COLUMNS = ("path", "label", "split", "sha1", "width", "height")
SPLITS = ("train", "val", "test")


def manifest_order(row: dict) -> tuple:
    """The order of manifest rows (split, label, path): a run trains on its rows in this order, so a run
    started from a folder and one started from its manifest see the same images in the same order."""
    return SPLITS.index(row["split"]), row["label"], row["path"]


def write_manifest(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(path) as temporary, \
            open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as stream:
        writer = csv.DictWriter(stream, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=manifest_order))
    return path


def read_manifest(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Manifest {path} does not exist. Create it with `effitune split DATA --out DIR`.")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as stream:
        reader = csv.DictReader(stream)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path} is not an effitune manifest: missing columns {sorted(missing)}.")
        rows = list(reader)
    for row in rows:
        if row["split"] not in SPLITS:
            raise UserError(f"{path}: split {row['split']!r} for {row['path']} must be one of {SPLITS}.")
        row["width"], row["height"] = int(row["width"]), int(row["height"])
    return rows


def manifest_hash(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def split_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{split: {label: count}}"""
    table: dict[str, Counter] = {part: Counter() for part in SPLITS}
    for row in rows:
        table[row["split"]][row["label"]] += 1
    return {part: dict(sorted(counts.items())) for part, counts in table.items()}
