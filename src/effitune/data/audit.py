"""What is in the data: class balance, sizes, formats, rejected files, duplicates and poor images.

Duplicates matter beyond tidiness: one image in both train and test inflates the test accuracy, and
one image under two labels is a labelling mistake. Exact duplicates share a SHA-1; near duplicates
have perceptual hashes within `near_duplicate_distance` bits, found by multi-index hashing rather
than by comparing every pair. Poor images (dark, light, blurry, low-information, odd aspect or size,
grayscale among colour) are outliers against their own class or data set (`quality.py`).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..config import DataConfig
from ..errors import UserError
from .scan import ScanResult, iter_records, printable
from .manifest import read_manifest
from .quality import KINDS as QUALITY_KINDS
from .quality import QualityIssue, find_quality_issues

_MAX_DISTANCE = 32  # beyond half the bits, unrelated images match
_PAIR_BLOCK = 1 << 22  # bound on the pairs compared at once inside one bucket
_SHOWN = 10  # rows of each list that render() prints; to_dict() has them all
_FEW_IMAGES = 10


# ------------------------------------------------------------------------------ finding duplicates
def near_duplicate_pairs(hashes: Sequence[int] | np.ndarray, distance: int) -> list[tuple[int, int, int]]:
    """All (i, j, hamming) with i < j and hamming(hashes[i], hashes[j]) <= distance, for 64-bit hashes.

    Multi-index hashing: cut the 64 bits into distance + 1 chunks; two hashes within `distance` bits
    agree exactly on at least one chunk (pigeonhole), so only hashes sharing a chunk are compared.
    """
    if not 0 <= distance <= _MAX_DISTANCE:
        raise UserError(f"near_duplicate_distance {distance} must be between 0 and {_MAX_DISTANCE} bits.")
    values = np.asarray(hashes, dtype=np.uint64)
    edges = np.linspace(0, 64, distance + 2).round().astype(int)
    chunks = [(values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
    pairs: list[tuple[int, int, int]] = []
    for index, chunk in enumerate(chunks):
        for first, second in _bucket_pairs(chunk):
            hamming = _popcount(values[first] ^ values[second])
            keep = hamming <= distance
            for earlier in chunks[:index]:  # report each pair once: at the first chunk they share
                keep &= earlier[first] != earlier[second]
            pairs += zip(first[keep].tolist(), second[keep].tolist(), hamming[keep].tolist())
    return sorted((min(i, j), max(i, j), d) for i, j, d in pairs)


def _bucket_pairs(keys: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (a, b), a before b, of items with equal keys, in blocks of bounded size."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(keys)]):
        members = order[start:stop]
        size = len(members)
        if size < 2:
            continue
        rows = max(1, _PAIR_BLOCK // size)
        for top in range(0, size - 1, rows):
            row, col = np.nonzero(np.triu(np.ones((min(rows, size - top), size), dtype=bool), k=top + 1))
            yield members[row + top], members[col]


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(values).astype(np.int64)
    as_bytes = values.astype(np.uint64).view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1).astype(np.int64)


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, first: int, second: int) -> None:
        a, b = self.find(first), self.find(second)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self) -> list[list[int]]:
        members: dict[int, list[int]] = defaultdict(list)
        for item in range(len(self.parent)):
            members[self.find(item)].append(item)
        return sorted(group for group in members.values() if len(group) > 1)


def _link_near(records: Sequence[dict], distance: int, links: _UnionFind) -> dict[int, int]:
    """Union records whose phashes are within `distance`; return {root: largest hamming seen}.

    A phash match is confirmed by the dhash (also within `distance`) where records carry one: on
    small or plain images (icons, 28-px scans, studio shots on white) phash alone matches images
    that merely share a layout, and chains of such matches would glue hundreds of distinct images
    into one "duplicate" group.
    """
    hashed = [i for i, record in enumerate(records) if record.get("phash")]
    values = np.array([int(records[i]["phash"], 16) for i in hashed], dtype=np.uint64)
    joined = []
    for i, j, hamming in near_duplicate_pairs(values, distance):
        a, b = hashed[i], hashed[j]
        if _dhash_agrees(records[a], records[b], distance):
            links.union(a, b)
            joined.append((a, hamming))
    widest: dict[int, int] = {}
    for index, hamming in joined:
        root = links.find(index)
        widest[root] = max(widest.get(root, 0), hamming)
    return widest


def _dhash_agrees(first: dict, second: dict, distance: int) -> bool:
    if not (first.get("dhash") and second.get("dhash")):
        return True
    return bin(int(first["dhash"], 16) ^ int(second["dhash"], 16)).count("1") <= distance


def _link_exact(records: Sequence[dict], links: _UnionFind) -> None:
    first: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.get("sha1"):
            links.union(first.setdefault(record["sha1"], index), index)


def duplicate_groups(records: Sequence[dict], distance: int) -> list[list[int]]:
    """Groups (indices into `records`, 2+ each) joined by equal SHA-1 or phash within `distance`.

    Connected components, so A~B and B~C put A, B, C in one group: the split keeps each in one part.
    """
    links = _UnionFind(len(records))
    _link_exact(records, links)
    _link_near(records, distance, links)
    return links.groups()


def label_conflict_notice(records: Sequence[dict], groups: list[list[int]], data) -> str | None:
    """One line for `split` and `train` when duplicate groups carry different labels (one is likely wrong)."""
    conflicts = [group for group in groups if len({records[i]["label"] for i in group}) > 1]
    if not conflicts:
        return None
    first = conflicts[0][0]
    other = next(i for i in conflicts[0] if records[i]["label"] != records[first]["label"])
    example = " and ".join(f"{printable(records[i]['path'])} ({printable(records[i]['label'])})" for i in (first, other))
    groups = "1 group of look-alike images spans" if len(conflicts) == 1 else \
        f"{len(conflicts)} groups of look-alike images span"
    return (f"{groups} several classes, e.g. "
            f"{example}. Each group stays in one split; `effitune audit {data}` lists them all, to fix the labels.")


# ---------------------------------------------------------------------------------------- report
@dataclass
class DuplicateGroup:
    """Files that are the same image ("exact": same bytes) or look alike ("near")."""

    kind: str
    paths: list[str]
    labels: list[str]
    splits: list[str | None]
    distance: int  # largest phash Hamming distance that joined the group (0 for exact)

    @property
    def label_conflict(self) -> bool:
        return len(set(self.labels)) > 1

    @property
    def leakage(self) -> bool:
        return len({split for split in self.splits if split}) > 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label_conflict": self.label_conflict, "leakage": self.leakage}


@dataclass
class AuditReport:
    """Everything `effitune audit` reports; `to_dict()` for --json, `render()` for the terminal."""

    ok: int
    rejected_count: int
    class_counts: dict[str, int]
    imbalance_ratio: float | None  # largest class / smallest class
    resolution: dict[str, dict[str, dict[str, float]]]  # {label: {"width"|"height": {median, min, max}}}
    aspect_ratio: dict[str, float]  # width / height: min, p05, p25, median, p75, p95, max
    orientation: dict[str, int]  # landscape, portrait, square
    formats: dict[str, int]
    rejected: list[dict[str, Any]]  # path, label, reason, detail
    exact_duplicates: list[DuplicateGroup]
    near_duplicates: list[DuplicateGroup]
    near_duplicate_distance: int
    quality_issues: list[QualityIssue] = field(default_factory=list)  # each kind's worst first
    quality_measured: int = 0  # usable images whose records carry quality statistics
    warnings: list[str] = field(default_factory=list)

    @property
    def within_class(self) -> list[DuplicateGroup]:
        return [g for g in self.exact_duplicates + self.near_duplicates if not g.label_conflict]

    @property
    def across_classes(self) -> list[DuplicateGroup]:
        return [g for g in self.exact_duplicates + self.near_duplicates if g.label_conflict]

    @property
    def across_splits(self) -> list[DuplicateGroup]:
        return [g for g in self.exact_duplicates + self.near_duplicates if g.leakage]

    @property
    def quality_counts(self) -> dict[str, int]:
        counts = Counter(issue.kind for issue in self.quality_issues)
        return {kind: counts[kind] for kind in QUALITY_KINDS if counts[kind]}

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["exact_duplicates"] = [g.to_dict() for g in self.exact_duplicates]
        values["near_duplicates"] = [g.to_dict() for g in self.near_duplicates]
        values["quality_issues"] = [issue.to_dict() for issue in self.quality_issues]
        values["quality_counts"] = self.quality_counts
        values["duplicate_counts"] = {"within_class": len(self.within_class),
                                      "across_classes": len(self.across_classes),
                                      "across_splits": len(self.across_splits)}
        return values

    def render(self) -> Group:
        parts: list[Any] = [self._classes_table(), Text(self._overview())]
        if self.rejected:
            parts.append(_paths_table(f"Rejected files ({len(self.rejected)})", ["reason", "path"],
                                      [[r["reason"], r["path"]] for r in self.rejected]))
        for title, groups in (("Duplicates across splits (leakage)", self.across_splits),
                              ("Duplicates across classes (label conflict)", self.across_classes),
                              ("Duplicates within a class", self.within_class)):
            if groups:
                parts.append(_paths_table(f"{title}: {_plural(len(groups), 'group')}", ["kind", "files"],
                                          [[_kind(g), "\n".join(_located(g))] for g in groups]))
        if self.quality_issues:
            counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in self.quality_counts.items())
            parts.append(_paths_table(f"Image quality: {_plural(len(self.quality_issues), 'finding')} ({counts})",
                                      ["kind", "value", "typical", "file"],
                                      [_quality_row(issue) for issue in self.quality_issues]))
        parts += [Text(f"! {warning}", style="yellow") for warning in self.warnings]
        return Group(*parts)

    def _classes_table(self) -> Table:
        table = Table(title=f"{self.ok} usable images in {len(self.class_counts)} classes")
        for name in ("class", "images", "median size", "smallest", "largest"):
            table.add_column(name, justify="left" if name == "class" else "right")
        for label, count in self.class_counts.items():
            size = self.resolution[label]
            width, height = size["width"], size["height"]
            table.add_row(escape(printable(label)), str(count), f"{width['median']:g}x{height['median']:g}",
                          f"{width['min']:g}x{height['min']:g}", f"{width['max']:g}x{height['max']:g}")
        return table

    def _overview(self) -> str:
        aspect = self.aspect_ratio
        lines = [
            f"imbalance (largest/smallest class): {self.imbalance_ratio:.2f}" if self.imbalance_ratio else "",
            f"aspect ratio w/h: median {aspect['median']:.2f}, 5-95% {aspect['p05']:.2f}-{aspect['p95']:.2f}"
            if aspect else "",
            "orientation: " + ", ".join(f"{n} {name}" for name, n in self.orientation.items()),
            "formats: " + ", ".join(f"{n} {name}" for name, n in self.formats.items()),
            f"duplicates: {_plural(len(self.exact_duplicates), 'exact group')}, "
            f"{_plural(len(self.near_duplicates), 'near group')} (phash distance <= {self.near_duplicate_distance})",
        ]
        return "\n".join(line for line in lines if line)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _kind(group: DuplicateGroup) -> str:
    return "exact" if group.kind == "exact" else f"near (<= {group.distance})"


def _located(group: DuplicateGroup) -> list[str]:
    return [f"{printable(path)}  [{printable(label)}{'/' + split if split else ''}]"
            for path, label, split in zip(group.paths, group.labels, group.splits)]


def _quality_row(issue: QualityIssue) -> list[str]:
    split = f"/{issue.split}" if issue.split else ""
    return [issue.kind.replace("_", " "), f"{issue.value:.3g}", f"{issue.typical:.3g}",
            f"{printable(issue.path)}  [{printable(issue.label)}{split}]"]


def _paths_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, show_lines=True)
    for name in columns:
        table.add_column(name, overflow="fold")  # a path's end (the file name) must stay readable
    for row in rows[:_SHOWN]:
        table.add_row(*(escape(printable(cell)) for cell in row))
    if len(rows) > _SHOWN:
        table.caption = f"... and {len(rows) - _SHOWN} more (all of them in --json)"
    return table


# ----------------------------------------------------------------------------------------- audit
def audit(records: str | Path | ScanResult | Iterable[dict], *, manifest: str | Path | Iterable[dict] | None = None,
          config: DataConfig | None = None) -> AuditReport:
    """Audit scan records (a records.jsonl path, a ScanResult or the dicts themselves), or a data folder
    or CSV (scanned first).

    `manifest` (rows or a manifest.csv) supplies each file's split for the leakage check; without
    it the records' own `split` (an existing train/val/test layout) is used.
    """
    config = config or DataConfig()
    every = _load(records)
    ok = [record for record in every if record["status"] == "ok"]
    if manifest is not None:
        split_of = _splits(manifest)
        ok = [{**record, "split": split_of.get(os.path.normpath(record["path"]))} for record in ok]
    by_label: dict[str, list[dict]] = defaultdict(list)
    for record in ok:
        by_label[record["label"]].append(record)
    class_counts = {label: len(by_label[label]) for label in sorted(by_label)}
    exact, near = _duplicates(ok, config.near_duplicate_distance)
    quality = find_quality_issues(ok)
    report = AuditReport(
        ok=len(ok), rejected_count=len(every) - len(ok), class_counts=class_counts,
        imbalance_ratio=max(class_counts.values()) / min(class_counts.values()) if class_counts else None,
        resolution={label: _sizes(by_label[label]) for label in class_counts},
        aspect_ratio=_aspect(ok),
        orientation=dict(Counter(_orientation(r) for r in ok)),
        formats=dict(Counter(r["format"] for r in ok).most_common()),
        rejected=[{key: r[key] for key in ("path", "label", "reason", "detail")} for r in every
                  if r["status"] != "ok"],
        exact_duplicates=exact, near_duplicates=near, near_duplicate_distance=config.near_duplicate_distance,
        quality_issues=quality.issues, quality_measured=quality.measured,
    )
    report.warnings = _warnings(report)
    if manifest is not None and ok and not any(record["split"] for record in ok):
        report.warnings.append("None of these images is in the manifest given: it lists other data (or other "
                               "paths to it), so leakage across its splits could not be checked.")
    return report


def _load(records: str | Path | ScanResult | Iterable[dict]) -> list[dict]:
    if isinstance(records, ScanResult):
        records = records.records_path
    if isinstance(records, (str, Path)):
        if Path(records).is_dir() or Path(records).suffix.lower() == ".csv":  # a data folder or CSV: scan it first
            from .scan import scan

            records = scan(records).records_path
        if not Path(records).is_file():
            raise UserError(f"Scan records {records} do not exist. Create them with `effitune scan DATA --out DIR`, "
                            "or pass the data folder.")
        return list(iter_records(records))
    return list(records)


def _splits(manifest: str | Path | Iterable[dict]) -> dict[str, str]:
    rows = read_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest
    return {os.path.normpath(row["path"]): row["split"] for row in rows}


def _duplicates(ok: list[dict], distance: int) -> tuple[list[DuplicateGroup], list[DuplicateGroup]]:
    exact_links = _UnionFind(len(ok))
    _link_exact(ok, exact_links)
    exact = [_group("exact", ok, members, 0) for members in exact_links.groups()]
    near_links = _UnionFind(len(ok))
    widest = _link_near(ok, distance, near_links)
    near = [_group("near", ok, members, widest.get(near_links.find(members[0]), 0))
            for members in near_links.groups() if len({ok[i]["sha1"] for i in members}) > 1]
    return exact, near


def _group(kind: str, records: list[dict], members: list[int], distance: int) -> DuplicateGroup:
    chosen = sorted((records[i] for i in members), key=lambda r: r["path"])
    return DuplicateGroup(kind=kind, paths=[r["path"] for r in chosen], labels=[r["label"] for r in chosen],
                          splits=[r.get("split") for r in chosen], distance=distance)


def _sizes(records: list[dict]) -> dict[str, dict[str, float]]:
    return {axis: {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}
            for axis in ("width", "height") if (values := [r[axis] for r in records])}


def _aspect(records: list[dict]) -> dict[str, float]:
    if not records:
        return {}
    ratios = np.array([r["width"] / r["height"] for r in records])
    points = {"min": 0.0, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
    return {name: round(float(np.quantile(ratios, q)), 3) for name, q in points.items()}


def _orientation(record: dict) -> str:
    width, height = record["width"], record["height"]
    return "landscape" if width > height else "portrait" if height > width else "square"


def _warnings(report: AuditReport) -> list[str]:
    warnings = []
    counts = report.class_counts
    if report.imbalance_ratio and report.imbalance_ratio >= 3:
        largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
        warnings.append(f"Classes are imbalanced: '{printable(largest)}' has {report.imbalance_ratio:.1f}x the "
                        f"images of '{printable(smallest)}'. Consider data.balance: weights or sampler.")
    few = [f"'{printable(label)}' ({n})" for label, n in counts.items() if n < _FEW_IMAGES]
    if few:
        warnings.append(f"Classes with fewer than {_FEW_IMAGES} images: {', '.join(few)}. Accuracy on them "
                        "will be unreliable.")
    if report.across_splits:
        warnings.append(f"{_plural(len(report.across_splits), 'duplicate group')} span splits: the test accuracy "
                        "would be inflated. Let `effitune split` keep each group in one split.")
    if report.across_classes:
        warnings.append(f"{_plural(len(report.across_classes), 'duplicate group')} carry different labels: "
                        "check them and fix the labels.")
    if report.quality_issues:
        counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in report.quality_counts.items())
        images = len({issue.path for issue in report.quality_issues})
        warnings.append(f"{_plural(images, 'image')} {'stands' if images == 1 else 'stand'} out from the rest of "
                        f"{'its' if images == 1 else 'their'} class or data set ({counts}): look at "
                        f"{'it' if images == 1 else 'them'}, then fix, replace or remove {'it' if images == 1 else 'them'}.")
    if report.ok and report.quality_measured < report.ok:
        warnings.append(f"{report.ok - report.quality_measured} of {report.ok} records come from a scan older than the "
                        "image-quality checks, which skip them: scan the data again.")
    if report.rejected:
        warnings.append(f"{len(report.rejected)} files were rejected and will not be used.")
    return warnings
