#!/usr/bin/env bash
# The GPU check (issue #15), sized for one H100 in under 8 minutes with the machine's own torch plus the wheels
# scripts/gpu_wheels.sh put in .whl/ (carry that folder). Writes one JSON of figures to OUT.json and the
# distillation benchmark's report beside it.
#
#   scripts/gpu_check.sh OUT.json              on the GPU machine
#   scripts/gpu_check.sh OUT.json --rehearse   anywhere without CUDA: every CPU-side step (wheel install, imports,
#                                              `info`, the parity check's CPU reference run, test collection);
#                                              the GPU tests skip
#
# PYTHON picks the interpreter (default python3, the GPU image's; the wheels are installed --target a temporary
# folder put first on PYTHONPATH, so nothing in that environment changes).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:?usage: scripts/gpu_check.sh OUT.json [--rehearse]}"
mode="${2:-}"
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$tmp/site" .whl/*.whl
    export PYTHONPATH="$tmp/site:$PWD"
fi
"$python" - <<'PY'
import importlib.metadata as m
import torch
import megatron.core  # noqa: F401  (the carried wheel, or the environment's)
import fla  # noqa: F401
print("torch", torch.__version__, "| megatron-core", m.version("megatron-core"), "| fla", m.version("fla-core"),
      "| transformers", m.version("transformers"), "| cuda", torch.cuda.is_available())
PY
"$python" -m megatron_slim.cli info

has_cuda="$("$python" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [ "$has_cuda" != 1 ]; then
    if [ "$mode" != "--rehearse" ]; then
        echo "error: no CUDA GPU visible (use --rehearse to run only the CPU-side steps)" >&2
        exit 1
    fi
    echo "rehearsal: the parity check's CPU reference run"
    CUDA_VISIBLE_DEVICES="" "$python" tests/gpu/gpu_models.py "$tmp"
    test -s "$tmp/reference.pt" && test -f "$tmp/ckpt/model_config.json"
fi

GPU_CHECK_JSON="$out" PYTHONUNBUFFERED=1 "$python" -m pytest -q -m gpu -p no:cacheprovider -rs -s tests/gpu

if [ "$has_cuda" = 1 ]; then
    # step time with the online teacher vs the student alone, against the FLOP-ideal ratio (report only)
    report="$(dirname "$out")/bench_distill_step.txt"
    timeout 150 "$python" bench/bench_distill_step.py --bf16 --steps 6 --rounds 1 --seq-length 1024 \
        --vocab 32768 >"$report" 2>&1 || echo "bench_distill_step did not finish (see $report)"
    tail -n 12 "$report"
fi
echo "gpu_check done in $((SECONDS - start)) s; figures: $out"
