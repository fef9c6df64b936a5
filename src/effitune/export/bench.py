"""Speed, size and accuracy of each backend of a bundle on this machine: PyTorch eager, ONNX fp32/fp16/INT8,
OpenVINO fp32/INT8 and LiteRT fp32/INT8.

Batch-1 latency is what one request waits (p50/p95 over `runs` calls after warm-up); batch-32
throughput is what a batch job gets. Inputs are uint8 images at the bundle's size, so the
uint8 -> float conversion is timed too. Accuracy is read from the bundle (the test split at training; each
INT8 file and its float graph re-measured at export; a float export that passed the parity gate gives
PyTorch's decisions), not evaluated again.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
from rich.table import Table

from ..bundle import WEIGHTS_FILE, Preprocessing, read_meta
from ..errors import EffituneWarning, UserError
from ..predict import Predictor
from ..runtime.engines import available_cores
from ..runtime import EXPORT_FILES, OPENVINO_FILES


def benchmark(bundles: list[str | Path], *, runs: int = 50, warmup: int = 10, batch_size: int = 32,
              backends: list[str] | None = None) -> list[dict]:
    """One row per (bundle, backend present in it): size, accuracy, latency p50/p95, throughput."""
    if runs < 1 or batch_size < 1:
        raise UserError(f"runs and batch_size must be at least 1 (got {runs} and {batch_size}).")
    rows = []
    for bundle in map(Path, bundles):
        meta = read_meta(bundle)
        for backend in backends or available_backends(bundle):
            try:
                engine = Predictor(bundle, backend=backend).engine
            except UserError as error:  # e.g. its runtime is not installed here: the other rows still count
                if backends:
                    raise
                warnings.warn(f"{bundle}: no {backend} row ({error})", EffituneWarning, stacklevel=2)
                continue
            timing = measure(engine, Preprocessing.from_meta(meta).size, runs, warmup, batch_size)
            rows.append({**describe(bundle, meta, backend), **timing})
    return rows


def available_backends(bundle: Path) -> list[str]:
    return ["torch", *(backend for backend, name in EXPORT_FILES.items() if (bundle / name).is_file())]


# A float export's accuracy: re-measured beside its INT8 file where there is one, else PyTorch's (the
# parity gate holds it to PyTorch's logits within 1e-3).
FLOAT_OF = {"onnx": "int8", "openvino": "openvino-int8", "tflite": "tflite-int8"}


def describe(bundle: Path, meta: dict, backend: str) -> dict:
    exported = meta.get("export", {})
    test_accuracy = (meta.get("metrics") or {}).get("accuracy")
    if backend == "torch":
        accuracy = test_accuracy
    elif backend in FLOAT_OF:
        quantized = exported.get(FLOAT_OF[backend], {})
        accuracy = quantized.get("float_accuracy", quantized.get("onnx_accuracy", test_accuracy))
    elif backend == "fp16":
        accuracy = test_accuracy if "fp16" in exported else None  # within the fp16 parity gate
    else:
        accuracy = exported.get(backend, {}).get("accuracy")
    file = bundle / (WEIGHTS_FILE if backend == "torch" else EXPORT_FILES[backend])
    return {"bundle": str(bundle), "model": f"{meta['backbone'].replace('tf_efficientnet_', '')} "
            f"{Preprocessing.from_meta(meta).size}px", "backend": backend, "file": file.name,
            "bytes": file_bytes(file, backend), "accuracy": accuracy}


def file_bytes(file: Path, backend: str) -> int:
    """On disk; an OpenVINO IR is its .xml and its .bin."""
    extra = file.with_suffix(".bin").stat().st_size if backend in OPENVINO_FILES else 0
    return file.stat().st_size + extra


def measure(engine, size: int, runs: int = 50, warmup: int = 10, batch_size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    for _ in range(warmup):
        engine.run(one)
    latencies = []
    for _ in range(runs):
        began = time.perf_counter()
        engine.run(one)
        latencies.append(time.perf_counter() - began)
    engine.run(batch)  # first call at a new shape allocates
    repeats = max(3, runs // 10)
    began = time.perf_counter()
    for _ in range(repeats):
        engine.run(batch)
    elapsed = time.perf_counter() - began
    return {"latency_p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "latency_p95_ms": 1000 * float(np.percentile(latencies, 95)),
            "throughput_ips": batch_size * repeats / elapsed, "batch_size": batch_size, "threads": available_cores()}


def table(rows: list[dict]) -> Table:
    """Rich table; `vs torch` is each backend's batch-1 speed-up over PyTorch eager on the same bundle."""
    result = Table("model", "backend", "size MB", "accuracy", "p50 ms", "p95 ms", "img/s (batch)", "vs torch",
                   title=f"effitune benchmark ({rows[0]['threads'] if rows else '?'} threads)")
    torch_p50 = {row["bundle"]: row["latency_p50_ms"] for row in rows if row["backend"] == "torch"}
    for row in rows:
        baseline = torch_p50.get(row["bundle"])
        result.add_row(row["model"], row["backend"], f"{row['bytes'] / 1e6:.1f}",
                       "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}",
                       f"{row['latency_p50_ms']:.2f}", f"{row['latency_p95_ms']:.2f}",
                       f"{row['throughput_ips']:.0f} ({row['batch_size']})",
                       f"{baseline / row['latency_p50_ms']:.1f}x" if baseline else "-")
    return result


def plot(rows: list[dict], path: str | Path) -> Path:
    """Accuracy vs batch-1 latency; marker area grows with file size; rows without accuracy are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = {"torch": "tab:red", "onnx": "tab:blue", "fp16": "tab:purple", "int8": "tab:green",
               "openvino": "tab:cyan", "openvino-int8": "tab:olive", "tflite": "tab:orange", "tflite-int8": "tab:brown"}
    for index, row in enumerate(r for r in rows if r["accuracy"] is not None):
        axes.scatter(row["latency_p50_ms"], 100 * row["accuracy"], s=20 + 12 * row["bytes"] / 1e6, alpha=0.6,
                     color=colours.get(row["backend"], "tab:gray"), edgecolors="black", linewidths=0.5,
                     label=row["backend"])
        axes.annotate(f"{row['model']}, {row['bytes'] / 1e6:.0f} MB", (row["latency_p50_ms"], 100 * row["accuracy"]),
                      textcoords="offset points", xytext=(6, 9 * (index % 3) - 8), fontsize=7)  # staggered
    handles = dict(zip(*reversed(axes.get_legend_handles_labels())))  # one entry per backend
    axes.legend(handles.values(), handles.keys(), title="backend", loc="lower right", markerscale=0.5)
    axes.set_xscale("log")
    axes.margins(x=0.3, y=0.15)
    axes.set_xlabel("batch-1 latency p50 (ms, log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("accuracy x latency x size (marker area ~ file size)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def save(rows: list[dict], out: str | Path) -> dict[str, Path]:
    """benchmark.json + benchmark.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=2))
    return {"json": out / "benchmark.json", "plot": plot(rows, out / "benchmark.png")}
