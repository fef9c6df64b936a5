"""What an explanation costs: Grad-CAM heatmaps per image against plain predictions, batched and one by one.

A bundle (BUNDLE, or a lite0 bundle with random weights at `--size`, which costs the same) explains
`--n` generated photo-sized JPEGs; side by side in one run, medians of `--rounds`:

  predict       Predictor.predict (its own engine: PyTorch without an export)
  explain b=1   Predictor.explain, one image per call
  explain b=16  Predictor.explain over the whole folder, 16 images per pass (the CLI's default)

Each figure includes decoding the JPEGs (as `effitune explain` does); overlays are not drawn.

    .venv/bin/python benchmarks/explain_speed.py [BUNDLE] [--n 64] [--size 224] [--rounds 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effitune import bundle as bundles
from effitune.models.network import IMAGENET_MEAN, IMAGENET_STD, build_network
from effitune.predict import Predictor


def random_bundle(folder: Path, size: int) -> Path:
    torch.manual_seed(0)
    network, _ = build_network("tf_efficientnet_lite0", 10, pretrained=False)
    meta = {"classes": [f"class{i}" for i in range(10)], "backbone": "tf_efficientnet_lite0",
            "preprocessing": {"size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    bundles.save_bundle(folder, network.eval().state_dict(), meta)
    return folder


def photos(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = rng.normal(128, 40, (750, 1000, 3)).clip(0, 255).astype(np.uint8)
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="effitune-explain-"))
    folder = args.bundle or random_bundle(work / "model", args.size)
    predictor = Predictor(folder, device=args.device, backend="torch")
    paths = [str(p) for p in photos(work / "photos", args.n)]
    predictor.explain(paths[:2])  # warm: the explanation's own network, captum's import
    runs = {"predict": lambda: predictor.predict(paths, batch_size=16),
            "explain b=1": lambda: [predictor.explain([p]) for p in paths],
            "explain b=16": lambda: predictor.explain(paths, batch_size=16)}
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()}", "device": args.device, "images": args.n, "size": predictor.size,
        "ms_per_image": {name: round(1000 * value / args.n, 1) for name, value in medians.items()},
        "explain_b16_over_predict": round(medians["explain b=16"] / medians["predict"], 2),
        "batched_speedup": round(medians["explain b=1"] / medians["explain b=16"], 2)}, indent=2))


if __name__ == "__main__":
    main()
