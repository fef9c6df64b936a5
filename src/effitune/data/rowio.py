"""Rows of `.npy` files read and written with positional file I/O instead of through a memory map.

Every page touched through a memory map stays counted in the process's RSS (as RssFile) until it is
unmapped: one epoch over a 100k-image feature cache, writing that cache, or a loader worker reading
the resize-once image cache grew the process's RSS by the whole file (benchmarks/memory.py). Positional
reads and writes move the same bytes through the kernel's page cache only, so RSS stays bounded by one
batch however large the files are. Arrays that are not a memory map of a whole `.npy` file (slices,
arrays in RAM) are indexed as before.
"""
from __future__ import annotations

import os

import numpy as np


def npy_file(array) -> str | None:
    """The file behind a memory map of a whole `.npy` (`np.load(mmap_mode="r")`, `open_memmap`), else None."""
    if not (isinstance(array, np.memmap) and array.filename and array.mode != "c" and hasattr(os, "pread")):
        return None
    try:
        whole = array.flags.c_contiguous and array.offset + array.nbytes == os.path.getsize(array.filename)
    except OSError:
        return None
    return str(array.filename) if whole else None


def _row_bytes(array: np.ndarray, lead: int) -> int:
    return array.dtype.itemsize * int(np.prod(array.shape[lead:]))


def read_rows(array: np.ndarray, rows, lead: int = 1, fd: int | None = None, out: np.ndarray | None = None
              ) -> np.ndarray:
    """Rows `rows` of `array` seen as (rows, *array.shape[lead:]): the first `lead` axes, flattened, count rows.

    One positional read per run of consecutive rows (sort them for fewer reads); `fd`: the file already
    open for reading (else it is opened for this call); `out`: a C-contiguous array to read into
    (e.g. pinned memory a GPU copies from), else a new one.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    shape = (len(rows), *array.shape[lead:])
    if out is None:
        out = np.empty(shape, dtype=array.dtype)
    elif out.shape != shape or out.dtype != array.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {array.dtype} array of shape {shape}")
    path = npy_file(array)
    if path is None:
        out[...] = array[np.unravel_index(rows, array.shape[:lead])]
        return out
    row_bytes = _row_bytes(array, lead)
    raw = out.view(np.uint8).reshape(len(rows), row_bytes)
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    offsets = (array.offset + rows[starts] * row_bytes).tolist()
    if len(starts) == len(rows):  # shuffled rows: each read on its own
        buffers = list(raw)
    else:
        buffers = [raw[a:b].reshape(-1) for a, b in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)])]
    own = fd is None
    fd = os.open(path, os.O_RDONLY) if own else fd
    try:
        for buffer, offset in zip(buffers, offsets):
            _read_into(fd, buffer, offset)
    finally:
        if own:
            os.close(fd)
    return out


def _read_into(fd: int, buffer: np.ndarray, offset: int) -> None:
    """Fill a uint8 array from the file at `offset` (os.pread in a loop in case a read comes back short)."""
    if hasattr(os, "preadv") and os.preadv(fd, [buffer], offset) == len(buffer):
        return
    done = 0
    while done < len(buffer):
        data = os.pread(fd, len(buffer) - done, offset + done)
        if not data:
            raise OSError(f"{offset + len(buffer)} bytes expected: the file is shorter (truncated?)")
        buffer[done:done + len(data)] = np.frombuffer(data, np.uint8)
        done += len(data)


def write_rows(array: np.ndarray, start: int, values: np.ndarray, lead: int = 1, sync: bool = False) -> None:
    """`array` seen as (rows, *array.shape[lead:]): rows start, start + 1, ... = `values`, written to the file.

    `sync`: on disk before returning (fdatasync), so a writer thread spreads the disk writes over the
    run instead of leaving them all to the final `flush`.
    """
    values = np.ascontiguousarray(values, dtype=array.dtype)
    path = npy_file(array)
    if path is None:
        array[np.unravel_index(np.arange(start, start + len(values)), array.shape[:lead])] = values
        return
    with open(path, "r+b") as stream:
        stream.seek(array.offset + start * _row_bytes(array, lead))
        stream.write(values.reshape(-1).view(np.uint8))
        if sync:
            stream.flush()
            getattr(os, "fdatasync", os.fsync)(stream.fileno())


def flush(array: np.ndarray) -> None:
    """On disk, as `np.memmap.flush` made writes through the map: for rows written with `write_rows` too."""
    if isinstance(array, np.memmap):
        array.flush()
    path = npy_file(array)
    if path is not None:
        with open(path, "r+b") as stream:
            os.fsync(stream.fileno())
