"""Unknown-image separation on the trained model's pooled features vs the untouched ImageNet backbone's.

A diagnostic for the digits regression in docs/benchmarks.md ("Unknown images"): kNN (k = 1, cosine)
AUROC of known test images vs an unknown folder, against a bank of 2,000 training images, for
(a) the bundle's network and (b) the same backbone with its ImageNet weights, no training. Images are
resized straight to the bundle's size (no crop): a quick check, not effitune's predict path.

    python benchmarks/ood_frozen_features.py --bundle /tmp/clean3/demo/run/model \\
        --manifest /tmp/tta/run/manifest.csv --unknown /tmp/ood-bench-s3/unknown/digits
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import effitune
from effitune.data.manifest import read_manifest
from effitune.models.backbones import create_backbone
from effitune.models.network import Network
from effitune.ood import kth_similarity, l2_normalize


def load_images(paths: list[str], size: int) -> torch.Tensor:
    images = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def pooled(network: Network, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    with torch.inference_mode():
        return l2_normalize(np.concatenate([network.features(images[i:i + batch]).numpy()
                                            for i in range(0, len(images), batch)]))


def knn_auroc(network: Network, images: dict[str, torch.Tensor]) -> float:
    features = {name: pooled(network, x) for name, x in images.items()}
    known = kth_similarity(features["known"], features["bank"], 1)
    unknown = kth_similarity(features["unknown"], features["bank"], 1)
    return float(roc_auc_score(np.r_[np.ones(len(known)), np.zeros(len(unknown))], np.r_[known, unknown]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="the run's manifest.csv (train + test rows)")
    parser.add_argument("--unknown", type=Path, required=True, help="a folder of images of no class")
    parser.add_argument("--bank", type=int, default=2000)
    args = parser.parse_args()

    trained = effitune.load(args.bundle).network.eval()
    meta = json.loads((args.bundle / "effitune.json").read_text())
    size = meta["preprocessing"]["size"]
    rows = read_manifest(args.manifest)
    train = [r["path"] for r in rows if r["split"] == "train"]
    bank = [train[i] for i in np.random.default_rng(0).choice(len(train), min(args.bank, len(train)), replace=False)]
    unknown = sorted(str(p) for p in args.unknown.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    test = [r["path"] for r in rows if r["split"] == "test"]
    images = {"bank": load_images(bank, size), "known": load_images(test, size), "unknown": load_images(unknown, size)}
    backbone, _ = create_backbone(meta["backbone"], len(meta["classes"]))
    untouched = Network(backbone, tuple(meta["preprocessing"]["mean"]), tuple(meta["preprocessing"]["std"])).eval()
    result = {"known": len(images["known"]), "unknown": len(unknown), "bank": len(bank),
              "knn_auroc_trained": round(knn_auroc(trained, images), 3),
              "knn_auroc_imagenet_untouched": round(knn_auroc(untouched, images), 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
