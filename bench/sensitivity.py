"""Which layers' input activations a trained student is most sensitive to: mixed precision by sensitivity.

    python bench/sensitivity.py --run outputs/<date>/<run>                  # rank, and the top 10% / 20%
    python bench/sensitivity.py --run RUN --tuples 1024 --out docs/embedded_dit/sensitivity

Sensitivity of a layer: how much of the student's output error (MSE against the FP model's output on the
run's own calibration tuples: the FP model's trajectories) goes away when that one
layer's input quantizer is switched off, the rest of the student as trained. Every quantized Conv2d /
Linear whose activations are below `promote_bits` is ranked; the script prints the ranking and, for each
fraction, the override that trains a new student with those layers' inputs at `promote_bits`:

    python train.py <the run's overrides> 'quant.promote_layers=[...]'

The ranking is of one trained student (a per-tensor or per-token one); a promoted student is trained anew.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq.bkd.blocks import run_model  # noqa: E402
from dq.calibration import CalibrationDataModule, select_rows  # noqa: E402
from dq.errors import UserError  # noqa: E402
from dq.io import atomic_write  # noqa: E402
from dq.pretrained import load_student  # noqa: E402
from dq.quant import QuantConv2d, QuantLinear, quant_config  # noqa: E402
from dq.zoo import load_model  # noqa: E402


def output_error(student: torch.nn.Module, teacher: torch.nn.Module, tuples: dict[str, torch.Tensor],
                 targets: list[torch.Tensor], batch: int) -> float:
    """Mean squared error of the student's output against the teacher's (`targets`, per chunk)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, start in enumerate(range(0, tuples["x_t"].shape[0], batch)):
            chunk = select_rows(tuples, slice(start, start + batch))
            total += float((run_model(student, chunk).float() - targets[i]).pow(2).sum())
            count += targets[i].numel()
    return total / count


def rank_layers(student: torch.nn.Module, teacher: torch.nn.Module, tuples: dict[str, torch.Tensor],
                batch: int = 64) -> tuple[float, list[dict]]:
    """(the student's output MSE, one row per rankable layer: name, its activation bits, the MSE with its input
    quantizer(s) off, the share of the error that goes away), most sensitive first."""
    promote_bits = quant_config(student).promote_bits
    with torch.no_grad():
        targets = [run_model(teacher, select_rows(tuples, slice(s, s + batch))).float()
                   for s in range(0, tuples["x_t"].shape[0], batch)]
    base = output_error(student, teacher, tuples, targets, batch)
    rows = []
    for name, module in student.named_modules():
        if not isinstance(module, (QuantConv2d, QuantLinear)) or module.act_quantizer.bits >= promote_bits:
            continue
        parts = [module.act_quantizer] + ([module.skip_act_quantizer] if module.skip_act_quantizer else [])
        for part in parts:
            part.enabled = False
        try:
            error = output_error(student, teacher, tuples, targets, batch)
        finally:
            for part in parts:
                part.enabled = True
        rows.append({"layer": name, "act_bits": module.act_quantizer.bits, "mse_without": error,
                     "share": (base - error) / base if base > 0 else 0.0})
    return base, sorted(rows, key=lambda r: r["share"], reverse=True)


def promoted(rows: list[dict], fraction: float) -> list[str]:
    """The first round(fraction · len(rows)) layers of the ranking (at least one for a positive fraction)."""
    count = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    return [r["layer"] for r in rows[:count]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a train.py run directory (its student/ and config)")
    parser.add_argument("--tuples", type=int, default=512, help="calibration tuples to measure on (a seeded subset)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--out", type=Path, default=None, help="write sensitivity.json here")
    args = parser.parse_args(argv)
    config_file = args.run / "config.yaml"
    if not config_file.is_file() or not (args.run / "student").is_dir():
        raise SystemExit(f"sensitivity: error: {args.run} is not a finished train.py run (no config.yaml / student/)")
    torch.manual_seed(0)
    cfg = OmegaConf.load(config_file)
    loaded = load_model(cfg.model)
    student = load_student(args.run / "student")
    data_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"}
    with tempfile.TemporaryDirectory() as scratch:
        if not data_kwargs.get("cache_dir"):
            data_kwargs["cache_dir"] = scratch
        data = CalibrationDataModule(loaded.unet, loaded.scheduler.config, loaded.sampler,
                                     **{**data_kwargs, "progress": False}, **loaded.conditioning.datamodule_kwargs())
        data.setup("fit")
        rows = torch.randperm(data.tuples["x_t"].shape[0], generator=torch.Generator().manual_seed(0))[:args.tuples]
        tuples = {k: v for k, v in select_rows(data.tuples, rows).items() if k in ("x_t", "timestep", "step", "cond")}
    teacher = loaded.unet.eval()
    try:
        base, ranking = rank_layers(student, teacher, tuples)
    except UserError as err:
        raise SystemExit(f"sensitivity: error: {err}") from err
    print(f"student output MSE vs FP on {tuples['x_t'].shape[0]} calibration tuples: {base:.4e}")
    print(f"{'share':>7}  layer (input at A{ranking[0]['act_bits'] if ranking else '-'})")
    for row in ranking:
        print(f"{row['share'] * 100:6.1f}%  {row['layer']}")
    overrides = {}
    for fraction in args.fractions:
        names = promoted(ranking, fraction)
        overrides[str(fraction)] = names
        print(f"\ntop {fraction:.0%} ({len(names)} of {len(ranking)} layers):\n  'quant.promote_layers=[{','.join(names)}]'")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"run": str(args.run), "tuples": int(tuples["x_t"].shape[0]), "mse": base,
                              "layers": ranking, "promote": overrides}, indent=1)
        atomic_write(args.out / "sensitivity.json", lambda tmp: Path(tmp).write_text(payload + "\n"))


if __name__ == "__main__":
    main()
