"""Phone-sized photos: scan + resize-once cache, decoded once at the size needed, against the old way.

Builds 80 photos (scikit-image's sample photos, two classes, each photo with its own noise, crop and
flip) as 4000x3000 JPEGs (12 MP) and as 1000x750 JPEGs (0.75 MP), quality 90, then measures on one
core, side by side in one run:

  before   every JPEG decoded whole: by the scan (hashes on the full image) and again by the cache
           (images.DECODE_MARGIN and scan.HASH_DECODE_SIDE set to None: the code as it was)
  after    one decode per photo, reduced in the DCT to at least 2 x 224 px, feeding the scan's hashes
           and the cache entry at once (the scan's `cache=`; the cache pass then decodes nothing)

It prints images/s per core, decodes per photo, and the pixels the model gets from a reduced decode
against a full one (224 px, absolute difference). With `--train`, it also times
`effitune train DIR --epochs 1 --unfreeze 1` on both photo sets with fresh caches (the issue's
criterion: the 12-MP run at most 1.25x the 0.75-MP run; medians of `--repeats` runs, sizes and versions
interleaved, since the first run after writing the photos pays for cold disk and import caches),
and with `--before-src OLD/src` the same runs on an older checkout's package, in the same call.

    .venv/bin/python benchmarks/photo_ingest.py [--n 80] [--train [--repeats 3]] [--before-src /tmp/old/src] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from effitune.data import images, scan as scan_module
from effitune.data.cache import ImageCache
from effitune.data.images import load_for_model, load_rgb, resize_center_crop
from effitune.data.scan import iter_records, scan

PHOTOS = {"a": ("astronaut", "coffee", "chelsea", "rocket"),
          "b": ("hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")}
SIZES = {"12MP": (4000, 3000), "0.75MP": (1000, 750)}


def make_photos(root: Path, n: int) -> dict[str, Path]:
    """{size name: DATA folder}, the same n photos (n/2 per class) at each size."""
    import skimage.data

    rng = np.random.default_rng(0)
    folders = {name: root / name for name in SIZES}
    for index in range(n):
        label = "ab"[index % 2]
        source = np.asarray(getattr(skimage.data, PHOTOS[label][(index // 2) % 4])())[..., :3]
        height, width = source.shape[:2]
        crop = rng.uniform(0.75, 1.0)
        box_w, box_h = int(width * crop), int(min(height * crop, width * crop * 3 / 4))
        left, top = rng.integers(0, width - box_w + 1), rng.integers(0, height - box_h + 1)
        picture = Image.fromarray(source).crop((left, top, left + box_w, top + box_h))
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        noise_seed = int(rng.integers(1 << 31))
        for name, size in SIZES.items():
            big = np.asarray(picture.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
            big += np.random.default_rng(noise_seed).normal(0, 4, big.shape).astype(np.float32)
            folder = folders[name] / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(folder / f"{index:03d}.jpg", quality=90)
    return folders


class DecodeCounter:
    """Counts pixel decodes (ImageFile.load with tiles left) in this process and its forked workers."""

    def __init__(self, log: Path):
        self.log, self.original = log, ImageFile.ImageFile.load
        counter = self

        def load(image):
            if image.tile:
                with open(counter.log, "a") as stream:
                    stream.write("1\n")
            return counter.original(image)
        ImageFile.ImageFile.load = load

    def count(self) -> int:
        return len(self.log.read_text().split()) if self.log.exists() else 0


def ingest(data: Path, work: Path, mode: str, counter: DecodeCounter) -> dict:
    """Scan + cache at 224 px on one core, `mode` before or after; seconds and decodes."""
    saved = images.DECODE_MARGIN, scan_module.HASH_DECODE_SIDE
    if mode == "before":
        images.DECODE_MARGIN, scan_module.HASH_DECODE_SIDE = None, None
    shutil.rmtree(work, ignore_errors=True)
    first = counter.count()
    try:
        began = time.perf_counter()
        cache = ImageCache(work / "cache", 224)
        result = scan(data, out=work / "scan", workers=1, cache=cache if mode == "after" else None,
                      cache_from_side=224)
        rows = [r for r in iter_records(result.records_path) if r["status"] == "ok"]
        ImageCache(work / "cache", 224).build([r["path"] for r in rows], [r["sha1"] for r in rows], workers=1)
        seconds = time.perf_counter() - began
    finally:
        images.DECODE_MARGIN, scan_module.HASH_DECODE_SIDE = saved
    return {"mode": mode, "photos": len(rows), "seconds": round(seconds, 2),
            "photos_per_s_per_core": round(len(rows) / seconds, 2),
            "decodes_per_photo": round((counter.count() - first) / len(rows), 2)}


def pixel_difference(data: Path, limit: int = 16) -> dict:
    """What the model sees from a reduced decode against a full decode, both resized to 224 px."""
    differences = []
    for path in sorted(data.rglob("*.jpg"))[:limit]:
        reduced = load_for_model(path, 224).astype(np.int16)
        full = np.asarray(resize_center_crop(load_rgb(path), 224), dtype=np.int16)
        differences.append(np.abs(reduced - full))
    stacked = np.stack(differences)
    return {"photos": len(differences), "max": int(stacked.max()), "p99": float(np.percentile(stacked, 99)),
            "mean": round(float(stacked.mean()), 3)}


def train_run(data: Path, out: Path, src: str | None) -> dict:
    """`effitune train DATA --epochs 1 --unfreeze 1` with fresh caches; wall seconds and test accuracy."""
    cache = out.parent / f"cache-{out.name}"
    for folder in (out, cache):  # fresh: nothing decoded or trained before
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "EFFITUNE_CACHE": str(cache)}
    if src:
        env["PYTHONPATH"] = src
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "effitune.cli", "train", str(data), "--out", str(out), "--epochs",
                           "1", "--unfreeze", "1", "--json"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"train failed on {data}:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    timings = json.loads((out / "timings.json").read_text())
    steps = timings.get("steps", timings)
    return {"seconds": round(seconds, 1), "accuracy": summary["metrics"].get("accuracy"),
            "scan": steps.get("scan"), "resize cache": steps.get("resize cache"), "report": steps.get("report")}


def _median_run(runs: list[dict]) -> dict:
    """Each figure's median over the repeats (the accuracy of the first: every repeat trains the same)."""
    def median(key):
        values = [run[key] for run in runs if run[key] is not None]
        return round(statistics.median(values), 2) if values else None
    return {key: median(key) if key != "accuracy" else runs[0][key] for key in runs[0]} | {
        "runs": len(runs), "all_seconds": [run["seconds"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--train", action="store_true", help="also time `effitune train` on both photo sets")
    parser.add_argument("--before-src", help="an older checkout's src/ folder: its train runs beside this one's")
    parser.add_argument("--repeats", type=int, default=3, help="train runs of each kind (medians are printed)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="effitune-photos-"))
    folders = make_photos(work / "photos", args.n)
    counter = DecodeCounter(work / "decodes.log")
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "ingest": {}, "pixel_difference_224px": pixel_difference(folders["12MP"])}
    for name, folder in folders.items():
        rows = [ingest(folder, work / "ingest", mode, counter) for mode in ("before", "after")]
        rows.append({"speedup": round(rows[0]["seconds"] / rows[1]["seconds"], 2)})
        results["ingest"][name] = rows
    if args.train:
        versions = {"this": None, **({"before": args.before_src} if args.before_src else {})}
        runs: dict = {(version, name): [] for version in versions for name in folders}
        for repeat in range(args.repeats):  # interleaved: no version or size gets the warm caches alone
            order = list(folders.items()) if repeat % 2 == 0 else list(folders.items())[::-1]
            for version, src in versions.items():
                for name, folder in order:
                    runs[version, name].append(train_run(folder, work / f"train-{version}-{name}", src))
        results["train"] = {}
        for version in versions:
            medians = {name: _median_run(runs[version, name]) for name in folders}
            medians["ratio_12MP_to_0.75MP"] = round(medians["12MP"]["seconds"] / medians["0.75MP"]["seconds"], 2)
            results["train"][version] = medians
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
