"""Legacy-exported ONNX graphs with run-time "SAME" padding (before session 7) vs constant, folded padding.

tf_* backbones pad their strided convolutions "SAME", computed from the input's shape on every call.
The legacy exporter recorded that as shape arithmetic and a Pad per layer, and gave each Pad an empty
pad-value input that kept ONNX Runtime from folding it into its Conv. Now `runtime.graph.torchscript_graph`
exports constant padding for the one input size and drops the empty input: no Pad is left. Both
graphs are built here (the old one by turning the two changes off), and timed side by side,
interleaved over rounds:

  inference   the whole network (`in_memory_engine`'s graph: the pass after training, long predict
              streams), random images, batch 64, ONNX Runtime alone
  caching     the real frozen-prefix caching pass of training (4 views, the cut points given), on the
              images of a finished run's resize-once cache, loader workers augmenting as in training

    .venv/bin/python benchmarks/same_padding_graph.py RUN_DIR/manifest.csv --cache CACHE_ROOT --size 224 --images 600
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caching_pass_spin import training_images  # benchmarks/ is the script's folder
from effitune.runtime import graph as graph_module
from effitune.runtime.graph import torchscript_onnx
from effitune.runtime.batching import run_in_batches
from effitune.runtime.engines import OnnxEngine
from effitune.training import features

FIXED = {"static_same_padding": graph_module.static_same_padding, "_pads_fusable": graph_module._pads_fusable}
OLD = {"static_same_padding": lambda module, example: contextlib.nullcontext(), "_pads_fusable": lambda graph: graph}


def use(graph: str) -> None:
    for name, value in (OLD if graph == "old" else FIXED).items():
        setattr(graph_module, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="the run's cache_root (default: effitune's)")
    parser.add_argument("--size", type=int, required=True, help="the run's image size")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--depths", default="1,2,3", help="cut points of the caching pass")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    datamodule, network = training_images(args.manifest, args.cache, args.size, args.images)
    network.eval()
    depths = [int(d) for d in args.depths.split(",")]

    images = np.random.default_rng(0).integers(0, 256, (256, args.size, args.size, 3), dtype=np.uint8)
    engines, outputs = {}, {}
    for graph in ("old", "new"):
        use(graph)
        engines[graph] = OnnxEngine(torchscript_onnx(copy.deepcopy(network), args.size))
        outputs[graph] = run_in_batches(engines[graph], images[:64], 64)
    same = max(float(np.abs(outputs["old"][i] - outputs["new"][i]).max()) for i in (0, 1))

    seconds = {(kind, graph): [] for kind in ("inference", "caching") for graph in ("old", "new")}
    for _ in range(args.rounds):
        for graph in ("old", "new"):
            began = time.perf_counter()
            run_in_batches(engines[graph], images, 64)
            seconds["inference", graph].append(time.perf_counter() - began)
            use(graph)
            folder = Path(tempfile.mkdtemp())
            began = time.perf_counter()
            features.compute_activations(network, datamodule.dataset("train", augment=True), depths, folder,
                                         views=args.views, batch_size=128, workers=datamodule.workers)
            seconds["caching", graph].append(time.perf_counter() - began)
            shutil.rmtree(folder)
    use("new")

    print(f"\n{platform.node()}: {torch.get_num_threads()} threads; tf_efficientnet_lite0 at {args.size} px; "
          f"max |difference| old vs new graph (logits, features): {same:.1e}")
    for kind, what in (("inference", f"{len(images)} images, ONNX Runtime alone"),
                       ("caching", f"caching pass, {len(datamodule.keys)} images x {args.views} views, cuts {depths}, "
                                   f"{datamodule.workers} loader worker(s)")):
        old, new = (statistics.median(seconds[kind, graph]) for graph in ("old", "new"))
        rounds = " | ".join(f"{graph}: {', '.join(f'{s:.1f}' for s in seconds[kind, graph])} s"
                            for graph in ("old", "new"))
        print(f"{kind:9s} {what}: {rounds}; medians {old:.1f} -> {new:.1f} s, {old / new:.2f}x")


if __name__ == "__main__":
    main()
