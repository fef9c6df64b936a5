"""Data pipeline figures from one run: scan speed, cache vs decode-every-epoch, scan memory vs size.

    python benchmarks/data_pipeline.py --images 10000 --rss-small 10000 --rss-large 100000

1. scan files/s over N generated JPEGs (500x375, like a web photo) with all cores;
2. loader images/s for one epoch reading the resize-once cache vs decoding + resizing the originals
   (what a plain ImageFolder loader does every epoch), same DataLoader settings, and their ratio;
3. peak RSS of the scanning process (and of its largest worker) for a small and a large tree of tiny
   files: streaming means the large one must not need proportionally more memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from effitune.data.cache import ImageCache
from effitune.data.datamodule import ImageDataset, collate_batched
from effitune.data.images import load_for_model
from effitune.data.scan import load_ok_records, scan


def make_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 10) -> None:
    marker = root / f".made-{n}-{size[0]}x{size[1]}"
    if marker.is_file():
        return
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 3, 4, 3), dtype=np.uint8)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(base[i % 64]).resize(size, Image.Resampling.BICUBIC)
        noise = rng.integers(-20, 21, (size[1], size[0], 3))
        pixels = (np.asarray(field, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)
    marker.write_text("ok")


class DecodeEveryEpoch(Dataset):
    """What a plain loader does: open, decode, orient, resize each file on every access."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(load_for_model(self.paths[i], self.size)).permute(2, 0, 1), 0


def epoch_rate(dataset, workers: int, batch: int = 64) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_batched)
    started = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - started)


def rss_of_scan(root: Path, out: Path) -> dict:
    """Scan in a fresh process; report its own peak RSS and its largest child's (MiB).

    The process's own peak is VmHWM from /proc (ru_maxrss would carry over the benchmark's own peak
    through fork + exec).
    """
    code = ("import json, re, resource, sys; from effitune.data.scan import scan; "
            "r = scan(sys.argv[1], out=sys.argv[2], progress=False); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps({'ok': r.counts['ok'], 'self_mib': hwm / 1024, "
            "'worker_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(root), str(out)], capture_output=True, text=True,
                            check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def main() -> None:
    import warnings
    warnings.filterwarnings("ignore", message=".*not writable.*")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rss-small", type=int, default=10_000)
    parser.add_argument("--rss-large", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=224, help="training resolution for the loader test")
    parser.add_argument("--work", type=Path, default=Path("/tmp/effitune-data-bench"))
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    report = {"machine": f"{platform.machine()}, {workers} cores", "python": platform.python_version()}

    photos = args.work / "photos"
    make_jpegs(photos, args.images, (500, 375))
    started = time.perf_counter()
    result = scan(photos, out=args.work / "scan", progress=False)
    seconds = time.perf_counter() - started
    report["scan"] = {"files": result.counts["ok"], "seconds": round(seconds, 1),
                      "files_per_s": round(result.counts["ok"] / seconds, 1)}
    print(json.dumps(report["scan"]), flush=True)

    records = load_ok_records(result.records_path)
    paths = [r["path"] for r in records]
    cache = ImageCache(args.work / "cache", args.size)
    started = time.perf_counter()
    keys = cache.build(paths, [r["sha1"] for r in records])
    build_seconds = time.perf_counter() - started
    loader_workers = max(1, workers - 1)
    cached = [epoch_rate(ImageDataset(cache, keys, np.zeros(len(keys), dtype=np.int64)), loader_workers)
              for _ in range(3)]
    decoded = [epoch_rate(DecodeEveryEpoch(paths, args.size), loader_workers) for _ in range(2)]
    report["loader"] = {"images": len(paths), "size": args.size, "workers": loader_workers,
                        "cache_build_seconds": round(build_seconds, 1),
                        "cached_images_per_s_median": round(statistics.median(cached), 1),
                        "decode_images_per_s_median": round(statistics.median(decoded), 1),
                        "ratio": round(statistics.median(cached) / statistics.median(decoded), 1)}
    print(json.dumps(report["loader"]), flush=True)

    report["rss"] = {}
    for n in (args.rss_small, args.rss_large):
        tree = args.work / f"tiny{n}"
        make_jpegs(tree, n, (32, 32))
        report["rss"][n] = rss_of_scan(tree, args.work / f"scan{n}")
        print(json.dumps({n: report["rss"][n]}), flush=True)
    small, large = report["rss"][args.rss_small], report["rss"][args.rss_large]
    report["rss"]["large_over_small_self"] = round(large["self_mib"] / small["self_mib"], 2)
    print(json.dumps(report, indent=2))
    (args.work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
