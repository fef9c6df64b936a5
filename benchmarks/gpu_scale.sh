#!/usr/bin/env bash
# Full Fashion-MNIST (60,000 images) with effitune's defaults on a lent GPU machine, in one call that
# installs nothing (issue 24): wall time, where it went (RUN/timings.json), the official 10k test.
# Carried from the workstation (ignored paths, filled by `bash benchmarks/gpu_prepare.sh`):
#   .whl/ (wheels the GPU image may lack) and .gpu/fashion-mnist/ (Debian's Fashion-MNIST files).
#   device run: bash benchmarks/gpu_scale.sh        (carry: .whl .gpu)
# Targets (docs/benchmarks.md): official test >= 0.950, wall <= 120 s on an H200, report <= 10% of it.
set -uo pipefail
OUT=${OUT:-/tmp/effitune-gpu-scale}; mkdir -p "$OUT"
SRC=${EFFITUNE_SRC:-$PWD}
export PYTHONUNBUFFERED=1 PYTHONPATH="$SRC/src:/tmp/site" EFFITUNE_CACHE=/tmp/effitune-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

timeout ${SCALE_TIMEOUT:-520} python3 - <<'PY' 2>"$OUT/scale.err" | tee "$OUT/scale.txt"
import json, time
from effitune.datasets import export_fashion_mnist
from effitune.evaluate.evaluate import evaluate_bundle
from effitune.predict import Predictor
from effitune.pipeline import train

began = time.perf_counter()
data = export_fashion_mnist("/tmp/fmnist-full", per_class=None, source=".gpu/fashion-mnist")
official = export_fashion_mnist("/tmp/fmnist-official-test", per_class=None, part="test", source=".gpu/fashion-mnist")
print("export s", round(time.perf_counter() - began, 1))
result = train(data, out="/tmp/fmnist-full-run", progress=False)
print("timings.json", json.dumps(result.timings, indent=1))
began = time.perf_counter()
metrics = evaluate_bundle(result.bundle, official, predictor=Predictor(result.bundle, device="cuda"))
wall = result.timings["wall_seconds"]
print(json.dumps({"official_test_accuracy": metrics["accuracy"], "split_test_accuracy": result.metrics.get("accuracy"),
                  "wall_seconds": wall, "report_share": round(result.timings.get("report", 0) / wall, 3),
                  "phases": result.phases, "official_eval_seconds": round(time.perf_counter() - began, 1)}, indent=1))
PY
cp /tmp/fmnist-full-run/timings.json /tmp/fmnist-full-run/history.csv "$OUT/" 2>/dev/null
tail -5 "$OUT/scale.err"
