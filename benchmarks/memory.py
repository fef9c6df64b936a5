"""Memory vs dataset size: the frozen-prefix cache stays on disk, training RSS stays flat.

    python benchmarks/memory.py --sizes 10000 30000 100000   # --size 64 --views 1 --epochs 1 --threads 1

Real images: Fashion-MNIST from Debian's `dataset-fashion-mnist` (train + test parts, 70,000 images),
written once as PNGs under `--work`; 2,000 images of the test part are a fixed validation split and the
training pool is the other 68,000 plus horizontally flipped copies of 32,000 of them (100,000). Training
set N is the first N images of that pool (originals first, shuffled with a fixed seed).

For every N, each step runs in a fresh subprocess of its own, through effitune's own code:
1. `cache`: `ImageCache.build` over the N + 2,000 PNG paths (resize-once uint8 cache, one per N);
2. `features`: `compute_activations` for train (pooled + the depth-1 cut, `--views` views) and val,
   called as `training.run._cached_inputs` calls it;
3. `train`: `_cached_inputs` (which reopens the files as memory maps), then `_fit_phase` for stage 1
   (head on pooled features) and stage 2 depth 1 (last stage on cached activations), `--epochs` each:
   the Lightning path of `effitune.train` (PhaseModule, ActivationDataset loaders, checkpoints, CSV log);
4. `stage1_mmap`: stage 1 again, with ActivationDataset indexing the memory map as it did before it
   switched to positional reads (`rowio.npy_file` patched to find no file), for the side-by-side.

Memory: a thread samples /proc/self/status every 20 ms (VmRSS, and its parts RssAnon: private heap,
RssFile: pages of memory-mapped files, RssShmem) plus the summed VmRSS of child processes (DataLoader
workers, decode pool); peaks are kept per segment. RssFile counts page-cache pages of mapped files the
process has touched: the kernel can drop them at any time, but `ps`, `top` and batch schedulers that
police RSS count them, so they are reported, not hidden.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

VAL_SIZE = 2_000
POOL_SIZE = 100_000
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


# --- data --------------------------------------------------------------------------------------

def prepare_images(work: Path) -> Path:
    """PNG files and the fixed order: work/png/<class>/<o|f><index>.png, work/order.json."""
    from PIL import Image

    from effitune.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    order_path = work / "order.json"
    if order_path.is_file():
        return order_path
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    images, labels = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
    rng = np.random.default_rng(0)
    val = 60_000 + np.sort(rng.choice(10_000, VAL_SIZE, replace=False))
    rest = rng.permutation(np.setdiff1d(np.arange(len(images)), val))  # 68,000 originals, shuffled
    flipped = rest[:POOL_SIZE - len(rest)]  # 32,000 of them again, mirrored

    def write(kind: str, index: int) -> dict:
        label = FASHION_MNIST_CLASSES[labels[index]]
        path = work / "png" / label / f"{kind}{index:05d}.png"
        pixels = images[index] if kind == "o" else images[index][:, ::-1]
        Image.fromarray(np.ascontiguousarray(pixels), "L").save(path)
        return {"path": str(path), "label": label}

    for label in FASHION_MNIST_CLASSES:
        (work / "png" / label).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    order = {"val": [write("o", int(i)) for i in val],
             "pool": [write("o", int(i)) for i in rest] + [write("f", int(i)) for i in flipped]}
    order_path.write_text(json.dumps(order))
    print(f"wrote {len(order['val']) + len(order['pool'])} PNGs in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return order_path


def rows_for(work: Path, n: int) -> list[dict]:
    order = json.loads((work / "order.json").read_text())
    return ([{**r, "split": "train"} for r in order["pool"][:n]] + [{**r, "split": "val"} for r in order["val"]])


# --- memory sampling ---------------------------------------------------------------------------

def _status(pid: str = "self") -> dict[str, int]:
    """The FIELDS of /proc/<pid>/status in KiB (empty when the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as stream:
            for line in stream:
                key, _, value = line.partition(":")
                if key in FIELDS or key == "VmHWM":
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _children() -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]
    except ImportError:
        pids = []
        for task in Path("/proc/self/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids


class Sampler:
    """Peak of each field (and of the children's summed VmRSS) per named segment, in MiB."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.segments, self.current = interval, {}, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, name: str) -> None:
        with self._lock:
            self.current = name
            self.segments[name] = {"start": self._sample(), "peak": {}, "seconds": time.perf_counter()}
        if not self._thread.is_alive():
            self._thread.start()

    def _sample(self) -> dict[str, float]:
        now = {k: v / 1024 for k, v in _status().items() if k in FIELDS}
        now["children_VmRSS"] = sum(_status(str(pid)).get("VmRSS", 0) for pid in _children()) / 1024
        return now

    def _record(self) -> None:
        now = self._sample()
        with self._lock:
            if self.current is None:
                return
            peak = self.segments[self.current]["peak"]
            for key, value in now.items():
                peak[key] = max(peak.get(key, 0.0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def end(self) -> dict:
        self._record()
        with self._lock:
            segment = self.segments[self.current]
            segment["seconds"] = round(time.perf_counter() - segment["seconds"], 1)
            segment["end"] = self._sample()
            self.current = None
        return segment

    def finish(self) -> dict:
        self._stop.set()
        rounded = {}
        for name, segment in self.segments.items():
            rounded[name] = {k: ({f: round(x, 1) for f, x in v.items()} if isinstance(v, dict) else v)
                             for k, v in segment.items()}
        return {"segments": rounded, "VmHWM_mib": round(_status().get("VmHWM", 0) / 1024, 1)}


def folder_mib(folder: Path, pattern: str = "*.npy") -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob(pattern)) / 2**20, 1)


# --- the steps, each run in a child process of its own --------------------------------------------

def _setup(args, n: int):
    """Config, run paths, network and datamodule as `effitune.train` builds them."""
    from effitune.config import Config
    from effitune.data.cache import ImageCache
    from effitune.data.datamodule import ImageDataModule
    from effitune.training import run

    run.quiet_lightning()
    config = Config()
    config.data.image_size, config.data.seed = args.size, 0
    config.train.batch_size, config.train.cache_views = args.batch, args.views
    config.train.stage1.epochs = config.train.stage2.epochs = args.epochs
    config.train.stage2.lr = config.train.stage1.lr * config.train.lr_factor
    rows = rows_for(args.work, n)
    classes = sorted({row["label"] for row in rows})
    cache = ImageCache(args.work / f"cache{n}", args.size)
    keys = json.loads((args.work / f"keys{n}.json").read_text())
    keys = cache.build([r["path"] for r in rows], keys)  # what `train` does: every file known, none decoded
    network, _ = run.network_for(config, len(classes))
    datamodule = ImageDataModule(rows, keys, classes, cache, batch_size=args.batch, augment=config.data.augment,
                                 workers=config.data.workers, seed=0)
    paths = run.RunPaths(args.work / f"run{n}")
    return config, network, datamodule, paths


def step_cache(args, n: int, sampler: Sampler) -> dict:
    from effitune.data.cache import ImageCache

    rows = rows_for(args.work, n)
    sampler.start("build")
    cache = ImageCache(args.work / f"cache{n}", args.size)
    keys = cache.build([r["path"] for r in rows])
    segment = sampler.end()
    (args.work / f"keys{n}.json").write_text(json.dumps(keys))
    return {"images": len(rows), "images_per_s": round(len(rows) / segment["seconds"], 1),
            "disk_mib": folder_mib(cache.folder)}


def step_features(args, n: int, sampler: Sampler) -> dict:
    from effitune.training.features import compute_activations

    sampler.start("setup")
    config, network, datamodule, paths = _setup(args, n)
    sampler.end()
    # as `run._cached_inputs` calls it on a CPU
    sampler.start("train_activations")
    compute_activations(network, datamodule.dataset("train", augment=True), [1], paths.features / "train",
                        views=args.views, workers=datamodule.workers)
    train = sampler.end()
    sampler.start("val_activations")
    compute_activations(network, datamodule.dataset("val"), [1], paths.features / "val", views=1,
                        workers=datamodule.workers)
    sampler.end()
    return {"images_per_s": round(args.views * n / train["seconds"], 1), "workers": datamodule.workers,
            "disk_mib": {p.stem: round(p.stat().st_size / 2**20, 1)
                         for p in sorted((paths.features / "train").glob("*.npy"))}}


def step_train(args, n: int, sampler: Sampler) -> dict:
    from effitune.training import run
    from effitune.training.stages import Phase

    sampler.start("setup")
    config, network, datamodule, paths = _setup(args, n)
    inputs = run._cached_inputs(network, datamodule, config, paths, [1])  # reopens the files: memory maps
    sampler.end()
    report = {"mapped": {k: type(v).__name__ for k, v in inputs["train"].items()}}
    for phase in (Phase(None), Phase(1)):
        sampler.start(phase.name)
        result = run._fit_phase(network, phase, datamodule, inputs, config, paths, progress=False)
        segment = sampler.end()
        report[phase.name] = {"images_per_s": round(args.epochs * n / segment["seconds"], 1),
                              "val_acc": round(result["val_acc"], 4), "inputs": result["inputs"]}
    return report


def step_stage1_mmap(args, n: int, sampler: Sampler) -> dict:
    """Stage 1 with the old read path: rows gathered through the memory map (`self.activations[view, rows]`)."""
    from effitune.data import datamodule as data_module
    from effitune.training import run
    from effitune.training.stages import Phase

    data_module.rowio.npy_file = lambda array: None
    sampler.start("setup")
    config, network, datamodule, paths = _setup(args, n)
    paths = run.RunPaths(args.work / f"run{n}-mmap")  # its own checkpoints, the same activation files
    paths.root.mkdir(exist_ok=True)
    if not paths.features.exists():
        paths.features.symlink_to(args.work / f"run{n}" / "features")
    inputs = run._cached_inputs(network, datamodule, config, paths, [1])
    sampler.end()
    sampler.start("stage1_mmap")
    result = run._fit_phase(network, Phase(None), datamodule, inputs, config, paths, progress=False)
    segment = sampler.end()
    return {"stage1_mmap": {"images_per_s": round(args.epochs * n / segment["seconds"], 1),
                            "val_acc": round(result["val_acc"], 4), "inputs": result["inputs"]}}


STEPS = {"cache": step_cache, "features": step_features, "train": step_train, "stage1_mmap": step_stage1_mmap}


def child(args) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    sampler = Sampler()
    sampler.start("imports")
    import torch  # noqa: F401 - the baseline every step pays

    import effitune.training.run  # noqa: F401
    sampler.end()
    torch.set_num_threads(args.threads)
    figures = STEPS[args.child](args, args.n, sampler)
    print(json.dumps({"figures": figures, **sampler.finish()}))


def run_child(args, step: str, n: int, log) -> dict:
    command = [sys.executable, __file__, "--child", step, "--n", str(n), "--work", str(args.work),
               "--size", str(args.size), "--views", str(args.views), "--epochs", str(args.epochs),
               "--batch", str(args.batch), "--threads", str(args.threads)]
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


# --- the table ---------------------------------------------------------------------------------

def summarize(results: dict, sizes: list[int]) -> list[dict]:
    """One row per (step, N): peaks of the step's own segments, and the process's start after imports."""
    wanted = {"cache": ["build"], "features": ["train_activations"], "train": ["stage1", "stage2-depth1"],
              "stage1_mmap": ["stage1_mmap"]}
    rows = []
    for step, segments in wanted.items():
        for name in segments:
            for n in sizes:
                r = results[n][step]
                seg = r["segments"][name]
                figures = r["figures"]
                rate = figures[name]["images_per_s"] if name in figures else figures["images_per_s"]
                disk = (figures["disk_mib"] if step == "cache" else
                        round(sum(figures["disk_mib"].values()), 1) if step == "features" else
                        results[n]["features"]["figures"]["disk_mib"]["depth1" if "depth" in name else "pooled"])
                rows.append({"step": name, "N": n, "disk_mib": disk, "images_per_s": rate,
                             "seconds": seg["seconds"], "rss_after_imports": r["segments"]["imports"]["end"]["VmRSS"],
                             "peak_VmRSS": seg["peak"]["VmRSS"], "peak_RssAnon": seg["peak"]["RssAnon"],
                             "peak_RssFile": seg["peak"]["RssFile"], "peak_children": seg["peak"]["children_VmRSS"],
                             "VmHWM": r["VmHWM_mib"]})
    return rows


def print_table(rows: list[dict], sizes: list[int]) -> None:
    head = ("step", "N", "on disk MiB", "img/s", "s", "RSS after imports", "peak VmRSS", "peak RssAnon",
            "peak RssFile", "peak children", "VmHWM")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in ("step", "N", "disk_mib", "images_per_s", "seconds",
                                                     "rss_after_imports", "peak_VmRSS", "peak_RssAnon",
                                                     "peak_RssFile", "peak_children", "VmHWM")) + " |")
    small, large = min(sizes), max(sizes)
    print(f"\nratios N={large} / N={small}:")
    for name in dict.fromkeys(r["step"] for r in rows):
        a = next(r for r in rows if r["step"] == name and r["N"] == small)
        b = next(r for r in rows if r["step"] == name and r["N"] == large)
        ratio = lambda k: round(b[k] / a[k], 2) if a[k] else None  # noqa: E731
        print(f"  {name}: disk x{ratio('disk_mib')}, peak VmRSS x{ratio('peak_VmRSS')}, "
              f"peak RssAnon x{ratio('peak_RssAnon')}, peak RssFile x{ratio('peak_RssFile')}, "
              f"peak children x{ratio('peak_children')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--size", type=int, default=64, help="training resolution (px)")
    parser.add_argument("--views", type=int, default=1, help="cached views of each training image")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each training phase")
    parser.add_argument("--batch", type=int, default=64, help="batch size (effitune's CPU default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads in each step (ONNX Runtime's caching pass uses every core)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mem-bench"))
    parser.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if max(args.sizes) > POOL_SIZE:
        parser.error(f"at most {POOL_SIZE} training images")
    args.work.mkdir(parents=True, exist_ok=True)
    prepare_images(args.work)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
              "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()
                                                            if k not in ("child", "n")},
              "load_average_start": os.getloadavg(), "results": {}}
    with open(args.work / "children.log", "a") as log:
        for n in args.sizes:
            report["results"][n] = {}
            if "cache" in args.steps:  # every measurement from scratch: no cache, activations or checkpoints
                for name in (f"cache{n}", f"run{n}", f"run{n}-mmap"):
                    shutil.rmtree(args.work / name, ignore_errors=True)
            for step in args.steps:
                out = run_child(args, step, n, log)
                report["results"][n][step] = out
                print(json.dumps({"N": n, "step": step, "wall_s": out["wall_s"], "figures": out["figures"]}),
                      file=sys.stderr, flush=True)
    report["load_average_end"] = os.getloadavg()
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if set(args.steps) == set(STEPS) and len(args.sizes) > 1:
        rows = summarize(report["results"], args.sizes)
        print()
        print_table(rows, args.sizes)


if __name__ == "__main__":
    main()
