"""Demo data: Fashion-MNIST exported as a folder-per-class tree of PNGs.

The images come from Debian's `dataset-fashion-mnist` package (files under
/usr/share/datasets/fashion-mnist). Elsewhere, download the four `*-ubyte.gz` files from
https://github.com/zalandoresearch/fashion-mnist and pass their folder as `source`.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_HOW_TO_GET = (
    "Install Debian's package (`sudo apt-get install dataset-fashion-mnist`) or download the four "
    "*-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist and pass their folder with --source."
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def ensure_fashion_mnist(source: str | Path | None = None, install: bool = True) -> Path:
    """Folder holding the raw files; installs Debian's package when missing and allowed (as root)."""
    folder = Path(source) if source else FASHION_MNIST_DIR
    if all((folder / name).is_file() for pair in _FILES.values() for name in pair):
        return folder
    if source is None and install and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False,
                       stdout=subprocess.DEVNULL)
        if all((folder / name).is_file() for pair in _FILES.values() for name in pair):
            return folder
    raise UserError(f"Fashion-MNIST files not found in {folder}. {_HOW_TO_GET}")


def load_fashion_mnist(part: str = "train", source: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the 'train' (60k) or 'test' (10k) part."""
    folder = ensure_fashion_mnist(source)
    images_name, labels_name = _FILES[part]
    return _read_idx(folder / images_name), _read_idx(folder / labels_name)


def export_fashion_mnist(out: str | Path, per_class: int | None = 600, part: str = "train",
                         seed: int = 0, source: str | Path | None = None) -> Path:
    """Write `out/<class>/<index>.png`; `per_class` images per class (None = all), chosen by `seed`.

    Idempotent: an existing, complete export is reused.
    """
    out = Path(out)
    images, labels = load_fashion_mnist(part, source)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(FASHION_MNIST_CLASSES)):
        indices = np.flatnonzero(labels == label)
        if per_class is not None:
            indices = np.sort(rng.choice(indices, size=min(per_class, len(indices)), replace=False))
        chosen.extend(indices.tolist())
    marker = out / ".effitune-export"
    stamp = f"{part} {per_class} {seed} {len(chosen)}"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    for index in chosen:
        folder = out / FASHION_MNIST_CLASSES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], "L").save(folder / f"{part}_{index:05d}.png")
    marker.write_text(stamp)
    return out
