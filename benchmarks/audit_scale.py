"""Time the model-assisted audit (the report's and `audit --model`'s) as the number of images grows.

Synthetic pooled features (1280-d, as tf_efficientnet_lite0's): 72 classes, each a cluster of
non-negative activations, 1% near-duplicate copies and 1% flipped labels, plus the metadata the
shortcut check reads. Each size runs `audit_features` whole: the label probe, the neighbour search
(near duplicates, outliers) and the shortcut check. `--exact-up-to N` also times the exact
all-pairs neighbour search (the one before the index) at the sizes up to N, side by side.

    python benchmarks/audit_scale.py --sizes 20000 80000 320000 --json

The last line printed is one JSON list of {"n": ..., "seconds": ...}.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np

from effitune.evaluate import data_audit
from effitune.evaluate import neighbours as nearest


def synthetic(n: int, dims: int = 1280, classes: int = 72, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, size=(classes, dims)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    features = np.empty((n, dims), np.float32)
    for start in range(0, n, 16384):  # in blocks: no float64 n x d temporary
        part = labels[start:start + 16384]
        noise = rng.standard_normal((len(part), dims), dtype=np.float32)
        features[start:start + len(part)] = np.maximum(centres[part] + 1.5 * noise, 0)
    copies = rng.choice(n, size=(n // 100, 2), replace=False)
    features[copies[:, 1]] = features[copies[:, 0]] * 1.001
    flipped = rng.choice(n, size=n // 100, replace=False)
    labels[flipped] = (labels[flipped] + 1) % classes
    names = [f"class{k:02d}" for k in labels]
    paths = [f"/data/{name}/{i}.jpg" for i, name in enumerate(names)]
    splits = rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15]).tolist()
    metadata = [{"width": 640, "height": 480, "aspect": 640 / 480, "format": "JPEG", "orientation": 1,
                 "log_bytes": float(np.log1p(50_000 + i % 997)), "bytes_per_pixel": 0.16, "mean_r": 120.0 + i % 7,
                 "mean_g": 110.0, "mean_b": 100.0} for i in range(n)]
    return features, names, paths, splits, metadata


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000, 320_000])
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--exact-up-to", type=int, default=20_000, help="also time the all-pairs search up to N")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the timings")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, python {platform.python_version()}")
    results = []
    for n in args.sizes:
        features, names, paths, splits, metadata = synthetic(n, args.dims)
        began = time.perf_counter()
        audit = data_audit.audit_features(features, names, paths, splits=splits, metadata=metadata)
        seconds = time.perf_counter() - began
        row = {"n": n, "seconds": round(seconds, 1), "label_issues": len(audit.label_issues),
               "near_duplicates": audit.near_duplicate_count, "peak_rss_gib": round(rss_gib(), 2)}
        began = time.perf_counter()
        pairs, total, _ = nearest.neighbours(features, data_audit.SIMILARITY, data_audit.NEIGHBOURS, 10_000)
        row["neighbour_search_seconds"] = round(time.perf_counter() - began, 1)
        if n <= args.exact_up_to:
            began = time.perf_counter()
            unit = nearest.unit_rows(features)
            exact = nearest._collect(nearest._exact_numpy(unit, data_audit.SIMILARITY, data_audit.NEIGHBOURS),
                                     n, 10_000)
            row["exact_neighbour_search_seconds"] = round(time.perf_counter() - began, 1)
            row["pairs_found_of_exact"] = round(total / max(1, exact[1]), 4)
        print(json.dumps(row), flush=True)
        results.append(row)
        del features, metadata
    first = results[0]
    for row in results[1:]:
        print(f"{row['n']} / {first['n']} images: x{row['n'] / first['n']:.0f} images, "
              f"x{row['seconds'] / max(first['seconds'], 1e-9):.1f} time")
    if args.json:
        print(json.dumps([{"n": row["n"], "seconds": row["seconds"]} for row in results]))


if __name__ == "__main__":
    main()
