"""After the phases: the passes over the images that calibration, the unknown-image score, the test
split and the report need, the old way vs one shared pass, in PyTorch eager vs ONNX Runtime.

Until session 6 `train()` ran the bundle's network in PyTorch eager over the val split, a 2,000-image
train sample and the test split, and the report then ran it again over every image. Now one pass over
every manifest row feeds all of them, in ONNX Runtime (exported in memory, parity-checked on 32 val
images) when on a CPU. This script times the three ways side by side on a finished run, interleaved
over rounds, and checks that the ONNX Runtime pass gives the same test accuracy.

    .venv/bin/python benchmarks/after_training.py RUN_DIR --cache CACHE_ROOT [--rounds 3] [--report]

`--report` times `effitune report RUN_DIR/model` as a user runs it afterwards (decoding every image,
no cache) with PyTorch vs with the in-memory ONNX Runtime engine it now uses on a CPU.

RUN_DIR: a run folder of `effitune train` (manifest.csv, model/); CACHE_ROOT: the `cache_root` it was
trained with (default ~/.cache/effitune), so that images are read from the resize-once cache.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from effitune import ood
from effitune.data.cache import ImageCache, images_root
from effitune.data.manifest import read_manifest
from effitune.evaluate.report import write_report
from effitune.runtime.graph import in_memory_engine
from effitune.predict import Predictor
from effitune.runtime.batching import run_in_batches


def predict_cached(engine, cache: ImageCache, keys: list[str], chunk: int = 512,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of an engine (predict.TorchEngine, OnnxEngine) for cached images, `chunk` in RAM at a time."""
    parts = [run_in_batches(engine, cache.stack(keys[i:i + chunk]), batch_size) for i in range(0, len(keys), chunk)]
    if not parts:
        return engine.run(np.zeros((0, cache.size, cache.size, 3), np.uint8))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="cache_root of the run (default: effitune's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report", action="store_true", help="also time `effitune report` in both engines")
    args = parser.parse_args()

    predictor = Predictor(args.run / "model", backend="torch")
    rows = read_manifest(args.run / "manifest.csv")
    cache = ImageCache(images_root(args.cache), predictor.size)
    keys = cache.build([r["path"] for r in rows], [r["sha1"] for r in rows])
    split = {name: [i for i, r in enumerate(rows) if r["split"] == name] for name in ("train", "val", "test")}
    labels = np.array([predictor.classes.index(r["label"]) for r in rows])
    bank = [split["train"][i] for i in ood.stratified_sample(labels[split["train"]], ood.BANK_SIZE)]
    print(f"{args.run}: {len(rows)} images at {predictor.size} px ({len(split['val'])} val, {len(bank)} train "
          f"sample, {len(split['test'])} test); {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")

    def before() -> np.ndarray:  # session 5: three passes, then the report's pass over every image
        for part in (split["val"], bank, split["test"]):
            predict_cached(predictor.engine, cache, [keys[i] for i in part])
        return predict_cached(predictor.engine, cache, keys)[0]

    def one_pass_torch() -> np.ndarray:
        return predict_cached(predictor.engine, cache, keys)[0]

    def one_pass_onnx() -> np.ndarray:
        engine = in_memory_engine(predictor.network, cache.stack([keys[i] for i in split["val"][:32]]))
        return predict_cached(engine, cache, keys)[0]

    def report_in(long_pass: int):
        def run() -> np.ndarray:
            Predictor.long_pass, saved = long_pass, Predictor.long_pass  # this process only: a benchmark
            try:
                with tempfile.TemporaryDirectory() as out:
                    write_report(args.run / "model", out=out)
                    metrics = json.loads((Path(out) / "report.json").read_text())["metrics"]
                    return np.array(metrics.get("accuracy", np.nan))
            finally:
                Predictor.long_pass = saved
        return run

    ways = {"before: 3 passes + the report's (PyTorch)": before, "one pass, PyTorch": one_pass_torch,
            "one pass, ONNX Runtime (incl. export + parity)": one_pass_onnx}
    if args.report:
        if (args.run / "model" / "model.onnx").is_file():
            parser.error("--report compares PyTorch with ONNX Runtime in memory: use a bundle without model.onnx")
        ways.update({"`effitune report`, PyTorch": report_in(10**12),
                     "`effitune report`, ONNX Runtime": report_in(1)})  # whatever the length
    seconds, logits = {name: [] for name in ways}, {}
    for _ in range(args.rounds):
        for name, way in ways.items():
            began = time.perf_counter()
            logits[name] = way()
            seconds[name].append(time.perf_counter() - began)
    base = statistics.median(seconds[next(iter(ways))])
    test = np.array(split["test"])
    for name in ways:
        median = statistics.median(seconds[name])
        accuracy = float(logits[name]) if logits[name].ndim == 0 else \
            float((logits[name][test].argmax(1) == labels[test]).mean()) if len(test) else float("nan")
        print(f"{name:48s} {', '.join(f'{s:.1f}' for s in seconds[name])} s; median {median:.1f} s, "
              f"{base / median:.2f}x; test accuracy {accuracy:.4f}")
    if args.report:
        pytorch, onnx = (statistics.median(seconds[f"`effitune report`, {e}"]) for e in ("PyTorch", "ONNX Runtime"))
        print(f"`effitune report`: ONNX Runtime {pytorch / onnx:.2f}x PyTorch (the report scores test, else val)")
    difference = np.abs(logits["one pass, ONNX Runtime (incl. export + parity)"] - logits["one pass, PyTorch"]).max()
    print(f"largest |logit difference| ONNX Runtime vs PyTorch over all {len(rows)} images: {difference:.2e}")


if __name__ == "__main__":
    main()
