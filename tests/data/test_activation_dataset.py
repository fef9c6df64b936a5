"""ActivationDataset: the rows of cached activations, read without mapping the file into RSS."""
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from effitune.data.datamodule import ActivationDataset, collate_batched


def _npy(path: Path, array: np.ndarray) -> np.ndarray:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    out[:] = array
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def test_rows_match_the_array(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 50, 3, 2, 2)).astype(np.float16)
    labels = rng.integers(0, 5, 50)
    dataset = ActivationDataset(_npy(tmp_path / "a.npy", values), labels)
    assert dataset._file is not None  # the positional-read path, not indexing the map
    for view in (0, 1):
        dataset.set_epoch(view)
        for indices in ([7, 3, 3, 49, 0, 1, 2, 20], list(range(50)), [5], []):
            batch, got = dataset.__getitems__(indices)
            order = np.sort(indices).astype(np.int64)
            np.testing.assert_array_equal(batch.numpy(), values[view, order])
            np.testing.assert_array_equal(got.numpy(), labels[order])
    x, y = dataset[10]
    np.testing.assert_array_equal(x.numpy(), values[1, 10])
    # a copy for a loader worker opens the file itself
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone.__getitems__([4, 2])[0].numpy(), values[1, [2, 4]])


def test_arrays_that_are_not_a_whole_file_are_indexed(tmp_path):
    values = np.arange(2 * 10 * 4, dtype=np.float16).reshape(2, 10, 4)
    mapped = _npy(tmp_path / "a.npy", values)
    for array in (values, mapped[:, 2:], mapped[1:]):
        dataset = ActivationDataset(array, np.zeros(array.shape[1], dtype=np.int64))
        assert dataset._file is None
        np.testing.assert_array_equal(dataset.__getitems__([3, 1])[0].numpy(), np.asarray(array)[0, [1, 3]])


def _rss_file_mib() -> float:
    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or "RssFile" not in Path("/proc/self/status").read_text(),
                    reason="needs Linux /proc RSS figures")
def test_an_epoch_does_not_grow_rss_by_the_cached_file(tmp_path):
    """Reading a 64 MiB cache through its memory map added all 64 MiB to RSS (RssFile); reads keep it out."""
    rows, width = 8192, 4096  # float16: 64 MiB, one view
    array = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float16, shape=(1, rows, width))
    for start in range(0, rows, 1024):
        array[0, start:start + 1024] = start
    array.flush()
    del array
    dataset = ActivationDataset(np.load(tmp_path / "big.npy", mmap_mode="r"), np.zeros(rows, dtype=np.int64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=collate_batched)
    next(iter(loader))  # lazy imports and allocations before the measurement
    before = _rss_file_mib()
    seen = 0
    for batch, _ in loader:
        seen += len(batch)
    assert seen == rows
    assert _rss_file_mib() - before < 16, "an epoch mapped the cached activations into the process (RSS grows with N)"
