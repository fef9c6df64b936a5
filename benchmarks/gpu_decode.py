"""Should nvjpeg build the resize-once cache on a GPU? Measure before deciding (issue 25).

effitune decodes every photo once, on the CPU: Pillow with a DCT-domain reduction (`draft`) to at
least 2 x the model size, then the one resize (`images.load_for_model`). nvjpeg
(`torchvision.io.decode_jpeg(..., device="cuda")`) decodes whole images on the GPU and would need a
GPU resize, so its pixels differ from the CPU path that prediction and serving use. This script
measures both on the same generated phone-sized JPEGs, side by side in one run:

  cpu      load_for_model on every core (a process pool): photos/s
  nvjpeg   decode_jpeg on `--device` in batches, then antialiased bicubic resize + centre crop
           on the device (torch.nn.functional.interpolate): photos/s, and the largest and mean
           pixel difference from the CPU path

With `--device cpu` the nvjpeg column runs torchvision's CPU decoder (a check that the script works
where there is no GPU, not a GPU figure).

    python3 benchmarks/gpu_decode.py [--device cuda] [--n 96] [--size 224] [--megapixels 12] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from effitune.data.images import load_for_model

_SIDES = {12: (4000, 3000), 2: (1632, 1224), 0.75: (1000, 750)}


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """`n` photo-like JPEGs (smooth colour fields, edges and sensor noise), quality 90."""
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(n):
        phase = rng.uniform(0, 6.28, 3)
        field = np.stack([127 + 90 * np.sin(x / (300 + 90 * c) + y / (410 + 50 * c) + phase[c]) for c in range(3)], -1)
        field[(x - width * rng.uniform(0.2, 0.8)) ** 2 + (y - height * rng.uniform(0.2, 0.8)) ** 2
              < (min(size) * rng.uniform(0.1, 0.3)) ** 2] *= 0.5
        field += rng.normal(0, 5, field.shape).astype(np.float32)
        path = folder / f"{index:03d}.jpg"
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _cpu_one(job: tuple[str, int]) -> np.ndarray:
    path, size = job
    return load_for_model(path, size)


def cpu_decode(paths: list[Path], size: int, workers: int) -> tuple[float, np.ndarray]:
    began = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(_cpu_one, [(str(p), size) for p in paths], chunksize=4))
    return time.perf_counter() - began, np.stack(images)


def device_decode(paths: list[Path], size: int, device: str, batch: int) -> tuple[float, np.ndarray]:
    """decode_jpeg on `device`, then the shorter side to `size` (antialiased bicubic) and a centre crop."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    out = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    began = time.perf_counter()
    for start in range(0, len(paths), batch):
        data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths[start:start + batch]]
        decoded = decode_jpeg(data, device=device)
        for image in decoded:  # (3, H, W) uint8
            height, width = image.shape[1:]
            scale = size / min(height, width)
            new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
            resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                                    align_corners=False)[0]
            top, left = (new_h - size) // 2, (new_w - size) // 2
            out.append(resized[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8))
    stacked = torch.stack(out).permute(0, 2, 3, 1).cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began, stacked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--megapixels", type=float, default=12, choices=sorted(_SIDES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import torchvision  # noqa: F401 - the nvjpeg decoder lives there
    except ImportError:
        raise SystemExit("torchvision is not installed here: nvjpeg decoding (torchvision.io.decode_jpeg) "
                         "cannot be measured. pip install torchvision==0.29.1")
    folder = Path(tempfile.mkdtemp(prefix="effitune-jpegs-"))
    paths = make_jpegs(folder, args.n, _SIDES[args.megapixels])
    cpu_times, device_times = [], []
    for _ in range(args.rounds):  # alternated, so neither side gets the warm page cache alone
        seconds, cpu_images = cpu_decode(paths, args.size, args.workers)
        cpu_times.append(seconds)
        seconds, device_images = device_decode(paths, args.size, args.device, args.batch)
        device_times.append(seconds)
    difference = np.abs(cpu_images.astype(np.int16) - device_images.astype(np.int16))
    cpu_s, device_s = statistics.median(cpu_times), statistics.median(device_times)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "device": args.device, "photos": args.n, "megapixels": args.megapixels, "size": args.size,
              "cpu_workers": args.workers, "cpu_photos_per_s": round(args.n / cpu_s, 1),
              "device_photos_per_s": round(args.n / device_s, 1),
              "device_over_cpu": round(cpu_s / device_s, 2),
              "pixel_difference": {"max": int(difference.max()), "p99": float(np.percentile(difference, 99)),
                                   "mean": round(float(difference.mean()), 3)}}
    if args.device.startswith("cuda"):
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
