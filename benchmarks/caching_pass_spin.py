"""The CPU caching pass with ONNX Runtime's idle threads spinning (its default) vs sleeping.

Loader workers augment the training images on the same cores as ONNX Runtime runs the frozen layers;
threads that busy-wait between operators take those workers' time. `compute_activations` turns the
spinning off when it has loader workers. This script runs the real pass (4 views, the demo's cut
points) both ways, interleaved, on images of a finished run's resize-once cache:

    .venv/bin/python benchmarks/caching_pass_spin.py RUN_DIR/manifest.csv --cache CACHE_ROOT --size 96 --images 2000
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from effitune.config import Config
from effitune.data.cache import ImageCache, images_root
from effitune.data.datamodule import ImageDataModule
from effitune.data.manifest import read_manifest
from effitune.training import features
from effitune.training.run import network_for


def training_images(manifest: Path, cache_root: Path | None, size: int, images: int):
    """(datamodule, network): the first `images` rows of a run's manifest as a training split, read from
    its resize-once cache, and the default backbone with a head for their classes."""
    rows = [{**row, "split": "train"} for row in read_manifest(manifest)[:images]]
    classes = sorted({row["label"] for row in rows})
    cache = ImageCache(images_root(cache_root), size)
    keys = cache.build([row["path"] for row in rows], [row["sha1"] for row in rows])
    network, _ = network_for(Config(), len(classes))
    return ImageDataModule(rows, keys, classes, cache), network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="the run's cache_root (default: effitune's)")
    parser.add_argument("--size", type=int, required=True, help="the run's image size")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    datamodule, network = training_images(args.manifest, args.cache, args.size, args.images)
    real = features.onnx_capture
    seconds = {True: [], False: []}
    for _ in range(args.rounds):
        for spin in (True, False):
            features.onnx_capture = lambda *a, spin_=spin, **k: real(*a, **{**k, "spin": spin_})
            folder = Path(tempfile.mkdtemp())
            began = time.perf_counter()
            features.compute_activations(network, datamodule.dataset("train", augment=True), [1, 2, 3], folder,
                                         views=args.views, batch_size=128, workers=datamodule.workers)
            seconds[spin].append(time.perf_counter() - began)
            shutil.rmtree(folder)
    features.onnx_capture = real
    print(f"{len(datamodule.keys)} images x {args.views} views at {args.size} px, {datamodule.workers} loader worker(s)")
    for spin, label in ((True, "spinning (ONNX Runtime's default)"), (False, "sleeping (effitune with workers)")):
        print(f"{label:36s} {', '.join(f'{s:.1f}' for s in seconds[spin])} s; median {statistics.median(seconds[spin]):.1f} s")
    print(f"sleeping / spinning: {statistics.median(seconds[True]) / statistics.median(seconds[False]):.2f}x faster")


if __name__ == "__main__":
    main()
