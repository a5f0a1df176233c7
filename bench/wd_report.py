"""What Weight Dilation does to each quantized layer of a model (docs/method.md §2), measured.

    python bench/wd_report.py                                  # the embedded model, W4A4 -> docs/wd_report.{md,json}
    python bench/wd_report.py --model conf/model/embedded_dit.yaml --out docs/embedded_dit   # the embedded DiT
    python bench/wd_report.py --model conf/model/ddpm_cifar10.yaml --tuples 512 --out /tmp/wd

Per quantized Conv2d / Linear of the student: the input channels whose factor s is 1 (the channels that
hold some row's max or min, or are all zero), the median and largest s, and what s does to the input
range the per-tensor activation quantizer has to cover: per sampling step, range(X / s) / range(X) over
calibration tuples drawn from the FP model's own trajectories (with min-max initialisation this ratio is
the change of that step's Δ_x; below 1 means a finer activation grid). A layer with a skip split
(concatenated inputs quantized apart) reports the mean over its two quantizers.

A second table sums the layers up by family: the layer's name without its list indices and block-list
prefix (transformer_blocks.3.ff.net.2 -> ff.net.2; down_blocks.1.resnets.0.conv1 -> resnets.conv1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq.arch import describe  # noqa: E402
from dq.bkd.blocks import run_model  # noqa: E402
from dq.calibration import CalibrationDataModule, select_rows  # noqa: E402
from dq.io import atomic_write  # noqa: E402
from dq.quant import QuantConfig, QuantConv2d, QuantLinear, quantize_model  # noqa: E402
from dq.sampling import planned_timesteps  # noqa: E402
from dq.zoo import load_model  # noqa: E402


def input_ranges(teacher: torch.nn.Module, names: list[str], tuples: dict[str, torch.Tensor], num_steps: int,
                 scales: dict[str, torch.Tensor], splits: dict[str, int | None], batch: int = 128) -> dict:
    """Per layer and quantizer part: [steps] ranges of X and of X / s over the tuples (FP path)."""
    lo = {n: torch.full((2, 2, num_steps), float("inf")) for n in names}  # [X | X/s][part][step]
    hi = {n: torch.full((2, 2, num_steps), -float("inf")) for n in names}

    def hook_for(name: str, axis: int):
        def hook(module, args):
            x, steps = args[0].detach(), current["step"]
            s = scales[name].reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
            split = splits[name]
            for variant, value in enumerate((x, x / s)):
                parts = [value] if split is None else list(torch.split(value, [split, value.shape[axis] - split], axis))
                for part_index, part in enumerate(parts):
                    flat = part.reshape(part.shape[0], -1)
                    for step in steps.unique().tolist():
                        rows = flat[steps == step]
                        lo[name][variant, part_index, step] = min(lo[name][variant, part_index, step], rows.min())
                        hi[name][variant, part_index, step] = max(hi[name][variant, part_index, step], rows.max())
        return hook

    current: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = teacher.get_submodule(name)
        handles.append(module.register_forward_pre_hook(hook_for(name, 1 if isinstance(module, torch.nn.Conv2d) else -1)))
    try:
        with torch.no_grad():
            for start in range(0, tuples["x_t"].shape[0], batch):
                chunk = select_rows(tuples, slice(start, start + batch))
                current["step"] = chunk["step"]
                run_model(teacher, chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {n: (hi[n] - lo[n]) for n in names}


def layer_rows(student: torch.nn.Module, ranges: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, module in student.named_modules():
        if not isinstance(module, (QuantConv2d, QuantLinear)):
            continue
        s = module.wd_scale.float()
        span = ranges[name]  # [variant, part, step]
        parts = 1 if module.split_at is None else 2
        ratio = (span[1, :parts] / span[0, :parts].clamp_min(1e-12)).mean().item()
        rows.append({
            "layer": name, "kind": type(module).__name__.removeprefix("Quant"),
            "shape": list(module.weight.shape), "ones": round(float((s == 1).float().mean()), 4),
            "median_s": round(float(s.median()), 4), "max_s": round(float(s.max()), 3),
            "delta_x_ratio": round(ratio, 4),
        })
    return rows


def family(layer: str) -> str:
    """The layer family: its name without the indices into module lists (a number after a plural name:
    blocks.3, resnets.0) and without a leading `*_blocks` list name; other numbers stay (ff.net.2)."""
    parts = layer.split(".")
    kept = [p for i, p in enumerate(parts) if not (p.isdigit() and i > 0 and parts[i - 1].endswith("s"))]
    if len(kept) > 1 and kept[0].endswith("_blocks"):
        kept = kept[1:]
    return ".".join(kept)


def family_rows(rows: list[dict]) -> list[dict]:
    """Per family (in order of first appearance): layer count, median share of s = 1, median of the layers'
    median s, largest s, median and smallest Δ_x ratio."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(family(row["layer"]), []).append(row)
    return [{
        "family": name, "layers": len(members),
        "ones": round(statistics.median(r["ones"] for r in members), 4),
        "median_s": round(statistics.median(r["median_s"] for r in members), 4),
        "max_s": round(max(r["max_s"] for r in members), 3),
        "delta_x_ratio": round(statistics.median(r["delta_x_ratio"] for r in members), 4),
        "min_delta_x_ratio": round(min(r["delta_x_ratio"] for r in members), 4),
    } for name, members in groups.items()]


def render(rows: list[dict], header: dict) -> str:
    ones = [r["ones"] for r in rows]
    ratios = [r["delta_x_ratio"] for r in rows]
    lines = [
        "# Weight Dilation per layer", "",
        f"Model `{header['model']}`, W{header['weight_bits']}A{header['act_bits']}, {header['tuples']} calibration "
        f"tuples from {header['trajectories']} FP trajectories ({header['steps']} steps, seed {header['seed']}). "
        f"Command: `{header['command']}`.", "",
        f"Over the {len(rows)} quantized layers: channels with s = 1: median {statistics.median(ones):.1%} "
        f"(min {min(ones):.1%}, max {max(ones):.1%}); Δ_x ratio range(X/s)/range(X): median "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}).", "",
        "## Per layer family", "",
        "| family | layers | s = 1 (median) | median s (median) | max s | Δ_x ratio (median) | Δ_x ratio (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in family_rows(rows):
        lines.append(f"| {f['family']} | {f['layers']} | {f['ones']:.1%} | {f['median_s']:.3f} | {f['max_s']:.2f} | "
                     f"{f['delta_x_ratio']:.3f} | {f['min_delta_x_ratio']:.3f} |")
    lines += ["", "## Per layer", "",
              "| layer | kind | weight shape | s = 1 | median s | max s | Δ_x ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['kind']} | {'×'.join(map(str, r['shape']))} | {r['ones']:.1%} | "
                     f"{r['median_s']:.3f} | {r['max_s']:.2f} | {r['delta_x_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "conf" / "model" / "embedded.yaml")
    parser.add_argument("--quant", type=Path, default=ROOT / "conf" / "quant" / "w4a4.yaml")
    parser.add_argument("--tuples", type=int, default=1024)
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    model_cfg, q = OmegaConf.load(args.model), OmegaConf.load(args.quant)
    loaded = load_model(model_cfg)
    steps = len(planned_timesteps(loaded.scheduler.config, loaded.sampler))
    config = QuantConfig(weight_bits=q.weight_bits, act_bits=q.act_bits, first_layer_bits=q.first_layer_bits,
                         last_layer_bits=q.last_layer_bits, modulation_bits=q.get("modulation_bits"),
                         softmax_bits=q.softmax_bits, num_steps=steps,
                         num_groups=steps, weight_dilation=True, weight_init="minmax", act_init="minmax")
    student = quantize_model(loaded.unet, config, describe(loaded.unet))
    with tempfile.TemporaryDirectory() as cache:
        data = CalibrationDataModule(loaded.unet, loaded.scheduler.config, loaded.sampler, num_samples=args.tuples,
                                     num_trajectories=args.trajectories, seed=args.seed, cache_dir=cache,
                                     **loaded.conditioning.datamodule_kwargs())
        data.setup("fit")
        tuples = {k: v for k, v in data.tuples.items() if k in ("x_t", "timestep", "step", "cond")}
    layers = [n for n, m in student.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    scales = {n: student.get_submodule(n).wd_scale for n in layers}
    splits = {n: student.get_submodule(n).split_at for n in layers}
    rows = layer_rows(student, input_ranges(loaded.unet, layers, tuples, steps, scales, splits))
    header = {"model": args.model.stem, "weight_bits": q.weight_bits,
              "act_bits": q.act_bits, "tuples": args.tuples, "trajectories": args.trajectories, "steps": steps,
              "seed": args.seed, "command": ("python bench/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:])).strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(rows, header)
    atomic_write(args.out / "wd_report.md", lambda tmp: Path(tmp).write_text(text))
    payload = json.dumps({**header, "families": family_rows(rows), "layers": rows}, indent=1)
    atomic_write(args.out / "wd_report.json", lambda tmp: Path(tmp).write_text(payload + "\n"))
    print(text)


if __name__ == "__main__":
    main()
