"""The end-to-end stage alone, on a finished run's student: load its student.safetensors, distil the whole
student on the model output for --iters iterations at the given learning rates (the units of
method.distill.end_to_end_lr_*), and print its fidelity to the FP model before and after (the run's own
256-sample protocol and noise seed).

    python bench/end_to_end_screen.py RUN_DIR --iters 300 --lr-weights 3e-5 --lr-quant 3e-4 \
        --lr-zero-point 3e-3 --out /tmp/screen [--before]

This is how the stage's learning rates were screened (README, "How the defaults were chosen"): one BKD
student per seed, several stages on each, without retraining the blocks. Extra Hydra overrides after `--`
go to the run's config (they must match how RUN_DIR was trained, e.g. `quant=w6a6`). The stage's batches
differ from the ones train.py draws for it (they are keyed by the block's position), so the figures are a
screen, not train.py's figure for the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq.errors import UserError  # noqa: E402
from dq.jobs import train  # noqa: E402
from dq.quant.state import load_quant_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished train.py run dir (student.safetensors, config.yaml)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--lr-weights", type=float, default=3e-5)
    parser.add_argument("--lr-quant", type=float, default=3e-4)
    parser.add_argument("--lr-zero-point", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--before", action="store_true", help="also measure the student before the stage")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run's config")
    args = parser.parse_args()
    state, config = args.run / "student.safetensors", args.run / "config.yaml"
    if not state.is_file() or not config.is_file():
        raise UserError(f"{args.run} is not a finished train.py run (student.safetensors and config.yaml)")
    seed = int(OmegaConf.load(config).seed)
    overrides = [
        f"seed={seed}", "progress_bar=false", f"output_dir={args.out}", "method.distill.whole_model=true",
        "method.distill.end_to_end_iters=0", f"method.distill.iters_per_block={args.iters}",
        f"method.distill.lr_weights={args.lr_weights}", f"method.distill.lr_quant={args.lr_quant}",
        f"method.distill.lr_zero_point={args.lr_zero_point}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    job = train.prepare(cfg, time.perf_counter())
    load_quant_state(job.distiller.student, state)
    job.distiller.state.initialized = [True]  # every quantizer was initialised in its block
    args.out.mkdir(parents=True, exist_ok=True)
    before = train.fidelity(cfg, job.model, job.distiller.student, args.out) if args.before else None
    started = time.perf_counter()
    train.make_trainer(cfg, args.out, 1).fit(job.distiller)
    seconds = time.perf_counter() - started
    after = train.fidelity(cfg, job.model, job.distiller.student.cpu(), args.out)
    rates = {"lr_weights": args.lr_weights, "lr_quant": args.lr_quant, "lr_zero_point": args.lr_zero_point}
    print(json.dumps({"run": str(args.run), "seed": seed, "iters": args.iters, **rates,
                      "stage_seconds": round(seconds, 1), "before": before, "after": after}))


if __name__ == "__main__":
    main()
