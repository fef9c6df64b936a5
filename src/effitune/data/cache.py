"""Resize-once image cache: every image decoded, oriented, converted and resized exactly once.

Entries are uint8 (size, size, 3) arrays in memory-mapped shard files, keyed by the file's content
hash (sha1) and the size. A file whose bytes change gets a new hash and therefore a new entry; the old
one is simply never read again. Epochs read from the memory map and never decode an original again.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .images import load_for_model


def _decode(job: tuple[str, int]) -> tuple[str, np.ndarray | None, str]:
    path, size = job
    try:
        data = Path(path).read_bytes()
        return hashlib.sha1(data).hexdigest(), load_for_model(data, size), ""
    except Exception as error:  # noqa: BLE001 - every bad file becomes a message, never a crash
        return "", None, f"{type(error).__name__}: {error}"


@dataclass
class CacheIndex:
    shards: list[str]
    entries: dict[str, tuple[int, int]]  # sha1 -> (shard number, row)
    files: dict[str, tuple[int, int, str]]  # path -> (bytes, mtime_ns, sha1) when last seen


class ImageCache:
    """`ImageCache(root, size).build(paths)` returns the keys; `cache.get(key)` an HWC uint8 array."""

    def __init__(self, root: str | Path, size: int):
        self.size = size
        self.folder = Path(root) / f"size{size}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = self._read_index()
        self._maps: dict[int, np.ndarray] = {}

    def _read_index(self) -> CacheIndex:
        path = self.folder / "index.json"
        if not path.is_file():
            return CacheIndex(shards=[], entries={}, files={})
        raw = json.loads(path.read_text())
        return CacheIndex(shards=raw["shards"], entries={k: tuple(v) for k, v in raw["entries"].items()},
                          files={k: tuple(v) for k, v in raw.get("files", {}).items()})

    def _write_index(self) -> None:
        temporary = self.folder / f"index.json.{uuid.uuid4().hex}.tmp"
        temporary.write_text(json.dumps({"shards": self.index.shards, "entries": self.index.entries,
                                         "files": self.index.files}))
        temporary.replace(self.folder / "index.json")

    def __contains__(self, key: str) -> bool:
        return key in self.index.entries

    def build(self, paths: list[str], sha1s: list[str] | None = None, workers: int | None = None,
              progress=None) -> list[str]:
        """Cache every path not cached yet; return each path's content key, in order.

        `sha1s` (from the manifest) lets cached files skip even being read. A file that no longer
        decodes raises a UserError naming it.
        """
        keys: list[str] = [""] * len(paths)
        todo = []
        for i, path in enumerate(paths):
            known = sha1s[i] if sha1s else None
            if known and known in self.index.entries and self._unchanged(path, known):
                keys[i] = known
            else:
                todo.append(i)
        if not todo:
            self._write_index()
            return keys
        shard_no = len(self.index.shards)
        shard_name = f"shard-{shard_no:05d}-{uuid.uuid4().hex[:8]}.npy"
        temporary = self.folder / (shard_name + ".tmp")
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8,
                                          shape=(len(todo), self.size, self.size, 3))
        rows: dict[str, int] = {}
        workers = workers or os.cpu_count() or 1
        jobs = [(paths[i], self.size) for i in todo]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for n, (i, (key, pixels, error)) in enumerate(zip(todo, pool.map(_decode, jobs, chunksize=32))):
                if pixels is None:
                    raise UserError(f"{paths[i]} can no longer be decoded ({error}). It changed or broke after "
                                    "the scan: fix or remove it, then run `effitune split` again.")
                array[n] = pixels
                rows[key] = n
                keys[i] = key
                self._remember(paths[i], key)
                if progress is not None:
                    progress(n + 1, len(todo))
        array.flush()
        del array
        temporary.replace(self.folder / shard_name)
        self.index.shards.append(shard_name)
        for key, row in rows.items():
            self.index.entries[key] = (shard_no, row)
        self._write_index()
        return keys

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._maps:
            self._maps[number] = np.load(self.folder / self.index.shards[number], mmap_mode="r")
        return self._maps[number]

    def get(self, key: str) -> np.ndarray:
        shard, row = self.index.entries[key]
        return self._shard(shard)[row]

    def stack(self, keys: list[str]) -> np.ndarray:
        """All images for `keys` as one (N, size, size, 3) uint8 array in RAM."""
        out = np.empty((len(keys), self.size, self.size, 3), dtype=np.uint8)
        for i, key in enumerate(keys):
            out[i] = self.get(key)
        return out

    def _remember(self, path: str, sha1: str) -> None:
        try:
            stat = os.stat(path)
        except OSError:
            return
        self.index.files[path] = (stat.st_size, stat.st_mtime_ns, sha1)

    def _unchanged(self, path: str, sha1: str) -> bool:
        """Is the file still what the manifest says? Size + mtime stamp first, else re-hash it."""
        try:
            stat = os.stat(path)
        except OSError:
            return False
        if self.index.files.get(path) == (stat.st_size, stat.st_mtime_ns, sha1):
            return True
        if hashlib.sha1(Path(path).read_bytes()).hexdigest() != sha1:
            return False
        self.index.files[path] = (stat.st_size, stat.st_mtime_ns, sha1)
        return True

    def __getstate__(self):  # worker processes re-open the memory maps themselves
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
