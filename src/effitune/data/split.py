"""Stratified, seeded, group-aware train/val/test split, saved as `manifest.csv`.

Exact and near duplicates form groups (see `audit.duplicate_groups`); a group always lands in one
split, so the test accuracy is never inflated by an image the model saw while training. An existing
`train/ val/ test/` layout (records carrying a `split`) is respected instead.
"""
from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import UserError

MANIFEST_COLUMNS = ("path", "label", "split", "sha1", "width", "height")
SPLITS = ("train", "val", "test")


def min_images_per_class(val: float, test: float) -> int:
    """Fewest images a class needs so that every requested split gets at least one."""
    needed = 3 if val > 0 and test > 0 else 2 if (val > 0 or test > 0) else 1
    fractions = [f for f in (val, test) if f > 0]
    return max(needed, math.ceil(1 / min(fractions)) if fractions else 1)


def split_records(records: list[dict], *, val: float = 0.15, test: float = 0.15, seed: int = 0,
                  groups: Iterable[Iterable[int]] | None = None) -> list[dict]:
    """Return manifest rows (one per ok record) with a `split` column.

    `groups`: lists of record indices that must share a split (duplicates); others are singletons.
    """
    if not records:
        raise UserError("No usable images to split. Run `effitune scan DATA` and check the rejected files.")
    if all(r.get("split") for r in records):
        return _respect_layout(records, val, seed)
    _check_class_sizes(records, val, test)
    group_of = list(range(len(records)))
    for group in groups or ():
        members = sorted(group)
        for index in members:
            group_of[index] = members[0]
    # Canonical order (by path) makes the split independent of scan order.
    leaders = sorted({g for g in group_of}, key=lambda i: records[i]["path"])
    members_of: dict[int, list[int]] = {}
    for index, leader in enumerate(group_of):
        members_of.setdefault(leader, []).append(index)
    labels = [Counter(records[i]["label"] for i in members_of[g]).most_common(1)[0][0] for g in leaders]
    assignment = _assign(leaders, labels, val, test, seed)
    rows = [None] * len(records)
    for leader, part in zip(leaders, assignment):
        for index in members_of[leader]:
            rows[index] = _row(records[index], part)
    return rows  # type: ignore[return-value]


def _respect_layout(records: list[dict], val: float, seed: int) -> list[dict]:
    """Keep an existing train/val/test layout; carve val out of train only when it has none."""
    rows = [_row(r, r["split"]) for r in records]
    if val > 0 and not any(row["split"] == "val" for row in rows):
        train = [i for i, row in enumerate(rows) if row["split"] == "train"]
        labels = [rows[i]["label"] for i in train]
        for i, part in zip(train, _assign(train, labels, val, 0.0, seed)):
            rows[i]["split"] = part
    return rows


def _assign(items: list[int], labels: list[str], val: float, test: float, seed: int) -> list[str]:
    """Two stratified cuts with scikit-learn: test off the whole, then val off the rest."""
    index = np.arange(len(items))
    parts = np.array(["train"] * len(items), dtype=object)
    label_array = np.asarray(labels, dtype=object)
    rest = index
    if test > 0:
        rest, test_idx = train_test_split(index, test_size=test, stratify=label_array, random_state=seed)
        parts[test_idx] = "test"
    if val > 0:
        _, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=label_array[rest],
                                      random_state=seed)
        parts[val_idx] = "val"
    return parts.tolist()


def _check_class_sizes(records: list[dict], val: float, test: float) -> None:
    counts = Counter(r["label"] for r in records)
    if len(counts) < 2:
        raise UserError(f"Only one class ({next(iter(counts))!r}) has usable images; a classifier needs at "
                        "least two class folders.")
    needed = min_images_per_class(val, test)
    small = {label: n for label, n in counts.items() if n < needed}
    if small:
        listing = ", ".join(f"'{label}' has {n}" for label, n in sorted(small.items()))
        raise UserError(f"Too few images to split {val:.0%} val / {test:.0%} test: {listing}; each class needs "
                        f"at least {needed}. Add images, lower --val/--test, or remove or merge those classes.")


def _row(record: dict, part: str) -> dict:
    return {"path": record["path"], "label": record["label"], "split": part, "sha1": record["sha1"],
            "width": record["width"], "height": record["height"]}


def manifest_order(row: dict) -> tuple:
    """The order of manifest rows (split, label, path): a run trains on its rows in this order, so a run
    started from a folder and one started from its manifest see the same images in the same order."""
    return SPLITS.index(row["split"]), row["label"], row["path"]


def write_manifest(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as stream:
        writer = csv.DictWriter(stream, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=manifest_order))
    temporary.replace(path)
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
