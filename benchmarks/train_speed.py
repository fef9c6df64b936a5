"""Training throughput per stage: effitune end to end vs the same model on synthetic tensors.

    python benchmarks/train_speed.py --device cuda --size 224 --batch 256 --images 20000   # a GPU
    python benchmarks/train_speed.py --device cpu --size 224 --batch 32 --images 256       # this laptop

Synthetic tensors (already on the device, no loader) give the compute limit of each stage:
  stage 1  a plain loop runs the frozen backbone forward (no grad) and trains the head;
  stage 2  frozen prefix forward (no grad) + last stage, conv head and head trained (BN frozen);
  full     every layer trained.
effitune end to end runs its real code on real files (resize-once cache -> loader -> model):
  cache    frozen-prefix caching pass (one forward per image, all boundaries captured);
  stage 1  head trained on the cached pooled features (Lightning loop, cached loader);
  stage 2  last stage trained on cached activations (Lightning loop, cached loader);
  images   stage 2 trained from images (uncached path: uint8 cache -> loader -> batched augment);
  loader   uint8 images/s onto the device alone: threads into pinned memory (effitune's GPU reader)
           vs a DataLoader with worker processes (what the caching pass used before).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from effitune.data.cache import ImageCache
from effitune.data.batches import ImageBatches
from effitune.data.datamodule import ActivationDataset, ImageDataModule, ImageDataset, collate_batched
from effitune.data.transforms import BatchAugment
from effitune.models.backbones import create_backbone, num_stages
from effitune.models.network import Network
from effitune.training.features import compute_activations
from effitune.training.module import Optimization, PhaseModule
from effitune.training.stages import Phase, freeze_for, set_train_mode


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rate(step, batch: int, device: str, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        samples.append(batch * steps / (time.perf_counter() - started))
    return statistics.median(samples)


def synthetic_rates(network: Network, device: str, size: int, batch: int, steps: int, bf16: bool) -> dict:
    network = network.to(device).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    loss_fn = torch.nn.CrossEntropyLoss()
    rates = {}

    @torch.inference_mode()
    def infer():
        with autocast:
            network(images)
    network.eval()
    rates["inference"] = timed_rate(infer, batch, device, steps)

    def trainer(phase: Phase):
        params = freeze_for(network, phase)
        set_train_mode(network, phase)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        depth = phase.depth

        def step():
            with autocast:
                if depth is None:
                    with torch.no_grad():
                        features = network.features(images)
                    logits = network.head(features)
                elif depth < 0:
                    logits = network(images)
                else:
                    with torch.no_grad():
                        h = network.prefix(images, depth)
                    logits = network.tail(h, depth)
                loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step
    rates["stage1"] = timed_rate(trainer(Phase(None)), batch, device, steps)
    rates["stage2"] = timed_rate(trainer(Phase(1)), batch, device, steps)
    rates["full"] = timed_rate(trainer(Phase(-1)), batch, device, max(2, steps // 2))
    network.to("cpu")
    return rates


def make_images(folder: Path, n: int, size: int) -> list[str]:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 4, 4, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.is_file():
            img = Image.fromarray(base[i % 32]).resize((size * 5 // 4, size), Image.Resampling.BILINEAR)
            img.save(path, quality=85)
        paths.append(str(path))
    return paths


def lightning_rate(module, loader, device: str, epochs: int = 3) -> float:
    """Images/s of a real Lightning fit (the last epoch, after warm-up)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, pl_module):
            synchronize(device)
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    clock = Clock()
    trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        precision="bf16-mixed" if device.startswith("cuda") else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    return len(loader.dataset) / min(clock.times[1:] or clock.times)


def loader_rates(dataset: ImageDataset, batch: int, device: str, workers: int) -> dict:
    """uint8 images/s onto the device: effitune's threaded reader vs a DataLoader with worker processes."""
    def rate(loader) -> float:
        for images, _ in loader:  # warm-up: page cache, pinned blocks, worker start
            images.to(device, non_blocking=True)
        synchronize(device)
        started, count = time.perf_counter(), 0
        for images, _ in loader:
            images.to(device, non_blocking=True)
            count += len(images)
        synchronize(device)
        return count / (time.perf_counter() - started)
    dataset = ImageDataset(dataset.cache, dataset.keys, dataset.labels)  # as cached: augmented on the device
    threads = ImageBatches(dataset, batch, shuffle=True, threads=max(1, workers))
    processes = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                            pin_memory=device.startswith("cuda"), collate_fn=collate_batched,
                                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return {"loader_threads": rate(threads), "loader_workers": rate(processes)}


def augment_rates(augment: BatchAugment, dataset: ImageDataset, batch: int, device: str) -> dict:
    """Images/s of the batched GPU augmentation alone: as training calls it, with per-image seeds as the
    caching pass does, and a candidate with one grid_sample in float16 instead of roi_align in float32."""
    images = next(iter(ImageBatches(ImageDataset(dataset.cache, dataset.keys, dataset.labels), batch)))[0]
    images = images.to(device)
    seeds = list(range(batch))
    return {"augment": timed_rate(lambda: augment(images), batch, device, 10),
            "augment_seeded": timed_rate(lambda: augment(images, seeds=seeds), batch, device, 10),
            "augment_grid_fp16": timed_rate(lambda: grid_augment(augment, images), batch, device, 10)}


def grid_augment(augment: BatchAugment, images: torch.Tensor, dtype=torch.float16) -> torch.Tensor:
    """BatchAugment's crop + flip + jitter as one affine grid_sample (bilinear, no antialiasing) in `dtype`."""
    n, _, height, width = images.shape
    u = torch.rand(n, 7, device=images.device)
    area = augment.min_scale + (1 - augment.min_scale) * u[:, 0]
    log_ratio = (2 * u[:, 1] - 1) * augment.max_log_ratio
    scale_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    scale_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre_x = (u[:, 2] * (1 - scale_w) + scale_w / 2) * 2 - 1
    centre_y = (u[:, 3] * (1 - scale_h) + scale_h / 2) * 2 - 1
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(area)
    theta = torch.stack([torch.stack([scale_w * sign, zero, centre_x], 1),
                         torch.stack([zero, scale_h, centre_y], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, 3, augment.size, augment.size], align_corners=False)
    out = torch.nn.functional.grid_sample(images.to(dtype), grid.to(dtype), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    brightness = (1 + augment.jitter * (2 * u[:, 5] - 1)).view(n, 1, 1, 1)
    contrast = (1 + augment.jitter * (2 * u[:, 6] - 1)).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (((out - mean) * contrast + mean) * brightness).clamp_(0, 255).to(torch.uint8)


def effitune_rates(network: Network, device: str, size: int, batch: int, n_images: int, work: Path,
                   workers: int) -> dict:
    paths = make_images(work / "images", n_images, size)
    cache = ImageCache(work / "cache", size)
    keys = cache.build(paths)
    labels = np.arange(n_images) % 10
    rows = [{"path": p, "label": f"c{l}", "split": "train"} for p, l in zip(paths, labels)]
    classes = sorted({r["label"] for r in rows})
    datamodule = ImageDataModule(rows, keys, classes, cache, batch_size=batch, augment="standard",
                                 workers=workers, device_augment=device.startswith("cuda"))
    augment = BatchAugment.from_recipe("standard", size) if device.startswith("cuda") else None
    rates = {}
    dataset = datamodule.dataset("train", augment=augment is None)
    first = min(n_images, 4 * batch)
    warm = ImageDataset(dataset.cache, dataset.keys[:first], dataset.labels[:first], dataset.transform)
    rates.update(loader_rates(dataset, batch, device, workers))
    compute_activations(network, warm, [1], work / "warmup", views=1, batch_size=batch, device=device,
                        workers=workers, batch_augment=augment)  # cudnn autotuning, first-call costs
    synchronize(device)
    started = time.perf_counter()
    cached = compute_activations(network, dataset, [1], work / "features", views=2, batch_size=batch,
                                 device=device, workers=workers, batch_augment=augment)
    synchronize(device)
    rates["cache"] = 2 * n_images / (time.perf_counter() - started)  # one plain + one augmented view
    started = time.perf_counter()
    compute_activations(network, dataset, [1], work / "features-plain", views=1, batch_size=batch, device=device,
                        workers=workers, batch_augment=augment)
    synchronize(device)
    rates["cache_plain"] = n_images / (time.perf_counter() - started)  # view 0 alone: no augmentation
    if augment is not None:
        rates.update(augment_rates(augment, dataset, batch, device))
    network.to("cpu")
    optimization = Optimization(lr=1e-4, weight_decay=0.0, epochs=2, steps_per_epoch=max(1, n_images // batch))
    for stage, phase, inputs, name in (("stage1", Phase(None), "features", "pooled"),
                                       ("stage2", Phase(1), "prefix", "depth1")):
        data = ActivationDataset(cached[name], labels)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, collate_fn=collate_batched)
        rates[stage] = lightning_rate(PhaseModule(network, phase, inputs, optimization), loader, device)
    module = PhaseModule(network, Phase(1), "images", optimization, batch_augment=augment)
    rates["stage2_from_images"] = lightning_rate(module, datamodule.train_dataloader(), device)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "effitune-speed")
    parser.add_argument("--skip-effitune", action="store_true")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    backbone, source = create_backbone(args.model, 10, pretrained=False)
    cfg = backbone.pretrained_cfg
    network = Network(backbone, cfg["mean"], cfg["std"])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    report = {"device": device_name, "cores": os.cpu_count(), "torch": torch.__version__, "model": args.model,
              "size": args.size, "batch": args.batch, "stages": num_stages(backbone)}
    report["synthetic"] = synthetic_rates(network, args.device, args.size, args.batch, args.steps,
                                          bf16=args.device.startswith("cuda"))
    print(json.dumps(report, indent=1), flush=True)
    if not args.skip_effitune:
        report["effitune"] = effitune_rates(network, args.device, args.size, args.batch, args.images, args.work,
                                            args.workers)
        report["effitune_over_synthetic"] = {
            k: round(report["effitune"][k] / report["synthetic"][s], 2)
            for k, s in (("stage1", "stage1"), ("stage2", "stage2"), ("stage2_from_images", "stage2"),
                         ("cache", "inference"))}
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    sys.exit(main())
