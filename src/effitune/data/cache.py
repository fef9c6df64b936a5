"""Resize-once image cache: every image decoded, oriented, converted and resized exactly once.

Entries are uint8 (size, size, 3) arrays in memory-mapped shard files, keyed by the file's content
hash (sha1) and the size. A file whose bytes change gets a new hash and therefore a new entry; the old
one is simply never read again. Epochs read rows with positional file reads (`rowio`) and never decode an original again.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import files
from .. import distributed
from ..errors import UserError
from . import rowio
from .images import is_url, load_for_model, read_bytes


def default_root() -> Path:
    """effitune's cache folder: `$EFFITUNE_CACHE`, else ~/.cache/effitune."""
    return Path(os.environ.get("EFFITUNE_CACHE", Path.home() / ".cache" / "effitune"))


def images_root(root: str | Path | None = None) -> Path:
    """Where resize-once caches live: `root` when given (a run's `cache_root`), else effitune's own."""
    return Path(root) if root else default_root() / "images"


def _decode(job: tuple[str, int, int | None]) -> tuple[str, np.ndarray | None, str]:
    """In a worker process: (sha1, pixels, "") or ("", None, why it failed)."""
    path, size, max_pixels = job
    try:
        if max_pixels is not None:  # the limit the scan accepted the file under, not Pillow's default
            Image.MAX_IMAGE_PIXELS = max_pixels  # this worker's own copy; load_for_model checks it exactly
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        data = read_bytes(path)  # a local file, or a URL through fsspec
        return hashlib.sha1(data).hexdigest(), load_for_model(data, size, max_pixels=max_pixels), ""
    except Exception as error:  # noqa: BLE001 - every bad file becomes a message, never a crash
        return "", None, f"{type(error).__name__}: {error}"


@dataclass
class _Shard:
    """Images decoded into one new shard file, before the index knows them."""
    name: str | None  # None: nothing was decoded
    keys: list[str]  # row -> content key
    files: dict[str, tuple]  # path -> (bytes, change stamp, sha1)


@dataclass
class CacheIndex:
    shards: list[str]
    entries: dict[str, tuple[int, int]]  # sha1 -> (shard number, row)
    files: dict[str, tuple[int, int, str]]  # path -> (bytes, mtime_ns, sha1) when last seen


class ImageCache:
    """`ImageCache(root, size).build(paths)` returns the keys; `cache.get(key)` an HWC uint8 array."""

    def __init__(self, root: str | Path, size: int, max_pixels: int | None = None):
        """`max_pixels`: the largest image decoded (the scan's `data.max_pixels`); None: Pillow's default."""
        self.size, self.max_pixels = size, max_pixels
        self.folder = Path(root) / f"size{size}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = self._read_index()
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def existing(cls, root: str | Path | None, size: int) -> "ImageCache | None":
        """The cache at `size` under `images_root(root)` when one was built there, else None (nothing
        is created: a reader, such as `evaluate`, leaves no empty cache behind)."""
        folder = images_root(root)
        return cls(folder, size) if (folder / f"size{size}" / "index.json").is_file() else None

    def _read_index(self) -> CacheIndex:
        path = self.folder / "index.json"
        if not path.is_file():
            return CacheIndex(shards=[], entries={}, files={})
        raw = json.loads(path.read_text())
        return CacheIndex(shards=raw["shards"], entries={k: tuple(v) for k, v in raw["entries"].items()},
                          files={k: tuple(v) for k, v in raw.get("files", {}).items()})

    def _write_index(self) -> None:
        files.write_text(self.folder / "index.json", json.dumps({"shards": self.index.shards,
                                                                 "entries": self.index.entries,
                                                                 "files": self.index.files}))

    def __contains__(self, key: str) -> bool:
        return key in self.index.entries

    def build(self, paths: list[str], sha1s: list[str] | None = None, workers: int | None = None,
              progress=None, sharded: bool = False) -> list[str]:
        """Cache every path not cached yet; return each path's content key, in order.

        `sha1s` (from the manifest) lets cached files skip even being read. A file that no longer
        decodes raises a UserError naming it. `sharded`: every rank of a distributed run calls this
        together; each decodes every world-th missing file into a shard file of its own, and rank 0
        alone writes the index, so processes never write the same file.
        """
        if sharded and distributed.world_size() > 1:
            return self._build_sharded(paths, sha1s, workers, progress)
        keys, todo = self._missing(paths, sha1s)
        if todo:
            shard = self._decode_shard([paths[i] for i in todo], workers, progress)
            self._add(shard)
            for i, key in zip(todo, shard.keys):
                keys[i] = key
        self._write_index()
        return keys

    def cached(self, paths: list[str], sha1s: list[str | None]) -> list[str]:
        """Each file's content key when the cache holds it and the file is still what `sha1` says
        (its size and change stamp, else its bytes hashed again); "" for every other file."""
        return [sha1 if sha1 and sha1 in self.index.entries and self._unchanged(path, sha1) else ""
                for path, sha1 in zip(paths, sha1s)]

    def _missing(self, paths: list[str], sha1s: list[str] | None) -> tuple[list[str], list[int]]:
        """The keys of files cached already ("" for the others) and the positions of the others."""
        keys = self.cached(paths, sha1s or [None] * len(paths))
        return keys, [i for i, key in enumerate(keys) if not key]

    def _decode_shard(self, paths: list[str], workers: int | None = None, progress=None) -> _Shard:
        """Decode `paths` into a new shard file, written under a temporary name and renamed when whole."""
        if not paths:
            return _Shard(None, [], {})
        name = f"shard-{len(self.index.shards):05d}-{uuid.uuid4().hex[:8]}.npy"
        temporary = self.folder / (name + ".tmp")
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8,
                                          shape=(len(paths), self.size, self.size, 3))
        keys: list[str] = []
        files: dict[str, tuple] = {}
        jobs = [(path, self.size, self.max_pixels) for path in paths]
        with ProcessPoolExecutor(max_workers=workers or distributed.cores_per_process()) as pool:
            for n, (path, (key, pixels, error)) in enumerate(zip(paths, pool.map(_decode, jobs, chunksize=32))):
                if pixels is None:
                    raise UserError(f"{path} can no longer be decoded ({error}). It changed or broke after "
                                    "the scan: fix or remove it, then run `effitune split` again.")
                rowio.write_rows(array, n, pixels[None])  # not through the map: RSS stays flat
                keys.append(key)
                self._remember(path, key)
                if path in self.index.files:
                    files[path] = self.index.files[path]
                if progress is not None:
                    progress(n + 1, len(paths))
        rowio.flush(array)
        del array
        temporary.replace(self.folder / name)
        return _Shard(name, keys, files)

    def writer(self, rows_per_shard: int = 256) -> "CacheWriter":
        """Add images decoded elsewhere (the scan's one decode): `with cache.writer() as w: w.add(...)`."""
        return CacheWriter(self, rows_per_shard)

    def _add(self, shard: _Shard) -> None:
        if shard.name is None:
            return
        number = len(self.index.shards)
        self.index.shards.append(shard.name)
        for row, key in enumerate(shard.keys):
            self.index.entries[key] = (number, row)
        self.index.files.update(shard.files)

    def _build_sharded(self, paths: list[str], sha1s: list[str] | None, workers, progress) -> list[str]:
        rank, world = distributed.rank(), distributed.world_size()
        keys, todo = distributed.on_main(self._missing, paths, sha1s)  # one decision, taken once
        mine = todo[rank::world]
        shards = distributed.each_rank(self._decode_shard, [paths[i] for i in mine], workers, progress)
        distributed.note("images", len(mine))

        def write_index() -> None:
            for shard in shards:
                self._add(shard)
            self._write_index()
        distributed.on_main(write_index)
        for other, shard in enumerate(shards):
            for i, key in zip(todo[other::world], shard.keys):
                keys[i] = key
        if not distributed.is_main():
            self.index, self._maps = self._read_index(), {}
        return keys

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._maps:
            self._maps[number] = np.load(self.folder / self.index.shards[number], mmap_mode="r")
        return self._maps[number]

    def get(self, key: str) -> np.ndarray:
        shard, row = self.index.entries[key]
        return rowio.read_rows(self._shard(shard), [row])[0]  # a read, not the map: RSS stays flat

    def stack(self, keys: list[str], out: np.ndarray | None = None) -> np.ndarray:
        """All images for `keys` as one (N, size, size, 3) uint8 array in RAM (`out`, when given)."""
        if out is None:
            out = np.empty((len(keys), self.size, self.size, 3), dtype=np.uint8)
        places = np.array([self.index.entries[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        shards = np.unique(places[:, 0]).tolist()
        if len(shards) == 1:  # the usual case (one build): read straight into `out`, no second copy
            return rowio.read_rows(self._shard(shards[0]), places[:, 1], out=out)
        for shard in shards:  # one batch of reads per shard file
            chosen = np.flatnonzero(places[:, 0] == shard)
            out[chosen] = rowio.read_rows(self._shard(shard), places[chosen, 1])
        return out

    def _remember(self, path: str, sha1: str) -> None:
        stamp = _stamp(path)
        if stamp is not None:
            self.index.files[path] = (*stamp, sha1)

    def _unchanged(self, path: str, sha1: str) -> bool:
        """Is the file still what the manifest says? Size + change stamp first, else re-hash it."""
        stamp = _stamp(path)
        if stamp is None:
            return False
        if self.index.files.get(path) == (*stamp, sha1):
            return True
        try:
            if hashlib.sha1(read_bytes(path)).hexdigest() != sha1:
                return False
        except Exception:  # noqa: BLE001 - gone or unreadable: decoding it again reports why
            return False
        self.index.files[path] = (*stamp, sha1)
        return True

    def __getstate__(self):  # worker processes re-open the memory maps themselves
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class CacheWriter:
    """Writes `(path, sha1, pixels)` entries into new shard files of at most `rows_per_shard` rows
    (memory stays at one shard's worth); the index is written on close. An entry whose content is
    cached already is skipped; pixels must be what `load_for_model(path, cache.size)` returns."""

    def __init__(self, cache: ImageCache, rows_per_shard: int):
        self.cache, self.rows_per_shard = cache, max(1, rows_per_shard)
        self._rows: list[np.ndarray] = []
        self._keys: list[str] = []
        self._files: dict[str, tuple] = {}
        self.added = 0

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()

    def add(self, path: str, sha1: str, pixels: np.ndarray) -> None:
        if pixels.shape != (self.cache.size, self.cache.size, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"{path}: cache entries are uint8 ({self.cache.size}, {self.cache.size}, 3), "
                             f"not {pixels.dtype} {pixels.shape}")
        stamp = _stamp(path)
        if stamp is not None:
            self._files[path] = (*stamp, sha1)
        if sha1 in self.cache.index.entries or sha1 in self._keys:
            return
        self._rows.append(pixels)
        self._keys.append(sha1)
        if len(self._rows) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        cache = self.cache
        name = f"shard-{len(cache.index.shards):05d}-{uuid.uuid4().hex[:8]}.npy"
        with files.replacing(cache.folder / name, suffix=".npy") as temporary:
            np.save(temporary, np.stack(self._rows), allow_pickle=False)
        cache._add(_Shard(name, self._keys, {}))
        self.added += len(self._keys)
        self._rows, self._keys = [], []

    def close(self) -> None:
        self._flush()
        self.cache.index.files.update(self._files)
        self.cache._write_index()


def _stamp(path: str) -> tuple[int, int | str] | None:
    """(size, change marker) without reading the file: mtime for a local file, fsspec's `ukey`
    (an ETag, a generation, or a hash of the listing) for a URL; None when it cannot be looked up."""
    try:
        if is_url(path):
            from fsspec.core import url_to_fs

            fs, inner = url_to_fs(path)
            return int(fs.size(inner) or -1), str(fs.ukey(inner))
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    except Exception:  # noqa: BLE001 - no stamp just means the file is read again
        return None
