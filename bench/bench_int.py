"""Forward time and memory of the FP model, the fake-quant student and the integer model, side by side.

    python bench/bench_int.py                                                  # CPU: embedded + ddpm_cifar10, batch 1/8/64
    python bench/bench_int.py --arch ddpm_cifar10 --batch 8 --bits w8a8,w4a4   # the issue's target row
    python bench/bench_int.py --device cuda                                    # GPU: FP16, BF16, compiled, CUDA graphs;
                                                                               # integer auto (gemm), triton, fp8
    python bench/bench_int.py --arch ddpm_cifar10 --batch 8 --profile          # + where the integer forward's time goes

Every variant of one architecture runs in this one process, alternating, after warm-ups: the ratios are
measured side by side. Students are quantized with the project's policy (conv_in/conv_out and the softmax
at 8 bits) and TPQ tables for one step, calibrated on random inputs; the integer model is built from the
student's export (float parts in float32, the default). `embedded` is the shipped digits model; `ddpm_cifar10` and
`small` (and `tiny`, for tests) have random weights (timing does not depend on them). The baselines are what a user of the device
runs instead (`fp_baselines`: on the CPU FP32 and BF16 channels-last, eager and compiled with freezing, BF16
compiled only where the CPU runs bfloat16 natively; on
a GPU FP16 and BF16, eager, compiled and with CUDA graphs). Rows: ms per forward (median of --repeats), the
speed-up against the fastest of those baselines at that batch, and against FP32 eager. On the CPU the integer
models also run compiled (`dq.export.compile_int_model`, float32 glue the default, and bfloat16 glue). Memory: on CUDA the peak allocated during one forward (torch.cuda); on the
CPU the bytes the model's weights take in memory (peak RSS is per process and cannot separate variants).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.architectures import build, random_inputs  # noqa: E402
from dq.arch import describe  # noqa: E402
from dq.export import compile_int_model, export_student, load_int_model  # noqa: E402
from dq.export.backends import why_unusable  # noqa: E402
from dq.export.compiled import native_bf16  # noqa: E402
from dq.quant import QuantConfig, calibrate_activations, quantize_model, set_step  # noqa: E402
from dq.sampling import unet_forward  # noqa: E402

BITS = {"w8a8": (8, 8), "w8a7": (8, 7), "w4a8": (4, 8), "w6a6": (6, 6), "w4a4": (4, 4)}


def build_fp(arch: str) -> torch.nn.Module:
    if arch == "embedded":
        from omegaconf import OmegaConf

        from dq.zoo import load_model

        return load_model(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/embedded.yaml")).unet
    return build(arch)


def student_and_int(fp: torch.nn.Module, bits: tuple[int, int], x: torch.Tensor, device: torch.device, folder: Path,
                    backend: str = "auto", weight_zero_point: str = "learned"):
    config = QuantConfig(weight_bits=bits[0], act_bits=bits[1], num_steps=1, num_groups=1,
                         weight_zero_point=weight_zero_point)
    student = quantize_model(fp, config, describe(fp))
    t = torch.full((x.shape[0],), 500)
    with calibrate_activations(student), torch.no_grad():
        set_step(student, 0)
        unet_forward(student, x, t)
    path = export_student(student, folder / f"w{bits[0]}a{bits[1]}.safetensors", [500])
    integer = load_int_model(path, device=device, backend=backend)
    set_step(student, 0)
    set_step(integer, 0)
    return student.to(device), integer, path.stat().st_size


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a model holds for its weights (integer kernels: one byte a weight and copy)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return total + sum(m.unregistered_bytes for m in model.modules() if hasattr(m, "unregistered_bytes"))


def time_variants(variants: dict, x: torch.Tensor, t: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Median ms per forward of each variant, the variants interleaved (each repeat runs all of them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in variants}
    with torch.no_grad():
        for model, inputs in variants.values():  # warm-up
            for _ in range(2):
                unet_forward(model, inputs(x), t)
        for _ in range(repeats):
            for name, (model, inputs) in variants.items():
                sync()
                start = time.perf_counter()
                unet_forward(model, inputs(x), t)
                sync()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory_mb(model, inputs, x, t) -> float | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        unet_forward(model, inputs(x), t)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def profile_ops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, top: int = 12) -> list[tuple[str, float]]:
    """The ops taking the most self time in one forward: (name, share of the forward's total self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with torch.no_grad():
        unet_forward(model, x, t)
        with profile(activities=activities) as prof:
            unet_forward(model, x, t)
    attr = "self_device_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr)) for e in prof.key_averages()]
    total = sum(v for _, v in events) or 1.0
    return [(name, value / total) for name, value in sorted(events, key=lambda e: -e[1])[:top]]


def fp_baselines(fp: torch.nn.Module, arch: str, device: torch.device, compiled: bool) -> dict:
    """{name: (model, input transform)} of the non-quantized variants a user of `device` would run: FP32
    eager; on the CPU FP32 and BF16 channels-last, on a GPU FP16 and BF16; with `compiled`, the same under
    torch.compile (Inductor, with freezing: weights folded as constants, as for deployment), and on a GPU
    BF16 with CUDA graphs (mode reduce-overhead)."""
    same = lambda x: x  # noqa: E731

    def copy_of(dtype: torch.dtype, channels_last: bool = False) -> torch.nn.Module:
        model = build_fp(arch).eval()
        model.load_state_dict(fp.state_dict())
        model = model.to(device, dtype)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def cast(dtype: torch.dtype, channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return lambda x: x.to(dtype).contiguous(memory_format=fmt)

    variants = {"fp32": (fp.to(device), same)}
    settings = ((("fp32 channels-last", torch.float32), ("bf16 channels-last", torch.bfloat16)) if device.type == "cpu"
                else (("fp16", torch.float16), ("bf16", torch.bfloat16)))
    for name, dtype in settings:
        channels_last = device.type == "cpu"
        variants[name] = (copy_of(dtype, channels_last), cast(dtype, channels_last))
    if compiled:
        torch._inductor.config.freezing = True  # inference: parameters become constants Inductor can fold
        for name, dtype in settings:
            channels_last = device.type == "cpu"
            if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16():
                # emulated: on a 2-core AVX2 EPYC compiled BF16 was 8x slower than compiled FP32, no faster than
                # eager BF16 (docs/benchmarks.md), and its compile and forwards took minutes
                print("bench_int: compiled bf16 left out: this CPU emulates bfloat16 (eager bf16 channels-last shows it)")
                continue
            model = copy_of(dtype, channels_last)
            model.compile()
            variants[f"compiled {name}"] = (model, cast(dtype, channels_last))
        if device.type == "cuda":
            model = copy_of(torch.bfloat16)
            model.compile(mode="reduce-overhead")
            variants["compiled bf16 CUDA graphs"] = (model, cast(torch.bfloat16, False))
    return variants


def bench_arch(arch: str, args, device: torch.device, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    fp = build_fp(arch).eval()
    calib = random_inputs(fp, 8, torch.Generator().manual_seed(0))["x_t"]
    same = lambda x: x  # noqa: E731
    variants = fp_baselines(fp, arch, device, args.compiled)
    baselines = list(variants)
    sizes = {}
    for name in args.bits.split(","):
        student, integer, size = student_and_int(fp.cpu(), BITS[name], calib, device, folder,
                                                 weight_zero_point=args.weight_zero_point)
        fp.to(device)
        variants[f"fake-quant {name}"] = (student, same)
        variants[f"integer {name}"] = (integer, same)
        sizes[name] = size
        if args.compiled and device.type == "cpu":  # the integer model under Inductor (dq.export.compile_int_model)
            for glue in ("fp32", "bf16") if native_bf16() else ("fp32",):  # emulated bf16 glue: refused
                copy = student_and_int(fp.cpu(), BITS[name], calib, device, folder,
                                       weight_zero_point=args.weight_zero_point)[1]
                suffix = "" if glue == "fp32" else " (bf16 glue)"
                variants[f"integer {name} compiled{suffix}"] = (compile_int_model(copy, glue), same)
                sizes[f"{name} compiled{suffix}"] = size
        for backend in [b for b in args.backends.split(",") if b]:  # the auto choice is "integer {name}"
            if why_unusable(backend, device) is not None:
                print(f"bench_int: skipped the {backend} backend: {why_unusable(backend, device)}")
                continue
            variants[f"integer {name} {backend}"] = (student_and_int(fp.cpu(), BITS[name], calib, device, folder,
                                                                     backend, args.weight_zero_point)[1], same)
            sizes[f"{name} {backend}"] = size
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        x = random_inputs(fp, batch, torch.Generator().manual_seed(1))["x_t"].to(device)
        t = torch.full((batch,), 500, device=device)
        ms = time_variants(variants, x, t, args.repeats, device)
        best = min(baselines, key=lambda name: ms[name])  # the fastest non-quantized variant
        for name, value in ms.items():
            model, inputs = variants[name]
            rows.append({"arch": arch, "batch": batch, "variant": name, "ms": round(value, 2),
                         "speedup_vs_fp32": round(ms["fp32"] / value, 2), "best_baseline": best,
                         "speedup_vs_best_baseline": round(ms[best] / value, 2),
                         "weight_mb": round(weight_bytes(model) / 2**20, 2),
                         "peak_forward_mb": peak_memory_mb(model, inputs, x, t)})
            if name.startswith("integer"):
                rows[-1]["export_mb"] = round(sizes[name.removeprefix("integer ")] / 2**20, 3)
                if args.profile and batch == int(args.batch.split(",")[-1]):
                    ops = profile_ops(model, x, t)
                    rows[-1]["top_ops"] = [[op, round(share, 4)] for op, share in ops]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="embedded,ddpm_cifar10", help="comma list of embedded | ddpm_cifar10 | small | tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="1,8,64", help="comma list of batch sizes")
    parser.add_argument("--bits", default="w8a8,w4a4", help=f"comma list of {sorted(BITS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weight-zero-point", default="learned", choices=("learned", "centred"),
                        help="the students' QuantConfig.weight_zero_point (centred: 8-bit weights need no shift)")
    parser.add_argument("--backends", default=None,
                        help="comma list of integer backends to time beside `auto` (default: triton,fp8 on a GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--no-compile", dest="compiled", action="store_false",
                        help="skip the torch.compile baselines (their compilation takes minutes on a small CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where an integer forward spends its time (largest batch, top ops)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.backends is None:
        args.backends = "triton,fp8" if device.type == "cuda" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench_int: device={name} torch={torch.__version__} repeats={args.repeats} "
          f"weight_zero_point={args.weight_zero_point}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch.split(","):
            arch_rows = bench_arch(arch, args, device, Path(folder))
            for row in arch_rows:
                memory = f"{row['peak_forward_mb']:.1f} MB peak" if row["peak_forward_mb"] is not None else ""
                export = f", export {row['export_mb']:.3f} MB" if "export_mb" in row else ""
                print(f"bench_int: {row['arch']:12s} batch {row['batch']:3d} {row['variant']:28s} {row['ms']:9.2f} ms "
                      f"{row['speedup_vs_best_baseline']:5.2f}x vs {row['best_baseline']} (fastest non-quantized), "
                      f"{row['speedup_vs_fp32']:5.2f}x vs fp32, weights {row['weight_mb']:.2f} MB{export} {memory}")
                for op, share in row.get("top_ops", []):
                    print(f"bench_int:     {share * 100:5.1f}% {op}")
            rows += arch_rows
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
