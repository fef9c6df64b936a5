"""Which features find flipped labels? ImageNet features at several depths, no training (issue 23).

Real Fashion-MNIST train images, `--share` of them given a random other label (seeded). The ImageNet
network (tf_efficientnet_lite0, packaged weights, at 96 px as effitune trains these images) is cut below
its last 0 to 3 stages; each cut's pooled output feeds the audit's out-of-fold probe
(`evaluate.data_audit.out_of_fold_probabilities`), then cleanlab's `find_label_issues` (prune by noise
rate, ranked by self-confidence) and, side by side, the hand-written confident-learning rule effitune
used before. Recall, precision and precision among the first N flagged (N = the number flipped).

    python benchmarks/label_features.py --images 1500 15000 --work /tmp/label-features
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effitune.datasets import load_fashion_mnist
from effitune.evaluate.data_audit import out_of_fold_probabilities
from effitune.models.backbones import create_backbone
from effitune.models.network import Network

SIZE = 96  # effitune's size for 28-px images
DEPTHS = (0, 1, 2, 3)


def flipped_labels(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image indices, given labels, planted mask): n // 10 images per class, `share` of them relabelled."""
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 10, replace=False) for c in range(10)])
    given = labels[chosen].copy()
    flip = rng.choice(len(chosen), int(round(share * len(chosen))), replace=False)
    for i in flip:
        given[i] = rng.choice([c for c in range(10) if c != labels[chosen[i]]])
    planted = np.zeros(len(chosen), bool)
    planted[flip] = True
    return chosen, given, planted


def imagenet_features(indices: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """{"d<depth>": pooled output below the last `depth` stages} of ImageNet-pretrained lite0."""
    images, _ = load_fashion_mnist("train")
    backbone, _ = create_backbone("tf_efficientnet_lite0", 10)
    cfg = backbone.pretrained_cfg
    network = Network(backbone, tuple(cfg["mean"]), tuple(cfg["std"])).eval()
    out: dict[str, list[np.ndarray]] = {f"d{d}": [] for d in DEPTHS}
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = np.stack([np.asarray(Image.fromarray(images[i]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
                              for i in indices[start:start + batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
            out["d0"].append(network.features(x).numpy())
            for depth in DEPTHS[1:]:
                out[f"d{depth}"].append(network.prefix(x, depth).mean((2, 3)).numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def hand_written_rule(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """effitune's rule before cleanlab: below its class's mean self-confidence while another class clears its own;
    most suspicious first by the margin to that class."""
    thresholds = np.array([probabilities[labels == k, k].mean() for k in range(probabilities.shape[1])])
    self_confidence = probabilities[np.arange(len(labels)), labels]
    confident = probabilities >= thresholds[None]
    confident[np.arange(len(labels)), labels] = False
    suspects = np.flatnonzero((self_confidence < thresholds[labels]) & confident.any(1))
    margins = [self_confidence[i] - np.where(confident[i], probabilities[i], -1).max() for i in suspects]
    return suspects[np.argsort(margins, kind="stable")]


def measure(order: np.ndarray, planted: np.ndarray) -> str:
    n = planted.sum()
    return (f"flagged {len(order):5d}, recall {planted[order].sum() / n:.3f}, precision "
            f"{planted[order].mean() if len(order) else 0:.3f}, precision among the first N {planted[order[:n]].mean():.3f}")


def main() -> None:
    from cleanlab.filter import find_label_issues

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1500, 15000])
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/effitune-label-features"))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; command: {' '.join(sys.argv)}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for n in args.images:
        indices, given, planted = flipped_labels(n, args.share, args.seed)
        cached = args.work / f"features-{n}-s{args.seed}.npz"
        if not cached.is_file():
            began = time.perf_counter()
            np.savez(cached, **imagenet_features(indices))
            print(f"{n} images embedded in {time.perf_counter() - began:.0f} s", flush=True)
        features = dict(np.load(cached))
        print(f"\n{n} images, {planted.sum()} flipped")
        for name, values in features.items():
            probabilities = out_of_fold_probabilities(values.astype(np.float32), given, seed=args.seed)
            flagged = np.flatnonzero(find_label_issues(given, probabilities, filter_by="prune_by_noise_rate", n_jobs=1))
            confidence = probabilities[np.arange(len(given)), given]
            ranked = flagged[np.argsort(confidence[flagged], kind="stable")]
            print(f"  {name} ({values.shape[1]} dims), out-of-fold accuracy {(probabilities.argmax(1) == given).mean():.3f}")
            print(f"    cleanlab:     {measure(ranked, planted)}")
            print(f"    hand-written: {measure(hand_written_rule(probabilities, given), planted)}")


if __name__ == "__main__":
    main()
