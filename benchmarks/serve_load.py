"""Serving under load: concurrent clients against `effitune serve` on 127.0.0.1, with and without batching.

    python benchmarks/serve_load.py --clients 16 --seconds 30 --windows 0 5 --repeats 3

For each batch window a fresh `effitune serve` subprocess starts (so its memory is its own); after /health
answers and a short warm-up its VmRSS is read from /proc, then every client POSTs one image and sends the
next as soon as the answer arrives (closed loop) for the given seconds; then VmRSS and VmHWM (peak) are
read again. Reported: requests/s, p50/p99 latency seen by the client, errors (any non-200 or transport
failure: must be 0). The bundle is the demo's trained one when /tmp/demo1/run/model exists (copied),
else a random-init tf_efficientnet_lite0 at 96 px; the images are Fashion-MNIST PNGs when the demo's
export exists, else generated PNGs. The clients share the machine with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

DEMO_BUNDLE = Path("/tmp/demo1/run/model")
DEMO_IMAGES = Path("/tmp/demo1/fashion-mnist")


def prepare_bundle(folder: Path) -> tuple[Path, str]:
    if (DEMO_BUNDLE / "effitune.json").is_file():
        shutil.copytree(DEMO_BUNDLE, folder)
        return folder, f"trained demo bundle (copy of {DEMO_BUNDLE})"
    import torch

    from effitune.bundle import save_bundle
    from effitune.models.backbones import create_backbone
    from effitune.models.network import Network

    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", 10, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    meta = {"classes": [f"c{i}" for i in range(10)], "backbone": "tf_efficientnet_lite0",
            "preprocessing": {"size": 96, "mean": [0.5] * 3, "std": [0.5] * 3}}
    save_bundle(folder, network.state_dict(), meta)
    return folder, "random-init tf_efficientnet_lite0, 10 classes, 96 px (no trained bundle here)"


def load_images(count: int = 64) -> tuple[list[bytes], str]:
    if DEMO_IMAGES.is_dir():
        paths = sorted(DEMO_IMAGES.rglob("*.png"))[::97][:count]
        if paths:
            return [p.read_bytes() for p in paths], f"{len(paths)} Fashion-MNIST PNGs (28x28) from {DEMO_IMAGES}"
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return blobs, f"{count} generated 160x120 PNGs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc (no psutil needed)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def start_server(bundle: Path, port: int, workers: int, window_ms: float, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "effitune.cli", "serve", str(bundle), "--port", str(port),
               "--workers", str(workers), "--batch-window-ms", str(window_ms)]
    command += ["--threads", str(threads)] if threads else []
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not answer /health within 120 s")


async def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    latencies, errors, stop = [], [], time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one_client(index: int) -> None:
            sent = index
            while time.perf_counter() < stop:
                blob = images[sent % len(images)]
                sent += clients
                started = time.perf_counter()
                try:
                    response = await client.post(url, files=[("files", ("image.png", blob, "image/png"))])
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                except httpx.HTTPError as error:
                    errors.append(repr(error))
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * quantiles[49], 1), "p99_ms": round(1000 * quantiles[98], 1),
            "errors": len(errors), "first_errors": errors[:3]}


def run_one(bundle: Path, images: list[bytes], clients: int, seconds: float, workers: int, window_ms: float,
            threads: int) -> dict:
    port = free_port()
    server = start_server(bundle, port, workers, window_ms, threads)
    try:
        url = f"http://127.0.0.1:{port}/predict?top_k=3"
        asyncio.run(load(url, images, clients, min(3.0, seconds)))  # warm-up: allocator and thread pools
        before = memory_kib(server.pid)
        result = asyncio.run(load(url, images, clients, seconds))
        after = memory_kib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return {"batch_window_ms": window_ms, "workers": workers, "threads": threads or "default", "clients": clients,
            **result, "load_average": os.getloadavg()[0],
            "rss_before_mib": round(before["VmRSS"] / 1024, 1), "rss_after_mib": round(after["VmRSS"] / 1024, 1),
            "peak_rss_mib": round(after["VmHWM"] / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--windows", type=float, nargs="+", default=[0, 5], help="batch windows in ms")
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="torch threads (0: serve's default)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all settings, interleaved")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        bundle, bundle_note = prepare_bundle(Path(scratch) / "model")
        images, image_note = load_images()
        print(f"# {bundle_note}; {image_note}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}", file=sys.stderr)
        rows = []
        settings = [(t, w, b) for t in args.threads for w in args.workers for b in args.windows]
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits every setting alike
            for threads, workers, window in settings:
                row = run_one(bundle, images, args.clients, args.seconds, workers, window, threads)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| workers | torch threads | batch window | requests/s | p50 ms | p99 ms | errors "
          "| RSS before -> after (peak) MiB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['threads']} | {row['batch_window_ms']:g} ms | {row['requests_per_s']} | "
              f"{row['p50_ms']} | "
              f"{row['p99_ms']} | {row['errors']} | {row['rss_before_mib']} -> {row['rss_after_mib']} "
              f"({row['peak_rss_mib']}) | {row['load_average']:.1f} |")


if __name__ == "__main__":
    main()
