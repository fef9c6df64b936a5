"""Stratified, seeded, group-aware train/val/test split, saved as `manifest.csv`.

Exact and near duplicates form groups (see `audit.duplicate_groups`); a group always lands in one
split, so the test accuracy is never inflated by an image the model saw while training. An existing
`train/ val/ test/` layout (records carrying a `split`) is respected instead.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import UserError
from .manifest import write_manifest
from .scan import Progress



def min_images_per_class(val: float, test: float) -> int:
    """Fewest images a class needs so that every requested split gets at least one."""
    needed = 3 if val > 0 and test > 0 else 2 if (val > 0 or test > 0) else 1
    fractions = [f for f in (val, test) if f > 0]
    return max(needed, math.ceil(1 / min(fractions)) if fractions else 1)


def split(data: str | Path | list[dict], *, out: str | Path | None = None, val: float = 0.15, test: float = 0.15,
          seed: int = 0, near_duplicate_distance: int = 4, progress: Progress | None = None,
          notify: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """`effitune split` from Python: scan DATA (a folder or CSV; or pass scan records), split it
    duplicate-aware and return (manifest rows, notices: class folders left out, look-alike images across
    classes). `notify` hears each notice before the split (which may refuse). With `out`,
    records.jsonl and manifest.csv are written there."""
    from .audit import duplicate_groups, label_conflict_notice
    from .scan import load_ok_records, scan

    if isinstance(data, list):
        records, notices = [r for r in data if r.get("status", "ok") == "ok"], []
    else:
        result = scan(data, out=out, progress=progress)
        records, notices = load_ok_records(result.records_path), list(result.notices)
    groups = duplicate_groups(records, near_duplicate_distance)
    conflict = label_conflict_notice(records, groups, data if not isinstance(data, list) else "DATA")
    notices += [conflict] if conflict else []
    for notice in notices if notify else ():
        notify(notice)
    rows = split_records(records, val=val, test=test, seed=seed, groups=groups)
    if out is not None:
        write_manifest(rows, Path(out) / "manifest.csv")
    return rows, notices


def split_records(records: list[dict], *, val: float = 0.15, test: float = 0.15, seed: int = 0,
                  groups: Iterable[Iterable[int]] | None = None) -> list[dict]:
    """Return manifest rows (one per ok record) with a `split` column.

    `groups`: lists of record indices that must share a split (duplicates); others are singletons.
    """
    if not records:
        raise UserError("No usable images to split. Run `effitune scan DATA` and check the rejected files.")
    given = sum(bool(r.get("split")) for r in records)
    if 0 < given < len(records):
        missing = next(r["path"] for r in records if not r.get("split"))
        raise UserError(f"{given} of {len(records)} images have a split and the others none (e.g. {missing}). "
                        "Give every row of the CSV a split (train, val or test), or leave the column empty "
                        "to let effitune split.")
    leaders, members_of = _groups_by_leader(records, groups)
    if given:
        return _respect_layout(records, leaders, members_of, val, seed)
    labels = _group_labels(records, leaders, members_of)
    _check_class_sizes(records, labels, val, test)
    rows = [_row(record, "train") for record in records]
    _set_splits(rows, leaders, members_of, _assign(leaders, labels, val, test, seed))
    return rows


def _groups_by_leader(records: list[dict], groups) -> tuple[list[int], dict[int, list[int]]]:
    """(leaders, members of each leader): a group is led by its member with the smallest path, and
    leaders come in path order, so the split does not depend on the order the files were found in."""
    group_of = list(range(len(records)))
    for group in groups or ():
        members = sorted(group, key=lambda i: records[i]["path"])
        for index in members:
            group_of[index] = members[0]
    members_of: dict[int, list[int]] = {}
    for index, leader in enumerate(group_of):
        members_of.setdefault(leader, []).append(index)
    return sorted(members_of, key=lambda i: records[i]["path"]), members_of


def _group_labels(records: list[dict], leaders: list[int], members_of: dict[int, list[int]]) -> list[str]:
    """Each group's majority label (ties: the first label by name), what stratification counts."""
    labels = []
    for leader in leaders:
        counts = Counter(records[i]["label"] for i in members_of[leader])
        labels.append(min(counts, key=lambda label: (-counts[label], label)))
    return labels


def _set_splits(rows: list[dict], leaders: list[int], members_of: dict[int, list[int]], parts: list[str]) -> None:
    """Every member of a group gets its leader's split."""
    for leader, part in zip(leaders, parts):
        for index in members_of[leader]:
            rows[index]["split"] = part


def _respect_layout(records: list[dict], leaders: list[int], members_of: dict[int, list[int]], val: float,
                    seed: int) -> list[dict]:
    """Keep an existing train/val/test layout; carve val out of train (whole duplicate groups) when it has none.

    A class with a single distinct train/ image keeps it in train (it gets no val image); groups that
    also hold val/ or test/ images stay where the layout put them.
    """
    rows = [_row(r, r["split"]) for r in records]
    trained = {row["label"] for row in rows if row["split"] == "train"}
    untrained = sorted({row["label"] for row in rows} - trained)
    if untrained:
        raise UserError(f"Class {untrained[0]!r} has images in val/ or test/ but none in train/: the model "
                        "could never learn it. Add its training images under train/, or remove it.")
    if val <= 0 or any(row["split"] == "val" for row in rows):
        return rows
    in_train = [g for g in leaders if all(rows[i]["split"] == "train" for i in members_of[g])]
    labels = _group_labels(records, in_train, members_of)
    counts = Counter(labels)
    carvable = [(g, label) for g, label in zip(in_train, labels) if counts[label] >= 2]
    if not carvable:
        raise UserError("No validation images can be carved out of train/: no class has two distinct training "
                        "images of its own. Add a val/ folder (one sub-folder per class) or more train/ images.")
    leaders, labels = [g for g, _ in carvable], [label for _, label in carvable]
    _set_splits(rows, leaders, members_of, _assign(leaders, labels, val, 0.0, seed,
                                                   what="carve val out of train/ (or add a val/ folder)"))
    return rows


def _assign(items: list[int], labels: list[str], val: float, test: float, seed: int,
            what: str = "split") -> list[str]:
    """Two stratified cuts with scikit-learn: test off the whole, then val off the rest."""
    index = np.arange(len(items))
    parts = np.array(["train"] * len(items), dtype=object)
    label_array = np.asarray(labels, dtype=object)
    rest = index
    try:
        if test > 0:
            rest, test_idx = train_test_split(index, test_size=test, stratify=label_array, random_state=seed)
            parts[test_idx] = "test"
        if val > 0:
            _, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=label_array[rest],
                                          random_state=seed)
            parts[val_idx] = "val"
    except ValueError as error:  # what the checks before cannot foresee (e.g. more classes than val images)
        raise UserError(f"Cannot {what} {val:.0%} val / {test:.0%} test by class with {len(items)} distinct "
                        f"images in {len(set(labels))} classes ({error}). Add images, or change --val/--test.") \
            from None
    return parts.tolist()


def _check_class_sizes(records: list[dict], group_labels: list[str], val: float, test: float) -> None:
    """Every class needs enough images for each split to get one, and enough distinct ones (duplicate
    groups always share a split) for a stratified split to exist at all."""
    files = Counter(r["label"] for r in records)
    if len(files) < 2:
        raise UserError(f"Only one class ({next(iter(files))!r}) has usable images; a classifier needs at "
                        "least two class folders.")
    needed = min_images_per_class(val, test)
    small = {label: n for label, n in files.items() if n < needed}
    if small:
        listing = ", ".join(f"'{label}' has {n}" for label, n in sorted(small.items()))
        raise UserError(f"Too few images to split {val:.0%} val / {test:.0%} test: {listing}; each class needs "
                        f"at least {needed}. Add images, or remove or merge those classes.")
    distinct = Counter(group_labels)
    cuts = (val > 0) + (test > 0)
    few = {label: n for label, n in distinct.items() if n < cuts + 1}
    if few:
        listing = ", ".join(f"'{label}' has {n} ({files[label]} files)" for label, n in sorted(few.items()))
        raise UserError(f"Too few distinct images to split {val:.0%} val / {test:.0%} test: {listing}; exact "
                        f"and near duplicates count once (they always share a split), and each class needs at "
                        f"least {cuts + 1}. Add different images of those classes, or remove or merge them.")


def _row(record: dict, part: str) -> dict:
    return {"path": record["path"], "label": record["label"], "split": part, "sha1": record["sha1"],
            "width": record["width"], "height": record["height"]}
