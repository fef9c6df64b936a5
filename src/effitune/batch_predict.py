"""Predict over any number of images into a file: streaming, flat memory, flushed every batch.

`predict_to_file(predictor, ["photos/"], "predictions.csv")` writes one row per image in input
order: JSON Lines for `.jsonl` / `.json`, CSV for `.csv`. Folders are listed lazily and only one
batch of images and results is held at a time, so a million files cost what a thousand do. A job
that is interrupted leaves a valid file of the rows done so far.

Sharding. With `shard=(r, n)`, or under torchrun / srun (the launcher's rank and world size, as
`distributed.py` reads them), this process predicts only the inputs whose index i has i % n == r,
into `FILE.part-r-of-n`, every row carrying its input `index`. A finished shard writes
`FILE.part-r-of-n.done`; the shard that finds all n parts done merges them into FILE in input order
(a streaming k-way merge by index) and deletes the parts. There is no process group and no barrier
on purpose: shards may run under torchrun, as a SLURM array or by hand, at different times, on any
machines that share FILE's folder, and a shard that crashes blocks nobody: rerun it and the merge
happens when it finishes.
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from . import files
from . import distributed
from .errors import UserError
from .predict import Predictor, as_sources, expand_sources, load

__all__ = ["predict_to_file", "PredictionSummary", "merge_parts", "output_format", "part_path", "parse_shard",
           "shard_from_env", "prepare_device"]

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
CSV_COLUMNS = ("path", "label", "probability", "unknown", "unknown_score", "error")
LOCK_SUFFIX = ".merging"


# ------------------------------------------------------------------------------ rank and shard
def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), e.g. '0/4' for the first of four shards."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise UserError(f"--shard {text!r} must be I/N with 0 <= I < N, e.g. --shard 0/4 for the first of "
                        "four shards.")
    return index, count


def shard_from_env() -> tuple[int, int] | None:
    """(rank, world size) under torchrun or srun with more than one process, else None."""
    try:
        rank, world = distributed.rank(), distributed.world_size()
    except ValueError:
        rank, world = -1, 2
    if world == 1:
        return None
    if not 0 <= rank < world:
        raise UserError(f"The launcher's rank and world size (RANK={os.environ.get('RANK')!r}, WORLD_SIZE="
                        f"{os.environ.get('WORLD_SIZE')!r}) are not valid. Start with torchrun or srun, or pass "
                        "--shard I/N.")
    return rank, world


def prepare_device(device: str) -> str:
    """Check `device` and fit it to this process: under torchrun/srun 'cuda' is its own GPU
    (cuda:LOCAL_RANK), and CPU processes on one machine share its cores instead of each taking all."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to this process. Use --device cpu.")
    if distributed.launcher() is None:
        return device
    if device == "cuda":
        return f"cuda:{distributed.local_rank()}"
    if kind == "cpu" and distributed.local_world_size() > 1:
        torch.set_num_threads(distributed.cores_per_process())  # torchrun's default is 1 thread each
    return device


def part_path(out: str | Path, index: int, count: int) -> Path:
    return Path(f"{out}.part-{index}-of-{count}")


# ---------------------------------------------------------------------------------- the rows
def output_format(out: Path) -> str:
    """'csv' or 'jsonl', by the name's ending; a UserError for any other."""
    kind = FORMATS.get(out.suffix.lower())
    if kind is None:
        raise UserError(f"--out {out}: end the name in .csv (a table for spreadsheets) or .jsonl (JSON Lines), "
                        "e.g. --out predictions.csv.")
    return kind


def _csv_header(k: int) -> list[str]:
    ranked = [name for rank in range(1, k + 1) for name in (f"label_{rank}", f"probability_{rank}")]
    return [*CSV_COLUMNS, *ranked]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _csv_row(result: dict, k: int) -> list[str]:
    row = [_cell(result.get(name)) for name in CSV_COLUMNS]
    ranked = [(t["label"], t["probability"]) for t in result.get("top_k", [])]
    ranked += [(None, None)] * (k - len(ranked))
    return row + [_cell(value) for pair in ranked for value in pair]


class _Writer:
    """One output file, CSV or JSON Lines; with `indexed` every row starts with its input index."""

    def __init__(self, stream: TextIO, kind: str, k: int, indexed: bool):
        self.stream, self.kind, self.k, self.indexed = stream, kind, k, indexed
        self.csv = csv.writer(stream) if kind == "csv" else None
        if self.csv is not None:
            self.csv.writerow(["index", *_csv_header(k)] if indexed else _csv_header(k))

    def write(self, result: dict, index: int) -> None:
        if self.csv is not None:
            row = _csv_row(result, self.k)
            self.csv.writerow([str(index), *row] if self.indexed else row)
        else:
            record = {"index": index, **result} if self.indexed else result
            self.stream.write(json.dumps(record, ensure_ascii=True) + "\n")


def _open_text(path: Path, mode: str) -> TextIO:
    # surrogateescape: undecodable file names (kept as lone surrogates) survive the round trip
    return open(path, mode, newline="", encoding="utf-8", errors="surrogateescape")


# ---------------------------------------------------------------------------------- predicting
@dataclass
class PredictionSummary:
    rows: int  # images this process predicted
    errors: int  # of those, files that could not be read
    written: Path  # the file this process wrote: FILE, or its part while shards are outstanding
    out: Path  # FILE
    shard: tuple[int, int] | None = None
    merged: bool = False  # FILE is complete (unsharded, or this shard merged the parts)
    note: str | None = None  # why FILE is not written yet, when that needs the user

    def describe(self) -> str:
        errors = f" ({self.errors} could not be read)" if self.errors else ""
        head = f"{self.rows} images{errors}"
        if self.shard is None:
            return f"{head} -> {self.out}"
        where = f"shard {self.shard[0]}/{self.shard[1]}: {head} -> {self.written}"
        if self.merged:
            return f"{where}; all shards done, merged into {self.out}"
        return f"{where}; {self.note or f'{self.out} is written when the last shard finishes'}"


def predict_to_file(predictor: Predictor | str | Path, sources: Iterable[str | Path | bytes], out: str | Path, *,
                    top_k: int = 5, batch_size: int = 32, reject: bool = True,
                    shard: tuple[int, int] | None = None,
                    progress: Callable[[int], None] | None = None) -> PredictionSummary:
    """Predict every image in `sources` (files, folders, globs, URLs, bytes) into `out`, streaming.

    `predictor`: a Predictor or a bundle folder. `shard=(r, n)` predicts every n-th input starting
    at r into `out.part-r-of-n` (default: the torchrun/srun rank and world size, else all into `out`);
    the last shard to finish merges. `progress(rows)` is called after every batch.
    """
    out = Path(out)
    kind = output_format(out)
    if batch_size < 1 or top_k < 1:
        raise UserError(f"batch_size and top_k must be at least 1 (got {batch_size} and {top_k}).")
    shard = shard if shard is not None else shard_from_env()
    if shard is not None and shard[1] == 1:
        shard = None
    predictor = predictor if isinstance(predictor, Predictor) else load(predictor)
    out.parent.mkdir(parents=True, exist_ok=True)
    index, count = shard or (0, 1)
    target = out if shard is None else part_path(out, index, count)
    done = Path(f"{target}.done")
    if shard is not None:
        done.unlink(missing_ok=True)  # this part is being rewritten: not done until it is
    fingerprint = _Fingerprint(predictor, top_k, reject, kind)
    k = max(1, min(top_k, len(predictor.classes)))
    rows = errors = 0
    with _open_text(target, "w") as stream:
        writer = _Writer(stream, kind, k, indexed=shard is not None)
        numbered = _numbered(sources, index, count, fingerprint)
        for position, result in _predict_numbered(predictor, numbered, top_k, batch_size, reject):
            writer.write(result, position)
            rows += 1
            errors += "error" in result
            if rows % batch_size == 0:
                stream.flush()  # a whole batch at a time: a killed job leaves only complete rows
                if progress is not None:
                    progress(rows)
        stream.flush()
    if progress is not None:
        progress(rows)
    summary = PredictionSummary(rows, errors, target, out, shard, merged=shard is None)
    if shard is not None:
        done.write_text(json.dumps({"rows": rows, "inputs": fingerprint.inputs, "fingerprint": fingerprint.hexdigest()}))
        summary.merged, summary.note = _merge_when_complete(out, count)
    return summary


class _Fingerprint:
    """What every shard must agree on: the bundle, the options and the full, ordered input list."""

    def __init__(self, predictor: Predictor, top_k: int, reject: bool, kind: str):
        self.digest = hashlib.sha1(json.dumps([predictor.meta, top_k, reject, kind], sort_keys=True,
                                              default=str).encode())
        self.inputs = 0

    def add(self, source: str | bytes) -> None:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else source.encode("utf-8", "surrogateescape")
        self.digest.update(hashlib.sha1(data).digest())
        self.inputs += 1

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _numbered(sources, index: int, count: int, fingerprint: _Fingerprint) -> Iterator[tuple[int, str | bytes]]:
    """(input index, source) for this shard's inputs; every input is seen (and fingerprinted)."""
    position = 0
    for source in as_sources(sources):
        expanded = [source] if isinstance(source, (bytes, bytearray)) else expand_sources([source])
        for item in expanded:
            fingerprint.add(item)
            if position % count == index:
                yield position, item
            position += 1


def _predict_numbered(predictor: Predictor, numbered, top_k: int, batch_size: int,
                      reject: bool) -> Iterator[tuple[int, dict]]:
    """Predictor.iter_predict over already-expanded sources, each result paired with its index."""
    positions: deque[int] = deque()  # indices in flight: iter_predict's lookahead (long_pass) + one batch

    def feed() -> Iterator[str | bytes]:
        for position, source in numbered:
            positions.append(position)
            yield source

    for result in predictor.iter_predict(feed(), top_k=top_k, batch_size=batch_size, reject=reject, expand=False):
        yield positions.popleft(), result


# ----------------------------------------------------------------------------------- merging
def _merge_when_complete(out: Path, count: int) -> tuple[bool, str | None]:
    """Merge the parts if every shard is done and no other shard is merging: (merged, note)."""
    if _markers(out, count) is None:
        return False, None
    lock = Path(f"{out}{LOCK_SUFFIX}")
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic, also on NFS: one merger
    except FileExistsError:
        return False, (f"another shard is merging into {out} ({lock} exists); if no shard is running, delete "
                       f"{lock} and rerun any one shard")
    try:
        markers = _markers(out, count)  # again: a shard that merged just before us removed them
        if markers is None:
            return False, None
        _check_same_run(out, count, markers)
        merge_parts(out, count)
        return True, None
    finally:
        os.close(handle)
        lock.unlink(missing_ok=True)


def _markers(out: Path, count: int) -> list[dict] | None:
    markers = []
    for index in range(count):
        try:
            markers.append(json.loads(Path(f"{part_path(out, index, count)}.done").read_text()))
        except (FileNotFoundError, ValueError):
            return None
    return markers


def _check_same_run(out: Path, count: int, markers: list[dict]) -> None:
    first = markers[0]
    for index, marker in enumerate(markers):
        if marker["fingerprint"] != first["fingerprint"]:
            raise UserError(f"{part_path(out, index, count)} was made from other inputs or options than "
                            f"{part_path(out, 0, count)} (the images changed between shards, or the commands "
                            "differ). Rerun every shard with the same command and the same files.")
    if sum(marker["rows"] for marker in markers) != first["inputs"]:
        raise UserError(f"The {count} parts of {out} hold {sum(m['rows'] for m in markers)} rows for "
                        f"{first['inputs']} inputs. Rerun every shard with the same command.")


def merge_parts(out: str | Path, count: int) -> Path:
    """Merge `out.part-*-of-count` into `out` in input order, streaming, then delete the parts."""
    out = Path(out)
    kind = output_format(out)
    parts = [part_path(out, index, count) for index in range(count)]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise UserError(f"Cannot merge into {out}: {', '.join(missing)} missing. Run those shards first.")
    streams = [_open_text(part, "r") for part in parts]
    try:
        with files.replacing(out) as temporary, _open_text(temporary, "w") as target:
            readers = [_read_part(stream, kind) for stream in streams]
            headers = [next(reader) for reader in readers]
            writer = csv.writer(target) if kind == "csv" else None
            if writer is not None:
                writer.writerow(headers[0])
            for _, row in heapq.merge(*readers, key=lambda item: item[0]):
                if writer is not None:
                    writer.writerow(row)
                else:
                    target.write(row)
    finally:
        for stream in streams:
            stream.close()
    for part in parts:
        part.unlink(missing_ok=True)
        Path(f"{part}.done").unlink(missing_ok=True)
    return out


def _read_part(stream: TextIO, kind: str) -> Iterator:
    """First the header (CSV columns without `index`, or None), then (index, row) in file order."""
    if kind == "csv":
        reader = csv.reader(stream)
        yield next(reader, ["index", *CSV_COLUMNS])[1:]
        for row in reader:
            yield int(row[0]), row[1:]
        return
    yield None
    for line in stream:
        if line.strip():
            record = json.loads(line)
            yield record.pop("index"), json.dumps(record, ensure_ascii=True) + "\n"
