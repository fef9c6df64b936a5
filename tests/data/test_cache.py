import numpy as np
import pytest
from PIL import Image

from effitune.data.cache import ImageCache
from effitune.data.images import load_for_model
from effitune.errors import UserError


def write_images(folder, n, size=(50, 30)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_build_once_then_read_without_decoding(tmp_path, monkeypatch):
    paths = write_images(tmp_path, 6)
    cache = ImageCache(tmp_path / "cache", 24)
    keys = cache.build(paths, workers=1)
    assert len(set(keys)) == 6
    assert np.array_equal(cache.get(keys[2]), load_for_model(paths[2], 24))
    # A second cache over the same folder knows every file: nothing is decoded again.
    import effitune.data.cache as module
    monkeypatch.setattr(module, "load_for_model", lambda *a: pytest.fail("decoded again"))
    again = ImageCache(tmp_path / "cache", 24)
    assert again.build(paths, keys, workers=1) == keys
    assert again.stack(keys).shape == (6, 24, 24, 3)


def test_changed_file_gets_new_entry(tmp_path):
    paths = write_images(tmp_path, 3)
    cache = ImageCache(tmp_path / "cache", 16)
    keys = cache.build(paths, workers=1)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(paths[1])
    new_keys = ImageCache(tmp_path / "cache", 16).build(paths, keys, workers=1)
    assert new_keys[0] == keys[0] and new_keys[2] == keys[2]
    assert new_keys[1] != keys[1]
    assert (ImageCache(tmp_path / "cache", 16).get(new_keys[1]) == [255, 0, 0]).all()


def test_sizes_are_separate_entries(tmp_path):
    paths = write_images(tmp_path, 2)
    a = ImageCache(tmp_path / "cache", 16)
    b = ImageCache(tmp_path / "cache", 32)
    assert a.get(a.build(paths, workers=1)[0]).shape == (16, 16, 3)
    assert b.get(b.build(paths, workers=1)[0]).shape == (32, 32, 3)


def test_file_broken_after_scan_names_it(tmp_path):
    paths = write_images(tmp_path, 2)
    (tmp_path / "1.png").write_bytes(b"not a png any more")
    with pytest.raises(UserError, match="1.png"):
        ImageCache(tmp_path / "cache", 16).build(paths, workers=1)


def test_the_cache_decodes_under_the_scans_pixel_limit_not_pillows_default(tmp_path, monkeypatch):
    """An image the scan accepted (data.max_pixels raised above Pillow's default) must not fail in the
    cache with Pillow's own limit; and a lower limit holds there too."""
    paths = write_images(tmp_path, 2, size=(50, 30))  # 1,500 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # stands in for Pillow's default; workers fork with it
    keys = ImageCache(tmp_path / "cache", 16, max_pixels=10_000).build(paths, workers=1)
    assert len(set(keys)) == 2
    with pytest.raises(UserError, match="over|exceeds"):
        ImageCache(tmp_path / "small", 16, max_pixels=1_000).build(paths, workers=1)
