"""Each stage end to end, as `effitune.train` runs it, against the compute limit of a plain loop.

    python benchmarks/stage_end_to_end.py --source .gpu/fashion-mnist --size 224 --per-class 2000   # a GPU

A real `effitune.train` on Fashion-MNIST (upscaled to `--size`, `--unfreeze` stages, the GPU defaults
otherwise) records the wall time of the frozen-prefix caching pass (timed around effitune's own
`compute_activations`) and of each phase (training epochs, validation, checkpoints). The plain loop
at its compute limit is the same model on synthetic tensors already on the device (no loader): per
epoch it trains on every training image at train_speed.py's synthetic rate of that stage and
evaluates every validation image at the inference rate. Each effitune stage is charged the whole
caching pass (the train and validation activations both stages read), so "stage 1" and "stage 2"
below each count caching + that phase: a conservative reading of "each stage end to end".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import effitune
import effitune.training.run as run_module
from effitune.data.manifest import read_manifest
from effitune.datasets import export_fashion_mnist
from effitune.models.backbones import create_backbone
from effitune.models.network import Network

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import synchronize, synthetic_rates  # noqa: E402


def timed_caching(device: str) -> list[float]:
    """Wrap the compute_activations that train() calls; return the list its durations are appended to."""
    durations: list[float] = []
    original = run_module.compute_activations

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        synchronize(device)
        durations.append(time.perf_counter() - started)
        return out
    run_module.compute_activations = timed
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="Fashion-MNIST .gz files (default: Debian's)")
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--unfreeze", default="1")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/effitune-e2e"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    data = export_fashion_mnist(args.work / "data", per_class=args.per_class, seed=1,
                                **({"source": args.source} if args.source else {}))
    backbone, _ = create_backbone("tf_efficientnet_lite0", 10, pretrained=False)
    network = Network(backbone, backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"])
    synthetic = synthetic_rates(network, device, args.size, args.batch, 10, bf16=device == "cuda")
    caching = timed_caching(device)
    config = effitune.load_config(overrides={"data.image_size": args.size, "train.unfreeze": args.unfreeze,
                                             "train.batch_size": args.batch})
    result = effitune.train(data, out=args.work / "run", config=config, progress=False)
    rows = read_manifest(args.work / "run" / "manifest.csv")
    n_train, n_val = (sum(row["split"] == part for row in rows) for part in ("train", "val"))
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": args.size,
              "train_images": n_train, "val_images": n_val, "synthetic": synthetic,
              "caching_seconds": [round(s, 2) for s in caching], "test_accuracy": result.metrics["accuracy"],
              "wall_seconds": result.metrics["wall_seconds"], "stages": {}}
    cache_total = sum(caching)
    for phase in result.phases:
        stage = "stage1" if phase["phase"] == "stage1" else "stage2"
        plain = phase["epochs"] * (n_train / synthetic[stage] + n_val / synthetic["inference"])
        effitune_seconds = cache_total + phase["seconds"]
        report["stages"][phase["phase"]] = {
            "epochs": phase["epochs"], "phase_seconds": phase["seconds"], "with_caching_seconds": round(effitune_seconds, 2),
            "plain_loop_at_compute_limit_seconds": round(plain, 2),
            "effitune_rate_over_synthetic": round(plain / effitune_seconds, 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
