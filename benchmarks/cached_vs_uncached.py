"""Does the frozen-prefix cache change accuracy? Cached vs uncached training, same data, split and seeds.

Cached (the default): the frozen layers run once per image and augmented view; stage 1 trains the head
on pooled features, stage 2 the tail on cached activations, the views cycled over epochs. Uncached
(`train.feature_cache: false`): every step augments the image afresh (from the same resize-once
cache) and runs the whole network forward. Same manifest, same train.seed values; test accuracy on
the held-out split, wall time of each run:

    python benchmarks/cached_vs_uncached.py --per-class 200 --size 64 --unfreeze 1 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import effitune
from effitune.datasets import export_fashion_mnist


def run(out: Path, cached: bool, seed: int, args, **source) -> dict:
    config = effitune.load_config(overrides={"train.feature_cache": cached, "train.seed": seed,
                                             "data.image_size": args.size, "train.unfreeze": args.unfreeze,
                                             "train.stage1.epochs": args.epochs, "train.stage2.epochs": args.epochs})
    began = time.perf_counter()
    result = effitune.train(out=out, config=config, progress=False, **source)
    return {"seed": seed, "test_acc": round(result.metrics["accuracy"], 4),
            "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--unfreeze", default="1")
    parser.add_argument("--epochs", type=int, default=8, help="per phase")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/cached-vs-uncached"))
    args = parser.parse_args()

    images = export_fashion_mnist(args.out / "images", per_class=args.per_class)
    first = run(args.out / "cached-seed0", True, args.seeds[0], args, data=images)
    manifest = args.out / "cached-seed0" / "manifest.csv"
    runs = {"cached": [first], "uncached": []}
    for seed in args.seeds:
        for name, cached in (("cached", True), ("uncached", False)):
            if name == "cached" and seed == args.seeds[0]:
                continue
            runs[name].append(run(args.out / f"{name}-seed{seed}", cached, seed, args, manifest=manifest))
    summary = {name: {"runs": rs, "mean_test": round(statistics.mean(r["test_acc"] for r in rs), 4),
                      "stdev_test": round(statistics.stdev(r["test_acc"] for r in rs), 4) if len(rs) > 1 else None,
                      "median_seconds": statistics.median(r["seconds"] for r in rs)} for name, rs in runs.items()}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "per_class": args.per_class, "size": args.size, "unfreeze": args.unfreeze, "epochs": args.epochs,
              **summary,
              "difference_cached_minus_uncached": round(summary["cached"]["mean_test"]
                                                        - summary["uncached"]["mean_test"], 4),
              "uncached_over_cached_seconds": round(summary["uncached"]["median_seconds"]
                                                    / summary["cached"]["median_seconds"], 2)}
    print(json.dumps(report, indent=2))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
