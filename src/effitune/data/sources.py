"""One reader for every data source a verb takes: rows of labelled images, with their split where known.

A source is a DATA folder (one subfolder per class, or train/ val/ test/ split folders of them), a
CSV of `path,label` with or without a `split` column (paths or URLs), a run's manifest.csv, or a
records.jsonl from `effitune scan`. Every verb that reads labelled images (`evaluate`, `report`,
`audit --model`, `ood-eval`, export's parity and calibration images) reads them here, so one file
means the same to all of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .manifest import MANIFEST_COLUMNS, read_manifest
from .scan import RECORDS_FILE, iter_records, scan


@dataclass
class Source:
    """The readable labelled images of a source.

    `rows`: dicts with path, label, split (None when the source is not split) and sha1 (where known).
    `records`: the scan records by normalised path (size, format, EXIF, ...), or None for a manifest
    without its records.jsonl beside it.
    """
    path: Path
    rows: list[dict]
    records: dict[str, dict] | None

    @property
    def is_split(self) -> bool:
        return any(row.get("split") for row in self.rows)

    def split(self, name: str | None) -> list[dict]:
        """The rows of split `name` (default test); an unsplit source only as a whole (`name` None)."""
        if not self.is_split:
            if name is not None:
                raise UserError(f"{self.path} is not split (no train/ val/ test/ folders, no split column): it is "
                                f"used whole. Leave out --split {name}, or pass the run's manifest.csv.")
            return self.rows
        chosen = [row for row in self.rows if row.get("split") == (name or "test")]
        if not chosen:
            raise UserError(f"{self.path} has no images in its '{name or 'test'}' split. Use --split "
                            "train|val|test.")
        return chosen


def is_manifest(path: str | Path) -> bool:
    """A CSV with every manifest column (path, label, split, sha1, width, height); a plain
    `path,label[,split]` CSV is not one: it is scanned like a folder."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="surrogateescape") as stream:
        header = {name.strip().lower() for name in stream.readline().split(",")}
    return set(MANIFEST_COLUMNS) <= header


def read_source(data: str | Path, *, manifest: str | Path | None = None) -> Source:
    """Every readable labelled image of `data`; `manifest` (a manifest.csv) gives the splits instead.

    A manifest is read as it is (and the records.jsonl beside it, if any); any other source is scanned
    now, and its unreadable files are left out (`effitune scan` lists them with their reasons).
    """
    data = Path(data)
    if not data.exists() and "://" not in str(data):
        raise UserError(f"{data} does not exist. Pass a DATA folder, a CSV of path,label[,split] or a "
                        "manifest.csv.")
    if is_manifest(data):
        rows = read_manifest(data)
        beside = data.parent / RECORDS_FILE
        records = list(iter_records(beside)) if beside.is_file() else None
    else:
        records_path = data if data.suffix == ".jsonl" else scan(data, min_classes=1).records_path
        records = list(iter_records(records_path))
        rows = [{"path": r["path"], "label": r["label"], "split": r.get("split"), "sha1": r.get("sha1")}
                for r in records if r["status"] == "ok"]
    if manifest is not None:
        split_of = {os.path.normpath(r["path"]): r["split"] for r in read_manifest(manifest)}
        rows = [{**row, "split": split_of.get(os.path.normpath(row["path"]))} for row in rows]
    if not rows:
        raise UserError(f"{data} holds no readable labelled images. `effitune scan {data}` lists what it found "
                        "and why each file was left out.")
    by_path = {os.path.normpath(r["path"]): r for r in records if r.get("status") == "ok"} if records else None
    return Source(data, rows, by_path)


def labelled_rows(data: str | Path, split: str | None = None) -> list[dict]:
    """The rows to evaluate on: a split source's `split` (default test), an unsplit one whole."""
    return read_source(data).split(split)
