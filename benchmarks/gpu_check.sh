#!/usr/bin/env bash
# The GPU check (about 5-8 minutes on one H100): bench sac-update on cuda (SB3 vs ours eager vs
# ours compiled with reduce-overhead, i.e. CUDA graphs), bench stl-vs-mt on cuda, and a timed
# 100k-env-step mt10_hps run; one JSON with each ratio and the projected wall time of the 20M-step
# MT10 budget. Without a GPU it runs in dry mode (tiny sizes on the CPU; its numbers mean nothing).
#   bash benchmarks/gpu_check.sh [OUT.json] [extra bench options, e.g. run_env_steps=50000]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_check.json}"
shift || true
export WANDB_MODE=disabled MPLBACKEND=Agg
python -m mtrl_arch.cli bench gpu "out=$out" "$@"
