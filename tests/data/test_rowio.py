"""rowio: rows of .npy files read and written by position, never through the memory map."""
import re
from pathlib import Path

import numpy as np
import pytest

from effitune.data import rowio


def test_read_and_write_rows_match_indexing(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 20, 2, 5)).astype(np.float16)
    mapped = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float16, shape=values.shape)
    assert rowio.npy_file(mapped) is not None
    for view in range(3):  # (views, N, ...) rows counted over the first two axes, as compute_activations writes
        for start in range(0, 20, 8):
            rowio.write_rows(mapped, view * 20 + start, values[view, start:start + 8], lead=2)
    rowio.flush(mapped)
    on_disk = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(np.asarray(on_disk), values)
    rows = np.array([0, 1, 2, 7, 7, 19, 20, 21, 59])  # runs, a repeat, across views
    np.testing.assert_array_equal(rowio.read_rows(on_disk, rows, lead=2), values.reshape(60, 2, 5)[rows])
    np.testing.assert_array_equal(rowio.read_rows(on_disk[1], [3, 4], lead=1), values[1, [3, 4]])  # a slice
    assert rowio.read_rows(on_disk, [], lead=2).shape == (0, 2, 5)
    in_ram = values.copy()
    rowio.write_rows(in_ram, 5, np.zeros((2, 2, 5)), lead=2)
    assert not in_ram[0, 5:7].any() and in_ram[0, 7].any()


def _rss_file_mib() -> float:
    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or "RssFile" not in Path("/proc/self/status").read_text(),
                    reason="needs Linux /proc RSS figures")
def test_writing_and_reading_a_file_leaves_rss_flat(tmp_path):
    """Through the map, writing 64 MiB and reading it back added 64 MiB each to RSS (RssFile)."""
    rows, width = 8192, 4096  # float16: 64 MiB
    before = _rss_file_mib()
    mapped = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float16, shape=(rows, width))
    block = np.ones((512, width), np.float16)
    for start in range(0, rows, 512):
        rowio.write_rows(mapped, start, block * start)
    rowio.flush(mapped)
    assert _rss_file_mib() - before < 16, "writing went through the map: RSS grows with the file"
    order = np.random.default_rng(0).permutation(rows)
    for start in range(0, rows, 256):
        batch = rowio.read_rows(mapped, np.sort(order[start:start + 256]))
        assert batch.shape == (256, width)
    assert _rss_file_mib() - before < 16, "reading went through the map: RSS grows with the file"
    assert rowio.read_rows(mapped, [513])[0, 0] == 512


def test_read_rows_into_a_given_array(tmp_path):
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "b.npy", values)
    mapped = np.load(tmp_path / "b.npy", mmap_mode="r")
    out = np.zeros((3, 4), np.float32)
    assert rowio.read_rows(mapped, [9, 2, 3], out=out) is out
    np.testing.assert_array_equal(out, values[[9, 2, 3]])
    assert rowio.read_rows(values, [1], out=np.zeros((1, 4), np.float32))[0, 0] == 4  # an array in RAM
    with pytest.raises(ValueError, match="shape"):
        rowio.read_rows(mapped, [1, 2], out=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        rowio.read_rows(mapped, [1, 2], out=np.zeros((4, 2), np.float32).T)


def test_write_rows_can_sync_each_write(tmp_path, monkeypatch):
    mapped = np.lib.format.open_memmap(tmp_path / "c.npy", mode="w+", dtype=np.float32, shape=(4, 3))
    synced = []
    monkeypatch.setattr(rowio.os, "fdatasync", lambda fd: synced.append(fd), raising=False)
    rowio.write_rows(mapped, 1, np.ones((2, 3)), sync=True)
    rowio.write_rows(mapped, 3, np.ones((1, 3)))
    assert len(synced) == 1
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy")[:, 0], [0, 1, 1, 1])
