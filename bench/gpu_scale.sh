#!/usr/bin/env bash
# The plan against one H100/H200, sized for under 5 minutes: the SD v1.4-shaped UNet (random weights, its
# shipped config), the planner's prediction for the blocks with the largest training steps at the paper's
# batch of 32 beside their measured peak memory and step time, the calibrated throughput of the block steps,
# and `plan=true` for the paper's setting with that throughput. Every figure goes to OUT_DIR/gpu_scale.log.
#
#   bash bench/gpu_scale.sh [OUT_DIR]
#
# Needs torch with CUDA plus the project's requirements; on a machine without diffusers/hydra/omegaconf, put
# their wheels in .whl/ (see docs/devices.md) and they are installed into /tmp/dq-site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_scale_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled DQ_CACHE_DIR="$out/cache"
py=${PYTHON:-python3}
exec > >(tee "$out/gpu_scale.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dq-site .whl/*.whl
  export PYTHONPATH=/tmp/dq-site${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total --format=csv
date -u +%Y-%m-%dT%H:%MZ

step "planned vs measured BKD steps, SD v1.4 UNet, batch 32"
timeout 200 "$py" bench/bench_plan.py --model sd_v1_4 --device cuda --batch 32 --blocks 3 --steps 5 | tee "$out/steps.log"

step "the paper's setting, planned with the measured throughput"
tflops=$(sed -n 's/.*budget.tflops=\([0-9.e+-]*\).*/\1/p' "$out/steps.log" | tail -1)
timeout 150 "$py" train.py model=sd_v1_4 trainer=gpu plan=true method.distill.end_to_end_recompute=true \
  budget.host_memory_gb=64 ${tflops:+budget.tflops=$tflops} hydra.run.dir="$out/plan_sd_v1_4" | tail -3

step "done"
