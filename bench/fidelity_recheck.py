"""PSNR / MSE of trained students against their FP model under another fidelity protocol than the one
their run used, without retraining: each run's student/ folder is loaded and sampled again.

    python bench/fidelity_recheck.py RUN_DIR [RUN_DIR ...] --num-samples 32 --seed 1234
    python bench/fidelity_recheck.py RUN_DIR [RUN_DIR ...] --num-samples 256   # each run's own noise seed

Every fidelity figure of today's results.json is printed (dq.metrics.fidelity_figures: the PSNR of the mean
MSE, the mean and median per-image PSNR, MSE, SSIM), so runs recorded before a figure existed get it too.

The earlier protocol of train.py (before the 256-sample one) was 32 samples from noise seed 1234 for every
run; this gives that figure for runs trained since. Samples are drawn as train.py draws them (DDIM from the
run's own sampler settings; sample k's noise depends only on (seed, k)).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq.metrics import fidelity_figures  # noqa: E402
from dq.pretrained import load_student  # noqa: E402
from dq.sampling import sample  # noqa: E402
from dq.zoo import load_model, to_images  # noqa: E402


@torch.no_grad()
def recheck(run_dir: Path, num_samples: int, seed: int | None, batch_size: int) -> dict[str, float]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if seed is None:  # the run's own fidelity noise: fidelity.seed, or 1234 + the run's seed (as train.py draws it)
        seed = int(cfg.fidelity.seed) if cfg.fidelity.get("seed") is not None else 1234 + int(cfg.seed)
    loaded = load_model(cfg.model)
    student = load_student(run_dir / "student")
    kwargs = dict(seed=seed, batch_size=batch_size, progress=False)
    teacher_images = sample(loaded.unet, loaded.scheduler.config, loaded.sampler, num_samples, **kwargs)
    student_images = sample(student, loaded.scheduler.config, loaded.sampler, num_samples, **kwargs)
    return fidelity_figures(to_images(loaded.components, student_images), to_images(loaded.components, teacher_images))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: each run's own fidelity seed)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    values = []
    for run in args.runs:
        figures = recheck(run, args.num_samples, args.seed, args.batch_size)
        values.append(figures["psnr_vs_fp"])
        print(json.dumps({"run": str(run), **{k: round(v, 5) for k, v in figures.items()}}))
    if len(values) > 1:
        print(f"PSNR vs FP over {len(values)} runs: {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} dB "
              f"({args.num_samples} samples, noise seed {args.seed if args.seed is not None else 'of each run'})")


if __name__ == "__main__":
    main()
