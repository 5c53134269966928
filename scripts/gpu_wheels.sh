#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels of the Python packages scripts/gpu_check.sh needs and the GPU
# image lacks: it has torch 2.11, triton, transformers, numpy, einops, safetensors, pyyaml and the rest of
# megatron-slim's dependencies, but no network. --no-deps with an exact list: each package's own requirements are
# either in the image or below. Run here (with network), then carry .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
dest=".whl"
# exact versions: the ones constraints.txt pins and the CPU suite runs
wheels=(megatron-core==0.19.2 flash-linear-attention==0.6.0 fla-core==0.6.0)

rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
ls -l "$dest"
du -sh "$dest"
