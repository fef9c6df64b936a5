"""Deployment trade-off in one run: accuracy x batch-1 latency x size for PyTorch and every export format
(ONNX fp32/INT8, OpenVINO fp32/INT8, LiteRT fp32/full-integer INT8).

For each backbone (same Fashion-MNIST subset, same resolution, same small training settings) it trains
a bundle (or takes `--bundles`), exports each of `--formats` with the parity gate and INT8 calibrated on
the training split, and benchmarks every backend on this machine. Because a run's own test split is small, fp32 and
INT8 accuracy are also measured on `--official-test` images per class of the official test part, which
no run saw; on the first bundle the same images compare INT8 settings (per-tensor vs per-channel
weights, stem conv quantized or kept in float). Last, lite0 at 224 px, batch 1: every format vs
PyTorch eager (the first bundle's weights re-packaged at 224 px: a speed measurement only).

    python benchmarks/export_bench.py --models lite0 lite1 lite2 --per-class 150 --out /tmp/export-bench
    python benchmarks/export_bench.py --bundles demo/run/model --formats onnx openvino tflite --out /tmp/formats
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from effitune import bundle as bundles
from effitune.config import load_config
from effitune.datasets import export_fashion_mnist
from effitune.export import ONNX_FILES, export
from effitune.export.bench import benchmark, measure, save, table
from effitune.export.artifacts import load_images
from effitune.export.quantize import calibration_images, quantize_file
from effitune.predict import expand_sources
from effitune.runtime.batching import run_in_batches
from effitune.runtime import EXPORT_FILES
from effitune.runtime.engines import OnnxEngine, open_engine
from effitune.pipeline import train

console = Console()
INT8_VARIANTS = {"per-tensor": (False, False), "per-channel": (True, False), "per-channel, stem float": (True, True)}


def train_bundle(images: Path, out: Path, backbone: str, size: int, epochs: int) -> Path:
    bundle = out / "model"
    if (bundle / "effitune.json").is_file():
        return bundle
    config = load_config(overrides={
        "model.backbone": backbone, "data.image_size": size, "train.unfreeze": "1",
        "train.stage1.epochs": epochs, "train.stage2.epochs": epochs})
    return train(images, out=out, config=config).bundle


def export_all(bundle: Path, formats: list[str]) -> None:
    """Each format with its INT8 file; prints what each check measured on the run's own test split."""
    for format in formats:
        for backend, result in export(bundle, format, int8=True).items():
            check = (f"parity max |logit diff| {result['parity']['max_abs_logit_diff']:.1e}" if "parity" in result else
                     f"test split ({result['accuracy_images']} images) float {result['float_accuracy']:.4f} -> INT8 "
                     f"{result['accuracy']:.4f}, same unknown decision {result.get('unknown_agreement', float('nan')):.1%}")
            console.print(f"{bundle} {backend}: {result['bytes'] / 1e6:.1f} MB, {check}")


def accuracy_torch(bundle: Path, paths: list[str], names: list[str]) -> float:
    from effitune.predict import Predictor

    meta = bundles.read_meta(bundle)
    images, readable = load_images(paths, int(meta["preprocessing"]["size"]))
    labels = np.array([meta["classes"].index(names[i]) for i in readable])
    return accuracy(Predictor(bundle, backend="torch").engine, images, labels)


def official_test(out: Path, per_class: int) -> tuple[list[str], list[str]]:
    folder = export_fashion_mnist(out / "fashion-mnist-test", per_class=per_class, part="test")
    paths = list(expand_sources([folder]))
    return paths, [Path(path).parent.name for path in paths]


def accuracy(engine, images: np.ndarray, labels: np.ndarray) -> float:
    return float((run_in_batches(engine, images, 64)[0].argmax(1) == labels).mean())


def held_out_accuracy(bundle: Path, paths: list[str], names: list[str]) -> dict:
    meta = bundles.read_meta(bundle)
    images, readable = load_images(paths, int(meta["preprocessing"]["size"]))
    labels = np.array([meta["classes"].index(names[i]) for i in readable])
    return {backend: accuracy(open_engine(bundle, backend), images, labels) for backend in EXPORT_FILES
            if (bundle / EXPORT_FILES[backend]).is_file()}


def int8_ablation(bundle: Path, paths: list[str], names: list[str], out: Path, runs: int) -> list[dict]:
    meta = bundles.read_meta(bundle)
    calibration, _ = calibration_images(bundle, meta, None, 200)
    images, readable = load_images(paths, int(meta["preprocessing"]["size"]))
    labels = np.array([meta["classes"].index(names[i]) for i in readable])
    rows = []
    for name, (per_channel, stem_float) in INT8_VARIANTS.items():
        target = out / f"int8-{name.replace(', ', '-').replace(' ', '-')}.onnx"
        quantize_file(bundle / ONNX_FILES["onnx"], target, calibration, per_channel, stem_float)
        engine = OnnxEngine(target)
        rows.append({"variant": name, "accuracy": accuracy(engine, images, labels), "bytes": target.stat().st_size,
                     **measure(engine, int(meta["preprocessing"]["size"]), runs)})
    return rows


def repackage(bundle: Path, size: int, out: Path) -> Path:
    """The same weights with preprocessing at `size` (the network is resolution-agnostic), next to a copy
    of the run's manifest so that export finds calibration and test images."""
    meta = bundles.read_meta(bundle)
    keep = ("classes", "backbone", "weight_source", "config", "manifest_sha1", "temperature")
    meta = {key: meta[key] for key in keep if key in meta} | {"preprocessing": {**meta["preprocessing"], "size": size}}
    out = bundles.save_bundle(out / "model", bundles.read_weights(bundle), meta)
    if (bundle.parent / "manifest.csv").is_file():
        shutil.copyfile(bundle.parent / "manifest.csv", out.parent / "manifest.csv")
    return out


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {platform.system()}; load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lite0"], help="lite0 lite1 lite2 (tf_efficientnet_*)")
    parser.add_argument("--bundles", nargs="*", type=Path, help="Benchmark these bundles instead of training.")
    parser.add_argument("--per-class", type=int, default=150, help="Fashion-MNIST training images per class.")
    parser.add_argument("--official-test", type=int, default=200, help="Official test images per class (0: skip).")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=4, help="Epochs per phase (head, then the last stage).")
    parser.add_argument("--runs", type=int, default=50, help="Timed batch-1 calls per backend.")
    parser.add_argument("--formats", nargs="+", default=["onnx", "openvino", "tflite"],
                        help="Export formats (each with --int8); openvino and tflite need their extras.")
    parser.add_argument("--out", type=Path, default=Path("/tmp/export-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine_before": machine()}
    console.print(f"machine: {report['machine_before']}")

    if args.bundles:
        bundle_paths = args.bundles
    else:
        images = export_fashion_mnist(args.out / "fashion-mnist", per_class=args.per_class)
        bundle_paths = [train_bundle(images, args.out / f"run-{name}", f"tf_efficientnet_{name}", args.image_size,
                                     args.epochs) for name in args.models]
    for bundle in bundle_paths:
        export_all(bundle, args.formats)

    report["rows"] = benchmark(bundle_paths, runs=args.runs)
    console.print(table(report["rows"]))
    written = save(report["rows"], args.out)

    if args.official_test:
        paths, names = official_test(args.out, args.official_test)
        report["official_test"] = {}
        for bundle in bundle_paths:
            scores = {"torch": accuracy_torch(bundle, paths, names), **held_out_accuracy(bundle, paths, names)}
            report["official_test"][str(bundle)] = scores
            held_out = Table("backend", "accuracy", "vs PyTorch (points)",
                             title=f"{bundle}: official test part, {len(paths)} images")
            for backend, value in scores.items():
                held_out.add_row(backend, f"{value:.4f}", f"{100 * (value - scores['torch']):+.2f}")
            console.print(held_out)
        report["int8_ablation"] = int8_ablation(bundle_paths[0], paths, names, args.out, args.runs)
        ablation = Table("INT8 variant", "accuracy", "size MB", "p50 ms",
                         title=f"{bundle_paths[0]}, {len(paths)} images")
        for row in report["int8_ablation"]:
            ablation.add_row(row["variant"], f"{row['accuracy']:.4f}", f"{row['bytes'] / 1e6:.1f}",
                             f"{row['latency_p50_ms']:.2f}")
        console.print(ablation)

    large = repackage(bundle_paths[0], 224, args.out / "lite0-224")
    export_all(large, args.formats)  # 96-px weights at 224 px: the accuracy is not the point here, speed is
    report["rows_224"] = benchmark([large], runs=args.runs)
    console.print(table(report["rows_224"]))
    by_backend = {row["backend"]: row for row in report["rows_224"]}
    report["ratios_224"] = {name: by_backend["torch"]["latency_p50_ms"] / row["latency_p50_ms"]
                            for name, row in by_backend.items() if name != "torch"}
    console.print("224 px batch 1 vs PyTorch eager: " + ", ".join(
        f"{name} {by_backend[name]['latency_p50_ms']:.1f} ms ({ratio:.1f}x)" for name, ratio in report['ratios_224'].items()))
    report["machine_after"] = machine()
    (args.out / "export_bench.json").write_text(json.dumps(report, indent=2))
    console.print(f"machine after: {report['machine_after']}\nplot: {written['plot']}; all figures: "
                  f"{args.out / 'export_bench.json'}")


if __name__ == "__main__":
    main()
