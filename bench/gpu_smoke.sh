#!/usr/bin/env bash
# The whole user path on one device, small budgets: train.py (trainer=auto) with dilatequant and ptq_minmax on
# the embedded UNet and the embedded DiT, evaluate.py run=, python -m dq.export run=, evaluate.py export=;
# then a tiny FLUX.1-dev folder in the hub layout (text prompts encoded on the device), trained and exported.
# Fails when any phase recorded in a results.json / metrics.json ran on another device than the requested one
# (or a step fails); prints each phase's device, time and peak memory. On a GPU it also checks, with
# torch.cuda.set_sync_debug_mode("error"), that the fake-quant and integer forwards never wait on the device.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          # GPU: trainer=auto must find CUDA; under 4 minutes on an H100/H200
#   bash bench/gpu_smoke.sh --cpu [OUT_DIR]    # the same steps on the CPU (trainer=cpu, tinier budgets): CI
#
# Needs the project's requirements. On a GPU machine without diffusers/hydra/omegaconf/wandb, put their wheels
# in .whl/ (see docs/devices.md) and they are installed into /tmp/dq-site first, as bench/gpu_table.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
out=${1:-gpu_smoke_out}
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/gpu_smoke.log" ]; then
  echo "gpu_smoke: $out is not empty and not an earlier gpu_smoke output dir; give another OUT_DIR" >&2; exit 2
fi
rm -rf "$out" && mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled DQ_CACHE_DIR="$out/cache"
py=${PYTHON:-python3}
exec > >(tee "$out/gpu_smoke.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dq-site .whl/*.whl
  export PYTHONPATH=/tmp/dq-site${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

if [ "$mode" = gpu ]; then
  expect=cuda trainer=trainer=auto export_device=auto
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no CUDA device (use --cpu)')"
  # small budgets that still run every phase on a real schedule (10 steps)
  budget=(model.sampler.num_steps=10 data.num_samples=512 data.num_trajectories=64 method.distill.batch_size=32
          fidelity.num_samples=64)
  training=(method.distill.iters_per_block=20 method.distill.end_to_end_iters=20)
  eval_n=64 verify=8
else
  expect=cpu trainer=trainer=cpu export_device=cpu
  budget=(model.sampler.num_steps=3 data.num_samples=24 data.num_trajectories=8 data.generation_batch_size=8
          method.distill.batch_size=8 method.distill.capture_batch_size=24 fidelity.num_samples=4
          fidelity.batch_size=4)
  # min-max initialisation: the MSE search of every TPQ group is most of a tiny CPU run's time
  training=(method.distill.iters_per_block=1 method.distill.end_to_end_iters=1 method.act_init=minmax)
  eval_n=4 verify=2
fi
common=("$trainer" data.progress=false progress_bar=false checkpoint_every_n_steps=1000 "${budget[@]}")
eval_common=("$trainer" eval.num_samples=$eval_n eval.batch_size=$eval_n eval.is_splits=1 eval.grid_rows=1
             eval.fp_cache_dir="$out/cache/fp_samples" progress_bar=false)

step "device"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
date -u +%Y-%m-%dT%H:%MZ

for model in embedded embedded_dit; do
  for method in dilatequant ptq_minmax; do
    step "train.py model=$model method=$method"
    [ "$method" = dilatequant ] && extra=("${training[@]}") || extra=()  # ptq_minmax: no training
    "$py" train.py model=$model method=$method "${common[@]}" "${extra[@]}" hydra.run.dir="$out/$model/$method"
  done
  run="$out/$model/dilatequant"
  step "evaluate.py run= ($model)"
  "$py" evaluate.py run="$run" "${eval_common[@]}" hydra.run.dir="$out/$model/eval_run"
  step "python -m dq.export run= ($model)"
  "$py" -m dq.export run="$run" verify=$verify device=$export_device | tee "$out/$model/export.txt"
  grep -q "^dq: the check ran on $expect" "$out/$model/export.txt" || { echo "gpu_smoke: the export's check did not run on $expect"; exit 1; }
  step "evaluate.py export= ($model)"
  "$py" evaluate.py export="$run/student_int.safetensors" "${eval_common[@]}" hydra.run.dir="$out/$model/eval_export"
done

# a text-to-image family as a user downloads it: a tiny random FLUX.1-dev pipeline saved in the hub repo's
# layout (sharded transformer and T5, CLIP + T5 tokenizers), its prompts encoded by FluxPipeline on the
# job's device, BKD, fidelity and the integer export (the folder writer lives in the tests)
if "$py" -c "import pytest, sentencepiece" 2>/dev/null; then
  step "train.py model=flux_dev on a tiny FLUX.1-dev folder in the hub layout"
  "$py" -c "import sys; from pathlib import Path; from tests.zoo.real_layouts import write_flux_dev; write_flux_dev(Path(sys.argv[1]))" \
    "$out/flux_dev_folder"
  "$py" train.py model=flux_dev model.path="$out/flux_dev_folder" model.conditioning.prompts_file="$out/flux_dev_folder/prompts.txt" \
    model.conditioning.max_sequence_length=8 model.sample_size=8 "${common[@]}" "${training[@]}" \
    hydra.run.dir="$out/flux_dev/dilatequant"
  step "python -m dq.export run= (flux_dev)"
  "$py" -m dq.export run="$out/flux_dev/dilatequant" verify=$verify device=$export_device | tee "$out/flux_dev/export.txt"
  grep -q "^dq: the check ran on $expect" "$out/flux_dev/export.txt" || { echo "gpu_smoke: the export's check did not run on $expect"; exit 1; }
else
  step "skipped the FLUX.1-dev folder: its writer needs pytest and sentencepiece (pip install -r requirements-dev.txt)"
fi

if [ "$mode" = gpu ]; then
  step "no host syncs in the fake-quant and integer forwards (torch.cuda.set_sync_debug_mode error)"
  "$py" - "$out/embedded/dilatequant" <<'EOF'
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dq.arch import describe
from dq.export import load_int_model
from dq.quant import load_quant_state, set_step
from dq.sampling import unet_forward
from dq.zoo import load_model

run = Path(sys.argv[1])
loaded = load_model(OmegaConf.load(run / "config.yaml").model)
student = load_quant_state(loaded.unet, run / "student.safetensors", describe(loaded.unet)).cuda().eval()
integer = load_int_model(run / "student_int.safetensors", device=torch.device("cuda"))
channels, size = loaded.unet.config.in_channels, loaded.unet.config.sample_size
x = torch.randn(8, channels, size, size, device="cuda")
t = torch.full((8,), 500, device="cuda")
with torch.no_grad():
    for name, model in (("fake-quant", student), ("integer", integer)):
        set_step(model, 1)
        unet_forward(model, x, t)  # the first call checks the TPQ tables once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            unet_forward(model, x, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        print(f"gpu_smoke: {name} forward: no host sync")
EOF
fi

step "phases"
"$py" - "$out" "$expect" <<'EOF'
import json
import sys
from pathlib import Path

out, expect = Path(sys.argv[1]), sys.argv[2]
bad, rows = [], []
for path in sorted([*out.glob("*/*/results.json"), *out.glob("*/eval_*/metrics.json")]):
    record = json.loads(path.read_text())
    phases = record.get("phases") or {}
    wanted = {"calibration", "fidelity"} if path.name == "results.json" else {"sampling", "fp_sampling", "metrics"}
    if not wanted <= set(phases):
        bad.append(f"{path}: phase records {sorted(phases)} lack {sorted(wanted - set(phases))}")
    for name, phase in phases.items():
        rows.append(f"{str(path.relative_to(out).parent):28s} {name:15s} {phase['device']:8s} {phase['seconds']:8.2f} s "
                    f"{phase['peak_memory_mb']:9.1f} MB ({phase['memory_measure']})")
        if any(device.split(":")[0] != expect for device in phase["device"].split(",")):
            bad.append(f"{path}: phase {name} ran on {phase['device']}, not {expect}")
print("\n".join(rows))
if len(rows) == 0:
    bad.append("no results.json / metrics.json found")
if bad:
    sys.exit("gpu_smoke: FAILED\n" + "\n".join(bad))
print(f"gpu_smoke: every phase of {len(rows)} ran on {expect}")
EOF
step "done"
