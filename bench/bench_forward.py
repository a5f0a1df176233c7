"""Forward time of the fake-quantized student against the FP model, side by side in one run.

    python bench/bench_forward.py --arch ddpm_cifar10 --device cuda --batch 64
    python bench/bench_forward.py --arch small --device cpu --batch 8

Fake quantization simulates integer arithmetic in floating point, so the student is SLOWER than the FP
model: this measures by how much. The integer model of an export is compared in bench/bench_int.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.architectures import build, random_inputs  # noqa: E402
from dq.arch import describe  # noqa: E402
from dq.quant import QuantConfig, calibrate_activations, quantize_model, set_step  # noqa: E402
from dq.sampling import unet_forward  # noqa: E402


def _time(model, x, t, cond, repeats: int, device: torch.device) -> float:
    with torch.no_grad():
        for _ in range(2):
            unet_forward(model, x, t, cond)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            unet_forward(model, x, t, cond)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small", help="ddpm_cifar10 | small | ldm_bedroom | ldm_church | ldm_imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    fp = build(args.arch).to(device)
    inputs = {k: v.to(device) for k, v in random_inputs(fp, args.batch, torch.Generator().manual_seed(0)).items()}
    x, cond = inputs["x_t"], inputs.get("cond")
    t = torch.full((args.batch,), 500, device=device, dtype=torch.long)
    student = quantize_model(fp, QuantConfig(weight_bits=4, act_bits=4, num_steps=1, num_groups=1), describe(fp))
    with calibrate_activations(student), torch.no_grad():
        set_step(student, 0)
        unet_forward(student, x, t, cond)
    set_step(student, 0)
    fp_s = _time(fp, x, t, cond, args.repeats, device)
    q_s = _time(student, x, t, cond, args.repeats, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench_forward: arch={args.arch} device={name} batch={args.batch} torch={torch.__version__}")
    print(f"bench_forward: FP {fp_s * 1e3:.2f} ms/forward, fake-quant W4A4 student {q_s * 1e3:.2f} ms/forward, "
          f"student/FP = {q_s / fp_s:.2f}x")


if __name__ == "__main__":
    main()
