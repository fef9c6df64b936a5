"""`effitune predict BUNDLE FOLDER --out predictions.csv` on a CPU: PyTorch eager vs ONNX Runtime.

Until session 7 a bundle without model.onnx (what `effitune train` writes) predicted in PyTorch eager;
ONNX Runtime needed `effitune export` first. Now a stream of `Predictor.long_pass` (256) images or
more runs in ONNX Runtime from the bundle itself (exported in memory, parity-checked on its first
batch). This script times the ways side by side, interleaved over rounds, through the same
`predict_to_file` the CLI calls (decoding every image from disk), and checks the labels agree:

  torch       the bundle as `train` writes it, PyTorch eager (the old behaviour: long_pass set out of reach)
  in-memory   the same bundle now (export in memory + parity check counted in the time)
  exported    a copy after `effitune export` (model.onnx on disk; the export itself not counted)

    .venv/bin/python benchmarks/predict_folder.py BUNDLE FOLDER [--limit 1000] [--rounds 3] [--photo 500x375]

`--photo WxH` re-encodes the images as JPEGs of that size first (quality 90), so that decoding and
resizing cost what a camera or web photo costs rather than what a small PNG does.
"""
from __future__ import annotations

import argparse
import csv
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from effitune.batch_predict import predict_to_file
from effitune.data.images import IMAGE_EXTENSIONS
from effitune.export.onnx import export_onnx
from effitune.predict import Predictor, load


def list_images(folder: Path, limit: int) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and
                   not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return paths[:limit]


def as_photos(paths: list[Path], size: tuple[int, int], root: Path) -> list[Path]:
    """Each image resized to `size` and saved as a JPEG under `root` (the class folder kept)."""
    out = []
    for path in paths:
        target = root / path.parent.name / f"{path.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize(size, Image.BILINEAR).save(target, quality=90)
        out.append(target)
    return out


def predict_once(bundle: Path, paths: list[Path], out: Path, old: bool) -> tuple[float, list[str]]:
    started = time.perf_counter()
    predictor = load(bundle)
    if old:
        predictor.long_pass = 10 ** 12  # never long enough: PyTorch eager, as before
    predict_to_file(predictor, paths, out, top_k=1)
    seconds = time.perf_counter() - started
    with out.open(newline="") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    return seconds, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photo", default=None, help="WxH: re-encode as JPEGs of that size first")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="predict-folder-"))
    try:
        paths = list_images(args.folder, args.limit)
        if args.photo:
            paths = as_photos(paths, tuple(int(v) for v in args.photo.split("x")), work / "photos")
        exported = work / "exported"
        shutil.copytree(args.bundle, exported, ignore=shutil.ignore_patterns("*.onnx"))
        started = time.perf_counter()
        export_onnx(exported, samples=paths[:32])
        export_seconds = time.perf_counter() - started
        ways = {"torch": (args.bundle, True), "in-memory": (args.bundle, False), "exported": (exported, False)}
        times: dict[str, list[float]] = {way: [] for way in ways}
        labels: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for way, (bundle, old) in ways.items():
                seconds, labels[way] = predict_once(bundle, paths, work / f"{way}.csv", old)
                times[way].append(seconds)
                print(f"{way:10s} {seconds:7.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    predictor = Predictor(args.bundle, backend="torch")
    print(f"\n{platform.node()}: {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"{predictor.meta['backbone']} at {predictor.size} px; {len(paths)} images"
          f"{' as ' + args.photo + ' JPEGs' if args.photo else ''}; {args.rounds} rounds; "
          f"effitune export took {export_seconds:.1f} s (not counted)")
    base = statistics.median(times["torch"])
    for way, values in times.items():
        median = statistics.median(values)
        agree = sum(a == b for a, b in zip(labels[way], labels["torch"])) / len(paths)
        print(f"{way:10s} median {median:6.1f} s  {len(paths) / median:6.1f} img/s  {base / median:4.2f}x  "
              f"rounds {' / '.join(f'{v:.1f}' for v in values)}  labels equal to torch: {agree:.4f}")


if __name__ == "__main__":
    main()
