"""Shared test helpers: small, real image files written with Pillow.

Import the plain functions (`from conftest import make_image_tree, random_image`) or use the
`image_tree` fixture for the default two-class tree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


def random_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """An RGB image no other seed resembles: a random colour field, a random shape and light noise.

    The smooth field gives each image its own low-frequency structure, so perceptual hashes of
    different seeds are far apart, while re-encoding one image keeps its hash close.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    box = (x0, y0, x0 + int(rng.integers(width // 4, width // 2)), y0 + int(rng.integers(height // 4, height // 2)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(field, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")


def make_image_tree(root: str | Path, classes: dict[str, int] | None = None, size: tuple[int, int] = (40, 32),
                    seed: int = 0, formats: tuple[str, ...] = ("png", "jpg")) -> dict[str, list[Path]]:
    """Write `root/<class>/<class>_NNN.<fmt>` images, formats alternating; return {class: paths}.

    Every image gets its own seed (derived from `seed`), so no two are near duplicates; give trees
    that must not share images different seeds.
    """
    root = Path(root)
    classes = {"cat": 8, "dog": 8} if classes is None else classes
    written: dict[str, list[Path]] = {}
    for class_index, (label, count) in enumerate(classes.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        written[label] = []
        for index in range(count):
            path = folder / f"{label}_{index:03d}.{formats[index % len(formats)]}"
            image = random_image(seed * 1_000_003 + class_index * 10_007 + index, size)
            image.save(path, quality=95)  # PNG ignores quality
            written[label].append(path)
    return written


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """A folder-per-class tree (cat, dog: 8 images each) under tmp_path/data."""
    root = tmp_path / "data"
    make_image_tree(root)
    return root


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_colour_dataset(root: str | Path, per_class: int = 20, size: tuple[int, int] = (48, 40)) -> Path:
    """A tiny *learnable* tree: red/green/blue-tinted images with distinct structure (no near duplicates)."""
    root = Path(root)
    for class_index, (label, colour) in enumerate(COLOURS.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            base = np.asarray(random_image(7919 * class_index + index, size), dtype=np.float32)
            tinted = 0.3 * base + 0.7 * np.array(colour, dtype=np.float32)
            Image.fromarray(tinted.astype(np.uint8)).save(folder / f"{label}_{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_dataset_module(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours") / "data")
