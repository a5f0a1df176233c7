"""The schedule-remap table: a student trained for one sampler schedule, sampled with others under each
timestep-keyed TPQ policy, against a student trained for that schedule; PSNR vs the FP model from the same
noise, mean ± std over sampling seeds.

    python train.py hydra.run.dir=runs/ddim25                                   # the student to remap
    python train.py hydra.run.dir=runs/ddim10 model.sampler.num_steps=10 data.num_trajectories=512
    python train.py hydra.run.dir=runs/ddim50 model.sampler.num_steps=50        # ... one per schedule
    python bench/remap_table.py --student runs/ddim25 \\
        --schedule ddim:10=runs/ddim10 ddim:50=runs/ddim50 ddim:100=runs/ddim100 dpm_solver:20=runs/dpm20 \\
        --num-samples 256 --seeds 1 2 3 --out docs/remap_table

Each schedule keeps the trained sampler's spacing and eta and changes its name and step count. Rows:
"exact" (the default policy: refuses, checked), "nearest", "interpolate" (the 25-step student remapped),
"trained" (the student of --schedule's run, on its own schedule). Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq.arch import describe  # noqa: E402
from dq.metrics import mse, psnr  # noqa: E402
from dq.quant import load_quant_state, timestep_keying  # noqa: E402
from dq.sampling import SamplerConfig, key_by_trained_sampler, planned_timesteps, sample  # noqa: E402
from dq.zoo import load_model, to_images  # noqa: E402

POLICIES = ("nearest", "interpolate")


def load_run_student(run: Path, policy: str = "exact"):
    """(loaded FP model and trained sampler, the run's student keyed by its trained timesteps)."""
    cfg = OmegaConf.load(run / "config.yaml")
    loaded = load_model(cfg.model)
    student = load_quant_state(loaded.unet, run / "student.safetensors", describe(loaded.unet), tpq_policy=policy)
    return loaded, cfg, key_by_trained_sampler(student, loaded.scheduler.config, loaded.sampler, policy).eval()


def parse_schedule(text: str) -> tuple[str, int, Path]:
    spec, sep, run = text.partition("=")
    name, _, steps = spec.partition(":")
    if not sep or not steps.isdigit():
        raise SystemExit(f"remap_table: error: --schedule takes NAME:STEPS=RUN_DIR, got {text!r}")
    return name, int(steps), Path(run)


def fidelity(unet, loaded, sampler: SamplerConfig, fp_images: torch.Tensor, components, num: int, seed: int
             ) -> tuple[float, float]:
    images = to_images(components, sample(unet, loaded.scheduler.config, sampler, num, seed=seed, batch_size=256,
                                          progress=False))
    return psnr(images, fp_images), mse(images, fp_images)


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, required=True, help="the train.py run dir of the student to remap")
    parser.add_argument("--schedule", nargs="+", required=True, help="NAME:STEPS=RUN_DIR of a student trained for it")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    loaded, cfg, _ = load_run_student(args.student)
    components = loaded.components
    trained = loaded.sampler
    rows = []
    schedules = [(trained.name, trained.num_steps, args.student)] + [parse_schedule(s) for s in args.schedule]
    for name, steps, run in schedules:
        sampler = SamplerConfig.from_mapping({**trained.to_dict(), "name": name, "num_steps": steps})
        own = (name, steps) == (trained.name, trained.num_steps)
        students = {"trained": load_run_student(run)[2]}
        if not own:
            for policy in POLICIES:
                students[policy] = load_run_student(args.student, policy)[2]
            exact = load_run_student(args.student, "exact")[2]
            try:
                timestep_keying(exact).check_schedule(planned_timesteps(loaded.scheduler.config, sampler))
                refused = False
            except ValueError:
                refused = True
            rows.append({"schedule": f"{name} {steps}", "policy": "exact", "refused": refused})
        scores: dict[str, dict[str, list[float]]] = {k: {"psnr": [], "mse": []} for k in students}
        start = time.perf_counter()
        for seed in args.seeds:
            fp_images = to_images(components, sample(loaded.unet, loaded.scheduler.config, sampler, args.num_samples,
                                                     seed=seed, batch_size=256, progress=False))
            for key, unet in students.items():
                p, m = fidelity(unet, loaded, sampler, fp_images, components, args.num_samples, seed)
                scores[key]["psnr"].append(p)
                scores[key]["mse"].append(m)
        for key, values in scores.items():
            row = {"schedule": f"{name} {steps}", "policy": key if not own else "trained (own schedule)",
                   "student": str(run if key == "trained" else args.student),
                   "psnr": summary(values["psnr"]), "mse": summary(values["mse"])}
            rows.append(row)
            print(f"remap_table: {row['schedule']:16s} {row['policy']:22s} PSNR {row['psnr']['mean']:.2f} ± "
                  f"{row['psnr']['std']:.2f} dB  MSE {row['mse']['mean']:.5f}", flush=True)
        print(f"remap_table: {name} {steps}: {time.perf_counter() - start:.0f} s", flush=True)
    protocol = {"num_samples": args.num_samples, "seeds": args.seeds, "trained_sampler": trained.to_dict(),
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "images": "final samples clamped to [-1, 1], PSNR per image averaged, vs the FP model from the same noise"}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
        lines = ["| schedule | student / policy | PSNR vs FP (dB) | MSE vs FP |", "|---|---|---|---|"]
        for row in rows:
            if "refused" in row:
                lines.append(f"| {row['schedule']} | {trained.num_steps}-step student, exact | "
                             f"{'refused (one-line error)' if row['refused'] else 'NOT refused'} | |")
                continue
            who = row["policy"] if row["policy"].startswith("trained") else f"{trained.num_steps}-step student, {row['policy']}"
            if row["policy"] == "trained":
                who = "student trained for this schedule"
            lines.append(f"| {row['schedule']} | {who} | {row['psnr']['mean']:.2f} ± {row['psnr']['std']:.2f} | "
                         f"{row['mse']['mean']:.5f} ± {row['mse']['std']:.5f} |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"remap_table: wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
