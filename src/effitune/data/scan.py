"""Walk a labelled image folder (or a CSV of path,label) and check every file, one JSON line each.

The data folder is only ever read. Records stream to `records.jsonl` and the summary is counted as
they arrive, so memory does not grow with the number of files. Records come in filesystem order:
anything that needs a canonical order (the split) sorts them itself.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageStat, UnidentifiedImageError
from rich.markup import escape
from rich.table import Table

from .. import distributed
from ..config import DataConfig
from ..errors import UserError
from . import quality
from .images import (IMAGE_EXTENSIONS, NEEDS_PLUGIN, decode, decode_side, is_image_name, is_url, read_bytes,
                     resize_center_crop)

if TYPE_CHECKING:
    from .cache import ImageCache

RECORDS_FILE = "records.jsonl"
REASONS = ("missing file", "unreadable", "empty file", "not an image", "truncated or corrupt",
           "decompression bomb", "too small")
# Folder names (lower case) that mark an existing split layout, and the split each one means.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
# First word of a record note -> the name it is counted under in the summary.
NOTE_KINDS = {"animated:": "animated", "extension": "extension mismatch", "mode": "converted to RGB",
              "EXIF": "EXIF orientation applied"}
_SAME_FORMAT = {"MPO": "JPEG"}  # multi-picture JPEGs from cameras are still JPEGs
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_CHUNKSIZE = 16
# The hashes (32x32 and 9x8 resizes) and the mean colour need few pixels: a JPEG decodes reduced to
# about this shorter side (images.reduced_decode), every byte still read, so corruption is still found.
HASH_DECODE_SIDE = 256
_MAX_WARNINGS = 20

Task = tuple[str, str, "str | None"]  # absolute path, label, split
Progress = Callable[[int, "int | None"], None]  # (files checked, files in all)
Unit = tuple[str, str, "str | None"]  # a class folder, its label, its split


def printable(text: str) -> str:
    """A file name fit for the terminal: undecodable bytes (kept as surrogates) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --------------------------------------------------------------------------------------- one file
def check_file(task: Task, *, max_pixels: int, min_side: int) -> dict[str, Any]:
    """Check one file (runs in a worker process); never raises for a bad file."""
    return check_and_resize(task, max_pixels=max_pixels, min_side=min_side)[0]


def check_and_resize(task: Task, *, max_pixels: int, min_side: int, size: int | None = None,
                     from_side: int = 0) -> tuple[dict[str, Any], np.ndarray | None]:
    """Check one file and, from the same decode, its resize-once cache entry at `size`: a good image
    whose shorter side is at least `from_side` gets exactly what `load_for_model(path, size)` returns
    (decoded at the same reduced scale), any other one None. Never raises for a bad file."""
    path, label, split = task
    record: dict[str, Any] = {
        "path": path, "label": label, "split": split, "status": "ok", "reason": None, "detail": None,
        "width": None, "height": None, "mode": None, "format": None, "orientation": None, "frames": None,
        "bytes": None, "sha1": None, "phash": None, "dhash": None, "mean_rgb": None,
        "quality": None, "notes": [],
    }
    data = None  # a URL's bytes, fetched once rather than once per step below
    try:
        if is_url(path):
            data = read_bytes(path)
            record["bytes"], record["sha1"] = len(data), hashlib.sha1(data).hexdigest()
        else:
            record["bytes"], record["sha1"] = _size_and_sha1(path)
    except FileNotFoundError:
        return _reject(record, "missing file", "no such file (a broken link, or removed during the scan)")
    except OSError as error:
        return _reject(record, "unreadable", f"cannot read the file: {error.strerror or error}")
    except Exception as error:  # fsspec: an unknown protocol, a backend not installed (s3fs, gcsfs), HTTP errors
        return _reject(record, "unreadable", f"cannot read the URL: {type(error).__name__}: {error}")
    if record["bytes"] == 0:
        return _reject(record, "empty file", "the file has 0 bytes")
    header: dict[str, Any] = {}  # what the file says of itself, as far as it was read
    with _strict_pillow(max_pixels):
        try:
            resize = size is not None and _shorter_side(path if data is None else data) >= from_side
            image, header = decode(path if data is None else data, max_pixels=max_pixels,
                                   at_least=decode_side(size) if resize else HASH_DECODE_SIDE, header=header)
        except UnidentifiedImageError:
            return _reject(record, "not an image", _unidentified_detail(path))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            return _reject(record, "decompression bomb", _bomb_detail(error, max_pixels))
        except Exception as error:  # every decoder failure means the same thing to the user
            return _reject(_described(record, header), "truncated or corrupt", f"{type(error).__name__}: {error}")
    _described(record, header)
    record["width"], record["height"] = oriented_size(header["size"], header["orientation"])
    record["phash"] = str(imagehash.phash(image))
    record["dhash"] = str(imagehash.dhash(image))  # second, independent hash: confirms phash matches
    record["mean_rgb"] = [round(value, 2) for value in ImageStat.Stat(image).mean]
    record["quality"] = quality.measure(image)  # brightness, blur, entropy, colour: judged by the audit
    record["notes"] = _notes(path, header)
    if min(record["width"], record["height"]) < min_side:
        return _reject(record, "too small", f"{record['width']}x{record['height']}: shorter side under min_side "
                       f"{min_side}")
    return record, (np.asarray(resize_center_crop(image, size), dtype=np.uint8) if resize else None)


def oriented_size(stored: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """The full image's (width, height) as shown: EXIF orientations 5-8 turn it a quarter
    (`ImageOps.exif_transpose`); the decoded image may be reduced, so its own size is not it."""
    width, height = stored
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _size_and_sha1(path: str) -> tuple[int, str]:
    if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe named x.jpg would block the scan forever
        raise OSError(f"not a regular file (a pipe, socket or device): {printable(path)}")
    digest, size = hashlib.sha1(), 0
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _unidentified_detail(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in NEEDS_PLUGIN and suffix not in _registered_extensions():  # else: a broken file, as any other
        return (f"this Pillow cannot decode {suffix} files: convert them to JPEG or PNG, or install "
                f"{NEEDS_PLUGIN[suffix]} and scan again")
    return "Pillow does not recognise the content as an image"


def _bomb_detail(error: Exception, max_pixels: int) -> str:
    """Pillow words its hard stop with its own threshold (twice the limit): say it with the user's."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1))} pixels" if found else "the image"
    return f"{pixels} is over max_pixels {max_pixels} (raise data.max_pixels if the image is genuine)"


def _reject(record: dict[str, Any], reason: str, detail: str) -> tuple[dict[str, Any], None]:
    record.update(status="rejected", reason=reason, detail=detail)
    return record, None


@contextlib.contextmanager
def _strict_pillow(max_pixels: int) -> Iterator[None]:
    """Refuse truncated files and over-large images whatever the rest of the process set."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _described(record: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    """The record with what the file said of itself (format, mode, stored size, frames, orientation)."""
    record.update({key: header[key] for key in ("mode", "format", "frames", "orientation") if key in header})
    if "size" in header:
        record["width"], record["height"] = header["size"]
    return record


def _shorter_side(source: str | bytes) -> int:
    """The stored image's shorter side, from its header (no pixels decoded)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return min(image.size)


def _notes(path: str, header: dict[str, Any]) -> list[str]:
    notes = []
    if header["frames"] > 1:
        notes.append(f"animated: first frame kept ({header['frames']} frames)")
    suffix = os.path.splitext(path)[1].lower()
    expected = _registered_extensions().get(suffix)
    content = _SAME_FORMAT.get(header["format"], header["format"])
    if expected is not None and content != expected:
        notes.append(f"extension {suffix} but content {header['format']}")
    mode = header["mode"]
    if mode in ("L", "RGB") and header["transparency"]:
        notes.append(f"mode {mode} with a transparent colour key: converted to RGB (transparency over white)")
    elif mode in _ALPHA_MODES or (mode == "P" and header["transparency"]):
        notes.append(f"mode {mode} converted to RGB (transparency over white)")
    elif mode != "RGB":
        notes.append(f"mode {mode} converted to RGB")
    if header["orientation"] in range(2, 9):
        notes.append(f"EXIF orientation {header['orientation']} applied")
    elif header["orientation"] not in (None, 1):
        notes.append(f"invalid EXIF orientation {header['orientation']} (valid: 1-8): ignored")
    return notes


@functools.lru_cache(maxsize=1)
def _registered_extensions() -> dict[str, str]:
    return Image.registered_extensions()


# -------------------------------------------------------------------------------- finding files
@dataclass
class _Walker:
    """Yields (path, label, split) tasks lazily and counts what it skips on the way."""

    skipped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)

    def folder_tasks(self, root: Path, units: list[Unit]) -> Iterator[Task]:
        visited = {_dir_key(root)} | {_dir_key(directory) for directory, _, _ in units}
        for directory, label, split in units:
            yield from self._walk(directory, label, split, visited)

    def _walk(self, directory: str, label: str, split: str | None, visited: set) -> Iterator[Task]:
        try:
            entries = os.scandir(directory)
        except OSError as error:
            self._warn("unreadable_dirs", f"cannot list {printable(directory)}: {error.strerror or error}")
            return
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    self.skipped["skipped_hidden"] += 1
                elif _is_dir(entry):
                    try:
                        key = _dir_key(entry.path)
                    except OSError as error:
                        self._warn("unreadable_dirs", f"cannot open {printable(entry.path)}: {error.strerror}")
                        continue
                    if key in visited:  # a symlink back up the tree, or a second link to one folder
                        self.skipped["skipped_repeated_dirs"] += 1
                        continue
                    visited.add(key)
                    yield from self._walk(entry.path, label, split, visited)
                elif is_image_name(entry.name):
                    yield entry.path, label, split
                else:
                    self.skipped["skipped_non_image"] += 1

    def tasks(self, root: Path, layout: str, units: list[Unit]) -> Iterator[Task]:
        return self.csv_tasks(root) if layout == "csv" else self.folder_tasks(root, units)

    def csv_tasks(self, csv_path: Path) -> Iterator[Task]:
        base = csv_path.parent
        first: dict[str, tuple[int, str]] = {}  # location -> (line, label): a repeated row is read once
        repeats: list[str] = []
        with _open_csv(csv_path) as reader:
            for row in reader:
                path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not path or not label:
                    raise UserError(f"{csv_path}, line {reader.line_num}: every row needs both a path and a "
                                    "label. Fill in or delete that row.")
                split = (row.get("split") or "").strip().lower() or None
                if split is not None and split not in SPLIT_FOLDERS:
                    raise UserError(f"{csv_path}, line {reader.line_num}: split {split!r} must be one of "
                                    "train, val, test (or leave the column empty).")
                location = path if is_url(path) else os.path.abspath(base / path)  # URLs: read via fsspec
                if location in first:
                    line, kept = first[location]
                    other = f" with label {printable(label)!r}, kept as {printable(kept)!r}" if label != kept else ""
                    repeats.append(f"line {reader.line_num} repeats line {line}'s {printable(path)}{other}")
                    continue
                first[location] = (reader.line_num, label)
                yield location, label, SPLIT_FOLDERS.get(split or "")
        if repeats:
            self.skipped["skipped_repeated_rows"] += len(repeats)
            self.warnings.append(f"{csv_path}: {len(repeats)} row(s) list a file already listed and are left out "
                                 f"(each file is read once), e.g. {'; '.join(repeats[:3])}.")

    def _warn(self, counter: str, message: str) -> None:
        self.skipped[counter] += 1
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _sub_folders(path: str) -> set[str] | None:
    """Names of the visible sub-folders of `path`; None when it cannot be listed (reported elsewhere)."""
    try:
        with os.scandir(path) as entries:
            return {entry.name for entry in entries if _is_dir(entry) and not entry.name.startswith(".")}
    except OSError:
        return None


def _has_sub_folders(folders: list[os.DirEntry]) -> bool:
    return any(_sub_folders(folder.path) for folder in folders)


def _dir_key(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def _open_csv(csv_path: Path) -> Iterator[csv.DictReader]:
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as stream:
        reader = csv.DictReader(stream)
        columns = [name.strip().lower() for name in reader.fieldnames or ()]
        if not {"path", "label"} <= set(columns):
            raise UserError(f"{csv_path} needs the columns 'path' and 'label' (found: {', '.join(columns) or 'none'}). "
                            "Rename the header row, e.g. 'path,label'.")
        reader.fieldnames = columns
        yield reader


def _plan(root: Path, min_classes: int = 2) -> tuple[str, list[Unit], Counter]:
    """Decide the layout and list the class folders: (layout, [(folder, label, split)], skipped)."""
    skipped: Counter = Counter()
    if not root.exists():
        raise UserError(f"{root} does not exist. Pass a folder with one sub-folder per class, or a CSV file "
                        "with path,label columns.")
    if root.is_file() and root.suffix.lower() == ".csv":
        with _open_csv(root):  # fail on a bad header before any work
            return "csv", [], skipped
    if not root.is_dir():
        raise UserError(f"{root} is a file but not a CSV. Pass the folder of class folders, or a CSV with "
                        "path,label columns.")
    top = _list_dir(root, skipped)
    if not top:
        raise UserError(f"{root} is empty. Put the images of each class in a sub-folder named after the "
                        "class, e.g. DATA/cat/1.jpg and DATA/dog/2.jpg.")
    top_dirs = [entry for entry in top if _is_dir(entry)]
    skipped["skipped_unlabelled"] += len(top) - len(top_dirs)
    names = {entry.name.lower() for entry in top_dirs}
    layout, units = "classes", [(entry.path, entry.name, None) for entry in top_dirs]
    if names <= set(SPLIT_FOLDERS) and "train" in {SPLIT_FOLDERS[n] for n in names} and _has_sub_folders(top_dirs):
        layout, units = "splits", []  # (split folders holding images directly are classes named train, test...)
        for split_dir in top_dirs:
            inner = _list_dir(Path(split_dir.path), skipped)
            skipped["skipped_unlabelled"] += sum(not _is_dir(entry) for entry in inner)
            split = SPLIT_FOLDERS[split_dir.name.lower()]
            units += [(entry.path, entry.name, split) for entry in inner if _is_dir(entry)]
    labels = sorted({label for _, label, _ in units})
    if not labels:
        raise UserError(f"{root} has no class folders, only files. Put the images of each class in a "
                        "sub-folder named after the class, e.g. DATA/cat/1.jpg and DATA/dog/2.jpg.")
    if len(labels) == 1 and min_classes > 1:
        raise UserError(f"{root} has a single class folder ({printable(labels[0])!r}); a classifier needs at "
                        "least two. Add a folder of images for each other class.")
    return layout, sorted(units), skipped


def _look_alike_classes(labels: list[str]) -> list[str]:
    """Class names that differ only in case, spaces, '-' or '_': most likely one class typed twice
    (and one folder on a case-insensitive disk)."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(re.sub(r"[\s_-]+", " ", label).strip().casefold(), []).append(label)
    return [f"classes {', '.join(repr(printable(name)) for name in names)} differ only in case, spaces, '-' or '_' "
            "and are trained as different classes; merge their folders if they are one class."
            for names in groups.values() if len(names) > 1]


def _list_dir(directory: Path, skipped: Counter) -> list[os.DirEntry]:
    with os.scandir(directory) as entries:
        listing = list(entries)
    visible = [entry for entry in listing if not entry.name.startswith(".")]
    skipped["skipped_hidden"] += len(listing) - len(visible)
    return visible


# -------------------------------------------------------------------------------------- summary
@dataclass
class ScanResult:
    """What a scan found; the records themselves are in `records_path` (one JSON object a line)."""

    records_path: Path
    root: Path
    layout: str  # "classes" (folder per class) | "splits" (train/val/test folders) | "csv"
    counts: dict[str, int]  # ok, rejected, skipped_hidden, skipped_non_image, skipped_unlabelled, ...
    reasons: dict[str, int]  # rejected files per reason
    per_class: dict[str, int]  # usable images per class (0: a class folder without any)
    rejected_per_class: dict[str, int]
    splits: dict[str, dict[str, int]]  # {split: {label: ok}} when the data came split already
    formats: dict[str, int]
    extension_mismatches: int
    notes: dict[str, int]  # animated, extension mismatch, converted to RGB, EXIF orientation applied
    warnings: list[str] = field(default_factory=list)

    @property
    def empty_classes(self) -> list[str]:
        return [label for label, count in self.per_class.items() if count == 0]

    @property
    def notices(self) -> list[str]:
        """What a user must hear before training on this scan: class folders left out, folders not read."""
        left_out = [f"class {printable(label)!r} has no usable images ({self.rejected_per_class.get(label, 0)} "
                    f"rejected; reasons in {self.records_path}): it is left out. Fix or convert its files, or "
                    f"remove its {'rows' if self.layout == 'csv' else 'folder'}." for label in self.empty_classes]
        return left_out + _look_alike_classes(list(self.per_class)) + self.warnings

    def rejected_files(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The rejected files in scan order, each {path, label, reason, detail}: the first `limit` (None: all)."""
        found: list[dict[str, Any]] = []
        for record in iter_records(self.records_path):
            if limit is not None and len(found) >= limit:
                break
            if record["status"] == "rejected":
                found.append({key: record.get(key) for key in ("path", "label", "reason", "detail")})
        return found

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(records_path=str(self.records_path), root=str(self.root), empty_classes=self.empty_classes,
                      notices=self.notices, rejected_files=self.rejected_files())
        return values

    def summary_table(self) -> Table:
        table = Table(title=escape(f"Scan of {printable(str(self.root))}"), min_width=72, caption_justify="left")
        table.add_column("class")
        table.add_column("ok", justify="right")
        table.add_column("rejected", justify="right")
        for label, count in self.per_class.items():
            style = "yellow" if count == 0 else None
            table.add_row(escape(printable(label)), str(count), str(self.rejected_per_class.get(label, 0)), style=style)
        table.add_section()
        table.add_row("total", str(self.counts["ok"]), str(self.counts["rejected"]), style="bold")
        parts = [_listing("rejected", self.reasons),
                 _listing("skipped", {k.removeprefix("skipped_").replace("_", " "): v
                                      for k, v in self.counts.items() if k not in ("ok", "rejected")}),
                 _listing("notes", self.notes)]
        table.caption = "\n".join(part for part in parts if part)
        return table


def _listing(title: str, counts: dict[str, int]) -> str:
    shown = [f"{count} {name}" for name, count in counts.items() if count]
    return f"{title}: {', '.join(shown)}" if shown else ""


@dataclass
class _Tally:
    """The summary, counted record by record."""

    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    per_class: Counter = field(default_factory=Counter)
    rejected_per_class: Counter = field(default_factory=Counter)
    splits: dict[str, Counter] = field(default_factory=dict)
    formats: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def add(self, record: dict[str, Any]) -> None:
        self.status[record["status"]] += 1
        if record["format"]:
            self.formats[record["format"]] += 1
        for note in record["notes"]:
            self.notes[NOTE_KINDS.get(note.split(" ", 1)[0], "other")] += 1
        if record["status"] != "ok":
            self.reasons[record["reason"]] += 1
            self.rejected_per_class[record["label"]] += 1
            return
        self.per_class[record["label"]] += 1
        if record["split"]:
            self.splits.setdefault(record["split"], Counter())[record["label"]] += 1


# ------------------------------------------------------------------------------------------ scan
def scan(data: str | Path, *, out: str | Path | None = None, config: DataConfig | None = None,
         workers: int | None = None, progress: Progress | None = None, sharded: bool = False,
         min_classes: int = 2, cache: "ImageCache | None" = None, cache_from_side: int = 0) -> ScanResult:
    """Check every image under `data` and write one record per file to `out/records.jsonl`.

    `data`: a folder with one sub-folder per class (optionally inside train/ val/ test/), or a CSV
    with `path,label` columns (paths relative to the CSV, or URLs such as `s3://…` read through fsspec).
    `out` defaults to a fresh temporary folder. `sharded`: every rank of a distributed run calls this
    together (same `out`) and checks its share of the files; every rank gets the same result.
    `min_classes`: 1 to read labelled images of one class (evaluation), 2 for training.
    `progress(done, total)`: called after every file (the total is counted first, by a cheap walk).
    `cache`: an `ImageCache` that the same decode fills for every good image whose shorter side is at
    least `cache_from_side`, so training decodes none of them again (not in a sharded scan).
    """
    config = config or DataConfig()
    root = Path(os.path.abspath(data))
    layout, units, skipped = _plan(root, min_classes)
    make_tasks = functools.partial(_Walker.tasks, root=root, layout=layout, units=units)
    out = Path(tempfile.mkdtemp(prefix="effitune-scan-")) if out is None else Path(os.path.abspath(out))
    if layout != "csv" and Path(os.path.realpath(out)).is_relative_to(os.path.realpath(root)):
        raise UserError(f"Output folder {out} is inside the data folder {root}; effitune never writes there. "
                        "Choose an --out outside it.")
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / RECORDS_FILE
    if sharded and distributed.world_size() > 1:
        return _scan_sharded(root, layout, units, skipped, records_path, config, workers or config.workers)

    total = sum(1 for _ in make_tasks(_Walker())) if callable(progress) else None  # a second, cheap walk
    check = functools.partial(check_and_resize, max_pixels=config.max_pixels, min_side=config.min_side,
                              size=cache.size if cache is not None else None, from_side=cache_from_side)
    walker, tally = _Walker(skipped=skipped), _Tally()
    quality.load()  # before the workers fork, so that each shares the import
    partial_path = records_path.with_suffix(".jsonl.partial")
    try:
        with open(partial_path, "w", encoding="ascii") as stream, _mapper(workers or config.workers) as mapper, \
                (cache.writer() if cache is not None else contextlib.nullcontext()) as cached:
            for done, (record, pixels) in enumerate(mapper(check, make_tasks(walker)), 1):
                # ensure_ascii keeps undecodable file names (lone surrogates) as \udcXX: a lossless round trip.
                stream.write(json.dumps(record, ensure_ascii=True) + "\n")
                tally.add(record)
                if pixels is not None:
                    cached.add(record["path"], record["sha1"], pixels)
                if callable(progress):
                    progress(done, total)
    except BaseException:
        partial_path.unlink(missing_ok=True)
        raise
    partial_path.replace(records_path)
    result = _result(records_path, root, layout, sorted({label for _, label, _ in units}), tally, walker)
    _check_usable(result, min_classes)
    return result


def _scan_sharded(root: Path, layout: str, units: list[Unit], skipped: Counter, records_path: Path,
                  config: DataConfig, workers: int | None) -> ScanResult:
    """Rank 0 walks once; rank r checks files r, r + world, ...; rank 0 writes the records in walk order."""
    rank, world = distributed.rank(), distributed.world_size()
    walker = _Walker(skipped=skipped)
    tasks = distributed.on_main(lambda: list(walker.tasks(root, layout, units)))  # one order for every rank
    check = functools.partial(check_file, max_pixels=config.max_pixels, min_side=config.min_side)
    parts = [records_path.with_name(f"{RECORDS_FILE}.part{r}") for r in range(world)]
    quality.load()

    def check_share() -> None:
        with open(parts[rank], "w", encoding="ascii") as stream, \
                _mapper(workers or distributed.cores_per_process()) as mapper:
            for record in mapper(check, tasks[rank::world]):
                stream.write(json.dumps(record, ensure_ascii=True) + "\n")
    distributed.each_rank(check_share)
    distributed.note("scan", len(tasks[rank::world]))

    def merge() -> ScanResult:
        tally, partial_path = _Tally(), records_path.with_suffix(".jsonl.partial")
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(open(part, encoding="ascii")) for part in parts]
            out = stack.enter_context(open(partial_path, "w", encoding="ascii"))
            for i in range(len(tasks)):
                line = streams[i % world].readline()
                out.write(line)
                tally.add(json.loads(line))
        partial_path.replace(records_path)
        for part in parts:
            part.unlink()
        result = _result(records_path, root, layout, sorted({label for _, label, _ in units}), tally, walker)
        _check_usable(result)
        return result
    return distributed.on_main(merge)


@contextlib.contextmanager
def _mapper(workers: int | None) -> Iterator[Callable]:
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield map
        return
    with Pool(workers) as pool:  # created before the progress thread starts: fork stays safe
        yield functools.partial(pool.imap, chunksize=_CHUNKSIZE)


def _result(records_path: Path, root: Path, layout: str, labels: list[str], tally: _Tally,
            walker: _Walker) -> ScanResult:
    all_labels = sorted(set(labels) | set(tally.per_class) | set(tally.rejected_per_class))
    counts = {"ok": tally.status["ok"], "rejected": tally.status["rejected"]}
    for key in ("skipped_hidden", "skipped_non_image", "skipped_unlabelled", "skipped_repeated_dirs",
                "skipped_repeated_rows", "unreadable_dirs"):
        counts[key] = walker.skipped[key]
    return ScanResult(
        records_path=records_path, root=root, layout=layout, counts=counts,
        reasons={reason: tally.reasons[reason] for reason in REASONS if tally.reasons[reason]},
        per_class={label: tally.per_class[label] for label in all_labels},
        rejected_per_class={label: n for label in all_labels if (n := tally.rejected_per_class[label])},
        splits={split: dict(sorted(c.items())) for split, c in sorted(tally.splits.items())},
        formats=dict(tally.formats.most_common()), extension_mismatches=tally.notes["extension mismatch"],
        notes=dict(tally.notes.most_common()),
        warnings=walker.warnings + (_split_like_folders(root) if layout == "classes" else []),
    )


def _split_like_folders(root: Path) -> list[str]:
    """A few class folders (2-4) holding mostly the same sub-folders look like splits under other names
    (train/, holdout/): said, since each is trained as one class. Many classes are never splits: not looked at."""
    with os.scandir(root) as entries:
        tops = sorted((e for e in entries if _is_dir(e) and not e.name.startswith(".")), key=lambda e: e.name)
    if not 2 <= len(tops) <= 4:
        return []
    inner = {top.name: _sub_folders(top.path) for top in tops}
    if None in inner.values():
        return []
    shared = set.intersection(*inner.values())
    if len(shared) < 2 or any(len(shared) < len(names) / 2 for names in inner.values()):
        return []  # e.g. cat/2019 and dog/2019: a nested layout, not splits
    names = ", ".join(repr(printable(name)) for name in inner)
    common = sorted(shared)
    return [f"folders {names} hold sub-folders of the same names ({', '.join(repr(printable(n)) for n in common[:4])}"
            f"{', ...' if len(common) > 4 else ''}) and are read as {len(inner)} classes; if they are splits, name "
            "them train/, val/ and test/."]


def _check_usable(result: ScanResult, min_classes: int = 2) -> None:
    """Raise the user errors that only the finished scan can tell."""
    counts, root = result.counts, result.root
    seen = counts["ok"] + counts["rejected"]
    if seen == 0 and result.layout == "csv":
        raise UserError(f"{root} lists no files. Add rows of path,label below the header.")
    if seen == 0:
        found = f"{counts['skipped_non_image']} other files" if counts["skipped_non_image"] else "nothing"
        raise UserError(f"The class folders in {root} hold no images ({found}; looked for "
                        f"{' '.join(sorted(IMAGE_EXTENSIONS))}). Point effitune at the folder of class folders.")
    if result.reasons.get("missing file", 0) == seen:
        raise UserError(f"None of the {seen} files listed in {root} exist. Relative paths are read from "
                        f"{root.parent}; fix the paths or move the CSV next to the images.")
    usable = [label for label, count in result.per_class.items() if count]
    if len(usable) < min_classes:
        found = f"only {printable(usable[0])!r} has" if usable else "no class has"
        raise UserError(f"Of the classes in {root}, {found} usable images; a classifier needs at least two. "
                        f"See the rejected files in {result.records_path}.")


# ---------------------------------------------------------------------------------------- reading
def iter_records(records_path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a scan one by one."""
    with open(records_path, encoding="ascii") as stream:
        for line in stream:
            if line.strip():
                yield json.loads(line)


def load_ok_records(records_path: str | Path) -> list[dict[str, Any]]:
    return [record for record in iter_records(records_path) if record["status"] == "ok"]
