"""Cost of DilateQuant's block-wise training against end-to-end QAT, measured side by side in one run.

    python bench/bench_bkd.py --arch ddpm_cifar10 --device cuda --iters 50                # a GPU
    python bench/bench_bkd.py --arch small --device cpu --iters 5 --samples 128 --steps 10   # CPU, small scale

For BKD it trains every block (or the first --blocks) for --iters iterations each (batch --batch), timing every
iteration and each block's preparation (input/target cache + quantizer initialisation); for QAT it trains
the whole student as one block for --iters iterations. It prints time per iteration, the time extrapolated
to the paper's schedule (5,000 iterations per block, every block; QAT: --qat-total-iters iterations), and
peak memory (GPU: torch.cuda.max_memory_allocated; CPU: not measured). Weights are random (timing does not
depend on them); calibration inputs are random tensors of the model's input shape.

The GPU-scale options of DistillConfig apply to both sides: --cache-device (cpu | cuda | cuda:N | auto),
--teacher-precision (fp32 | bf16 autocast of the teacher's targets) and --compile (torch.compile of the block
being trained; the first iteration of each block, which compiles it, is then left out of the per-iteration
time and reported as seconds_first_iteration_per_block).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.architectures import build, random_inputs  # noqa: E402
from dq.bkd import (  # noqa: E402
    BlockDistiller,
    DistillConfig,
    TPQRangeLogger,
    candidate_blocks,
)
from dq.quant import QuantConfig  # noqa: E402


class _IterationTimer(L.Callback):
    """Seconds of every training iteration, and whether it was the first of its block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.first_of_block, self._start = device, [], [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._start = time.perf_counter()
        self.first_of_block.append(batch_idx == 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)


def _calibration(unet, num_samples: int, num_steps: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    step = torch.arange(num_samples) % num_steps
    return {
        **random_inputs(unet, num_samples, g),
        "step": step,
        "timestep": (999 - step * (1000 // num_steps)).long(),
    }


def run(args: argparse.Namespace, whole_model: bool) -> dict:
    device = torch.device(args.device)
    unet = build(args.arch)
    config = QuantConfig(weight_bits=4, act_bits=4, num_steps=args.steps, num_groups=args.steps)
    distill = DistillConfig(iters_per_block=args.iters, batch_size=args.batch, capture_batch_size=args.capture_batch,
                            whole_model=whole_model, end_to_end_iters=0, cache_device=args.cache_device,
                            teacher_precision=args.teacher_precision, compile=args.compile)
    distiller = BlockDistiller(unet, config, distill, _calibration(unet, args.samples, args.steps))
    total_blocks = 1 if whole_model else len(candidate_blocks(distiller.student))
    epochs = 1 if whole_model else min(args.blocks or total_blocks, total_blocks)
    timer = _IterationTimer(device)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=epochs,
                        callbacks=[TPQRangeLogger(), timer], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(distiller)
    wall = time.perf_counter() - start
    steady = timer.seconds[min(3, len(timer.seconds) - 1):]  # the first iterations warm up allocators/kernels
    first = [s for s, is_first in zip(timer.seconds, timer.first_of_block) if is_first]
    if args.compile:  # each block compiles at its first iteration: a cost per block, not per iteration
        later = [s for s, is_first in zip(timer.seconds, timer.first_of_block) if not is_first]
        steady = later or steady
    seconds_per_iter = sum(steady) / len(steady)
    prepared = distiller.block_prep_seconds
    prepare = sum(prepared.values()) / max(1, len(prepared))
    if args.compile:
        prepare += sum(first) / len(first) - seconds_per_iter  # compilation, part of each block's preparation
    if whole_model:
        extrapolated = args.qat_total_iters * seconds_per_iter
    else:
        extrapolated = total_blocks * (args.paper_iters * seconds_per_iter + prepare)
    return {
        "method": "qat_full" if whole_model else "dilatequant (BKD)",
        "blocks_total": total_blocks,
        "blocks_measured": epochs,
        "iterations_measured": len(timer.seconds),
        "seconds_per_iteration": round(seconds_per_iter, 5),
        "seconds_preparing_per_block": round(prepare, 3),
        "seconds_first_iteration_per_block": round(sum(first) / len(first), 3),
        "cache_devices": sorted(set(distiller.cache_devices.values())),
        "extrapolated_hours": round(extrapolated / 3600, 3),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "wall_seconds": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small", help="ddpm_cifar10 | small | ldm_bedroom | ldm_church | ldm_imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5, help="iterations measured per block")
    parser.add_argument("--blocks", type=int, default=None,
                        help="BKD blocks measured, in execution order (default: all, so the per-iteration time "
                             "averages over every block rather than the cheap first ones)")
    parser.add_argument("--batch", type=int, default=32, help="paper: 32")
    parser.add_argument("--samples", type=int, default=256, help="calibration tuples (paper: 5,120)")
    parser.add_argument("--capture-batch", type=int, default=128)
    parser.add_argument("--cache-device", default="auto",
                        help="block caches: cpu | cuda | cuda:N | auto (the GPU when the cache fits)")
    parser.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the teacher's targets under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the block being trained")
    parser.add_argument("--steps", type=int, default=100, help="sampling steps T = TPQ groups (paper: 100)")
    parser.add_argument("--paper-iters", type=int, default=5000, help="BKD iterations per block to extrapolate to")
    parser.add_argument("--qat-total-iters", type=int, default=160_000,
                        help="QAT iterations to extrapolate to (default: 5,000 x 32 blocks, same samples seen per layer)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [run(args, whole_model=False), run(args, whole_model=True)]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    options = {"cache_device": args.cache_device, "teacher_precision": args.teacher_precision,
               "compile": args.compile}
    print(f"bench_bkd: arch={args.arch} device={device} batch={args.batch} T={args.steps} "
          f"torch={torch.__version__} " + " ".join(f"{k}={v}" for k, v in options.items()))
    for row in rows:
        print(json.dumps(row))
    bkd, qat = rows
    print(f"bench_bkd: QAT/BKD time per iteration = {qat['seconds_per_iteration'] / bkd['seconds_per_iteration']:.2f}x")
    if bkd["peak_memory_mb"] and qat["peak_memory_mb"]:
        print(f"bench_bkd: QAT/BKD peak memory = {qat['peak_memory_mb'] / bkd['peak_memory_mb']:.2f}x")
    if args.json:
        figures = {"arch": args.arch, "device": device, **options, "rows": rows}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
