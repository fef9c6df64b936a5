"""CPU wall time to a test accuracy: effitune (defaults) vs a plain timm + PyTorch two-stage loop.

The plain loop is what a tutorial notebook does: decode + augment every image every epoch, run the
frozen backbone forward at every step, stage 1 (head, 8 epochs) then stage 2 (the last three stages +
conv head, BN frozen, LR x0.1, 12 epochs). Same images, same split (effitune's manifest), same
backbone and weights, same resolution, one run. effitune runs twice: its defaults (`unfreeze auto`:
depth 1, 2, 3 in turn while validation improves) and `--unfreeze 3` straight away (the depth the
plain loop uses; same split and resize-once cache, its own feature cache). `--size`, `--depth` and
`--skip-defaults` give the issue's own setting (224 px, the last block); `--extra-test` scores every
model on a further held-out folder; `--patience` sets effitune's stage-2 early stopping;
`--manifest` (an earlier run's manifest.csv) and `--skip-plain` time effitune again on the same split
alone, to set beside an earlier run's plain loop:

    python benchmarks/time_to_accuracy.py --data demo/fashion-mnist --out /tmp/tta
    python benchmarks/time_to_accuracy.py --data D --out /tmp/tta224 --size 224 --depth 1 --skip-defaults --extra-test E
    python benchmarks/time_to_accuracy.py --data D --manifest /tmp/tta224/run-unfreeze1/manifest.csv --skip-plain ...
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import effitune
from effitune.data.manifest import read_manifest
from effitune.models.backbones import create_backbone


class Files(Dataset):
    def __init__(self, rows, classes, transform):
        self.rows, self.transform = rows, transform
        self.index = {name: i for i, name in enumerate(classes)}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return self.transform(Image.open(row["path"]).convert("RGB")), self.index[row["label"]]


def labelled_files(folder: Path | None, classes: list[str]) -> list[dict]:
    """An extra held-out set (one sub-folder per class, disjoint from the data), as manifest-like rows."""
    if folder is None:
        return []
    return [{"path": str(path), "label": label, "split": "extra"} for label in classes
            for path in sorted((folder / label).iterdir())]


def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def plain_loop(rows, classes, size: int, epochs1: int, epochs2: int, depth: int, extra: list[dict]) -> dict:
    torch.manual_seed(0)
    model, _ = create_backbone("tf_efficientnet_lite0", len(classes))
    common = [v2.PILToTensor(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
              v2.CenterCrop(size)]
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    train_tf = v2.Compose(common + [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
                                    v2.RandomHorizontalFlip()] + normalize)
    eval_tf = v2.Compose(common + normalize)
    part = lambda name: [r for r in rows if r["split"] == name]  # noqa: E731
    train = DataLoader(Files(part("train"), classes, train_tf), batch_size=64, shuffle=True, num_workers=1)
    test = DataLoader(Files(part("test"), classes, eval_tf), batch_size=128, num_workers=1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    timings = {}

    def run_stage(name, modules, lr, epochs):
        model.requires_grad_(False)
        for module in modules:
            module.requires_grad_(True)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train))
        started = time.perf_counter()
        for _ in range(epochs):
            model.eval()  # frozen layers and all BatchNorm in inference mode
            for module in modules:
                module.train()
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
            for x, y in train:
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        timings[name] = round(time.perf_counter() - started, 1)

    run_stage("stage1", [model.get_classifier()], 3e-3, epochs1)
    run_stage("stage2", [*model.blocks[-depth:], model.conv_head, model.get_classifier()], 3e-4, epochs2)
    result = {"seconds": timings, "wall_seconds": round(sum(timings.values()), 1),
              "test_accuracy": accuracy(model, test)}
    if extra:
        result["extra_test_accuracy"] = accuracy(model, DataLoader(Files(extra, classes, eval_tf), batch_size=128,
                                                                   num_workers=1))
    return result


def bundle_accuracy(bundle: Path, extra: list[dict]) -> float:
    """The bundle's own preprocessing and class decision (no unknown rejection) on the extra held-out set."""
    predictor = effitune.load(bundle, backend="torch")
    index = {name: i for i, name in enumerate(predictor.classes)}
    correct = 0
    for start in range(0, len(extra), 256):
        part = extra[start:start + 256]
        logits = predictor.logits(np.stack([predictor.preprocess(row["path"]) for row in part]))
        correct += int((logits.argmax(1) == np.array([index[row["label"]] for row in part])).sum())
    return correct / len(extra)


def effitune_run(out: Path, **kwargs) -> tuple:
    """One `effitune.train` end to end (scan or manifest, caches, phases, calibration, report), timed."""
    started = time.perf_counter()
    run = effitune.train(out=out, progress=False, **kwargs)
    return run, {"wall_seconds": round(time.perf_counter() - started, 1), "test_accuracy": run.metrics["accuracy"],
                 "train_seconds": run.metrics["train_seconds"],  # scan, split, resize and feature caches, phases
                 "phases": {p["phase"]: p["seconds"] for p in run.phases}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/effitune-tta"))
    parser.add_argument("--epochs1", type=int, default=8)
    parser.add_argument("--epochs2", type=int, default=12)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--size", type=int, default=None,
                        help="training resolution for all runs (default: effitune's choice for the data)")
    parser.add_argument("--extra-test", type=Path, default=None,
                        help="a further held-out folder (one sub-folder per class, disjoint from --data) that "
                             "every model is also scored on: a tighter accuracy comparison than the test split")
    parser.add_argument("--patience", type=int, default=None,
                        help="effitune's stage-2 early-stopping patience (default: the config's, 3); "
                             "the plain loop's --epochs2 gives every epoch budget without early stopping")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="start effitune from this manifest.csv (an earlier run's split) instead of scanning --data")
    parser.add_argument("--skip-plain", action="store_true", help="time effitune only (no plain loop)")
    parser.add_argument("--skip-defaults", action="store_true",
                        help="run only effitune --unfreeze DEPTH and the plain loop (no `unfreeze auto` run)")
    args = parser.parse_args()
    os.environ.setdefault("EFFITUNE_CACHE", str(args.out / "cache"))
    overrides = {"data.image_size": args.size} if args.size else {}
    if args.patience is not None:
        overrides["train.stage2.patience"] = args.patience
    depth_overrides = {**overrides, "train.unfreeze": str(args.depth)}
    runs, bundles = {}, {}
    source = {"manifest": args.manifest} if args.manifest else {"data": args.data}
    if not args.skip_defaults:
        run, runs["effitune"] = effitune_run(args.out / "run", config=effitune.load_config(overrides=overrides),
                                             **source)
        bundles["effitune"], source = run.bundle, {"manifest": run.run_dir / "manifest.csv"}
    name = f"effitune_unfreeze{args.depth}"
    run, runs[name] = effitune_run(args.out / f"run-unfreeze{args.depth}",
                                   config=effitune.load_config(overrides=depth_overrides), **source)
    bundles[name] = run.bundle
    meta = json.loads((run.bundle / "effitune.json").read_text())
    rows = read_manifest(run.run_dir / "manifest.csv")
    extra = labelled_files(args.extra_test, meta["classes"])
    for name in runs if extra else ():
        runs[name]["extra_test_accuracy"] = bundle_accuracy(bundles[name], extra)
    result = {"machine": f"{os.cpu_count()} cores", "size": meta["preprocessing"]["size"], **runs,
              "extra_test_images": len(extra)}
    if not args.skip_plain:
        result["plain_loop"] = plain_loop(rows, meta["classes"], meta["preprocessing"]["size"], args.epochs1,
                                          args.epochs2, args.depth, extra)
        for name in runs:
            result[f"plain_over_{name}_wall"] = round(result["plain_loop"]["wall_seconds"] / result[name]["wall_seconds"], 2)
    print(json.dumps(result, indent=1))
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
