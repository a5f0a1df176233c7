"""The plan against a real device: for the blocks with the largest planned training step, the peak memory and
the time of BKD training steps measured on random weights, beside the plan's prediction (dq.plan).

    python bench/bench_plan.py --model sd_v1_4 --device cuda          # the paper's SD setting (bench/gpu_scale.sh)
    python bench/bench_plan.py --model embedded --device cpu --batch 8  # the same path on the CPU

The denoiser is built from its config (dq/zoo/denoisers/<model>.json, or the embedded model's folder) with
random weights on the device; the plan is made on the meta device for N = --samples rows at --batch. For each
measured block the student's block runs `--steps` training steps (forward, MSE backward, Adam) on inputs
captured from one forward of the FP model at the batch. Measured: on CUDA the allocator's peak during the
steps minus what was allocated before them; on the CPU the same tracker as the plan's, on real tensors.
Prints one JSON line per block and a last line with the calibrated throughput of the block steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq.arch import describe, sample_shape  # noqa: E402
from dq.bkd import DistillConfig  # noqa: E402
from dq.bkd.blocks import capture_block, output_tensors  # noqa: E402
from dq.jobs.plan import DENOISERS_DIR, conditioning_of, meta_denoiser  # noqa: E402
from dq.plan import GIB, PlanSpec, _Peak, make_plan  # noqa: E402
from dq.quant import QuantConfig, act_quantizers, quantize_model, step_context  # noqa: E402

EMBEDDED = Path(__file__).resolve().parent.parent / "dq" / "zoo" / "embedded" / "unet" / "config.json"


def model_config(name: str) -> tuple[dict, dict]:
    if name == "embedded":
        return json.loads(EMBEDDED.read_text()), {}
    record = json.loads((DENOISERS_DIR / f"{name}.json").read_text())
    from omegaconf import OmegaConf

    from dq.cli import CONF_DIR

    return record["denoiser"], OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd_v1_4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=5120)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=2, help="how many of the largest blocks to measure")
    args = parser.parse_args()
    torch.manual_seed(0)
    config, model_cfg = model_config(args.model)
    meta = meta_denoiser(config, model_cfg)
    cond_shape, cond_dtype = conditioning_of(meta, model_cfg)
    steps = 4
    quant = QuantConfig(num_steps=steps, num_groups=steps)
    distill = DistillConfig(batch_size=args.batch, end_to_end_iters=0)
    spec = PlanSpec(num_samples=args.samples, num_trajectories=args.samples // steps, generation_batch_size=8,
                    num_steps=steps, guidance=False, cond_shape=cond_shape, cond_dtype=cond_dtype,
                    device="cuda" if args.device.startswith("cuda") else "cpu", gpu_bytes=80 * GIB)
    started = time.perf_counter()
    plan = make_plan(meta, quant, distill, spec, args.model)
    print(f"plan: {time.perf_counter() - started:.0f} s on the meta device", flush=True)
    measured = sorted(plan.blocks, key=lambda b: -b.step_bytes)[: args.blocks]

    device = torch.device(args.device)
    with torch.device(device):
        teacher = type(meta).from_config(dict(meta.config))
    teacher.eval().requires_grad_(False)
    student = quantize_model(teacher, quant, describe(teacher)).requires_grad_(True)
    for quantizer in act_quantizers(student):  # random tables: the memory and the time do not depend on them
        quantizer.calibrated.fill_(True)
        quantizer.scale.data.fill_(0.05)
    batch = {"x_t": torch.randn(args.batch, *sample_shape(teacher), device=device),
             "timestep": torch.full((args.batch,), 500, device=device),
             "step": torch.zeros(args.batch, dtype=torch.int64, device=device)}
    if cond_shape is not None:
        batch["cond"] = (torch.zeros(args.batch, *cond_shape, dtype=torch.int64, device=device) if cond_dtype == torch.int64
                         else torch.randn(args.batch, *cond_shape, device=device))
    flops_per_second = []
    for block in measured:
        with torch.no_grad(), step_context(student, batch["step"]):
            io = capture_block(student, block.name, batch, want_output=False)
        module = student.get_submodule(block.name)
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-6)

        def step(module=module, io=io, optimizer=optimizer):
            train_step(student, module, io, optimizer, batch["step"])

        step()  # Adam's state exists from here, as in BKD after the first step
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        tracker = _Peak()
        start = time.perf_counter()
        with tracker if device.type == "cpu" else contextlib.nullcontext():
            for _ in range(args.steps):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = tracker.bytes
        seconds = (time.perf_counter() - start) / args.steps
        flops_per_second.append(block.flops["train"] / max(1, distill.iters_per_block) / seconds)
        print(json.dumps({"block": block.name, "batch": args.batch, "planned_step_gib": round(block.step_bytes / GIB, 3),
                          "measured_step_gib": round(peak / GIB, 3),
                          "ratio": round(peak / block.step_bytes, 3) if block.step_bytes else None,
                          "seconds_per_step": round(seconds, 4)}), flush=True)
    tflops = sum(flops_per_second) / len(flops_per_second) / 1e12
    print(f"bench_plan: {args.model} on {device}: BKD block steps ran at {tflops:.3g} TFLOP/s of FP FLOPs "
          f"(pass budget.tflops={tflops:.3g} to time plans with it)")


def train_step(student, module, io, optimizer, steps) -> None:
    """One BKD training step of `module` on its captured inputs `io` (the loss against zeros: its memory and
    time are the MSE loss's)."""
    with step_context(student, steps):
        loss = sum(t.float().pow(2).mean() for t in output_tensors(io.run(module)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


if __name__ == "__main__":
    main()
