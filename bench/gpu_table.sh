#!/usr/bin/env bash
# The README's GPU table in one run, sized for under 8 minutes on one H100/H200:
#   1. the CUDA tests of the integer kernels (tests marked gpu),
#   2. BKD vs end-to-end QAT cost on the ddpm_cifar10 architecture (fp32 teacher, then bf16 teacher targets),
#   3. the fake-quant student's forward against FP32 (bench_forward),
#   4. FP32 / FP16 / BF16 (eager, compiled, CUDA graphs) / fake-quant / integer forward time and peak memory
#      (bench_int: the integer model on gemm (`auto` on a GPU), triton and fp8 (4-bit layers, where usable)).
# Each step has its own time limit, so one slow step cannot take the others' time; every figure goes to
# OUT_DIR/gpu_table.log (and the JSON files beside it).
#
#   bash bench/gpu_table.sh [OUT_DIR]
#
# Needs torch with CUDA plus the project's requirements. On a machine without diffusers/hydra/omegaconf,
# put their wheels in .whl/ (see the README's GPU section) and they are installed into /tmp/dq-site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_table_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
py=${PYTHON:-python3}
exec > >(tee "$out/gpu_table.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dq-site .whl/*.whl
  export PYTHONPATH=/tmp/dq-site${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
date -u +%Y-%m-%dT%H:%MZ

step "CUDA tests of the integer kernels"
timeout 60 "$py" -m pytest -q -m gpu tests/export -p no:cacheprovider

step "BKD vs end-to-end QAT, ddpm_cifar10 (random weights), fp32 teacher"
timeout 140 "$py" bench/bench_bkd.py --arch ddpm_cifar10 --device cuda --iters 10 --samples 256 --steps 100 \
  --json "$out/bkd_fp32.json"

step "BKD vs end-to-end QAT, bf16 teacher targets"
timeout 90 "$py" bench/bench_bkd.py --arch ddpm_cifar10 --device cuda --iters 10 --samples 256 --steps 100 \
  --teacher-precision bf16 --json "$out/bkd_bf16.json"

step "fake-quant W4A4 student vs FP32 forward, batch 64"
timeout 30 "$py" bench/bench_forward.py --arch ddpm_cifar10 --device cuda --batch 64 --repeats 20

step "FP32 / FP16 / BF16 / fake-quant / integer forward"
timeout 150 "$py" bench/bench_int.py --device cuda --arch embedded,ddpm_cifar10 --batch 1,8,64 --repeats 20 \
  --json "$out/int_forward.json"

step "done"
