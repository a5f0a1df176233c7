"""One 3×3 convolution, integer against float, side by side: how much faster this CPU's oneDNN integer kernels
are than its FP32 (and BF16) ones, layer by layer, before any glue.

    python bench/bench_conv.py                                    # ddpm-cifar10's conv shapes at batch 8
    python bench/bench_conv.py --shapes 64x64x16 --repeats 50     # batch x channels x size, comma list

The integer layer is the export's own kernel (`dq.export.kernels.IntConvKernel`, uint8 codes with a runtime
scale and zero point, weights packed once, float32 out): W4A4 runs in one weight plane everywhere; W8A8 in
two on a CPU whose int8 products saturate int16 (no VNNI), as the exported model does; W8A7 in one. Its time
does not depend on the values, only on the planes. Variants alternate within each round (median of
--repeats per round, the best round). The ratio bounds what a whole model can gain: the glue between the
convolutions (GroupNorm, SiLU, the adds, and the quantize steps the float model does not have) costs the
integer model at least what it costs FP32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq.export.compiled import native_bf16  # noqa: E402
from dq.export.kernels import IntConvKernel, onednn_available  # noqa: E402

DDPM_SHAPES = "8x128x32,8x256x16,8x256x8,8x256x4"
BITS = {"w4a4": (4, 4), "w8a7": (8, 7), "w8a8": (8, 8)}


def conv_variants(batch: int, channels: int, size: int) -> dict:
    """{name: (callable, weight planes or None)} for one channels→channels 3×3 convolution, padding 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, generator=g)
    variants = {"fp32": (lambda: F.conv2d(x, weight, None, 1, 1), None)}
    x16, w16 = x.bfloat16(), weight.bfloat16().contiguous(memory_format=torch.channels_last)
    variants["bf16" if native_bf16() else "bf16 (emulated)"] = (lambda: F.conv2d(x16, w16, None, 1, 1), None)
    for name, (w_bits, a_bits) in BITS.items():
        w8 = torch.randint(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), weight.shape, dtype=torch.int8, generator=g)
        kernel = IntConvKernel(w8, torch.zeros(channels, dtype=torch.int32), torch.full((channels,), 1e-2),
                               [1, 1], [1, 1], [1, 1], "onednn", act_bits=a_bits)
        codes = torch.randint(0, 2**a_bits, x.shape, dtype=torch.uint8, generator=g)
        codes = codes.contiguous(memory_format=torch.channels_last)
        scale, zero = torch.tensor(0.05), torch.tensor(2 ** (a_bits - 1))
        variants[f"int {name}"] = ((lambda k=kernel, c=codes, s=scale, z=zero: k(c, s, z, None)), len(kernel.factors))
    return variants


def time_variants(variants: dict, repeats: int, rounds: int = 3) -> dict[str, float]:
    """ms per call of each variant: the median of `repeats` calls, alternating within a round; the best round."""
    for fn, _ in variants.values():  # warm-up: packing, oneDNN primitive creation
        fn(), fn()
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (fn, _) in variants.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name] = min(best.get(name, float("inf")), statistics.median(times) * 1e3)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DDPM_SHAPES, help="comma list of BATCHxCHANNELSxSIZE")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not onednn_available():
        parser.error("this torch has no oneDNN integer convolution (a CPU build with mkldnn is needed)")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes takes BATCHxCHANNELSxSIZE,...; got {args.shapes!r}")
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes takes BATCHxCHANNELSxSIZE with positive numbers; got {args.shapes!r}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = []
    with torch.no_grad():
        for batch, channels, size in shapes:
            variants = conv_variants(batch, channels, size)
            ms = time_variants(variants, args.repeats)
            macs = batch * channels * channels * 9 * size * size
            for name, value in ms.items():
                planes = variants[name][1]
                rows.append({"shape": f"{batch}x{channels}x{size}", "variant": name, "ms": round(value, 4),
                             "gmac_per_s": round(macs / value / 1e6, 1), "x_fp32": round(ms["fp32"] / value, 2),
                             **({"planes": planes} if planes else {})})
                plane_note = f"  ({planes} weight plane{'s' if planes > 1 else ''})" if planes else ""
                print(f"{rows[-1]['shape']:>11}  {name:16} {value:9.3f} ms  {rows[-1]['gmac_per_s']:7.1f} GMAC/s"
                      f"  {rows[-1]['x_fp32']:5.2f}x fp32{plane_note}")
    return rows


if __name__ == "__main__":
    main()
