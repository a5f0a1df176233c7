"""Evaluate every run of a train.py sweep, and the FP model once, then write the ablation report.

    python train.py -m method=ptq_minmax,no_bkd,no_wd,no_tpq,dilatequant quant=w4a4,w6a6,w4a8,w8a8
    python -m dq.evaluation.sweep multirun/<date>/<time>                      # + report.md, fid_vs_bits.png
    python -m dq.evaluation.sweep multirun/<date>/<time> eval.num_samples=2000   # evaluate.py overrides
    python -m dq.evaluation.sweep --fidelity multirun/A multirun/B --out docs/sweep  # mean ± std over seeds
    python -m dq.evaluation.sweep --seeded multirun/<date>/<time>   # each run's own seed, then --fidelity

--fidelity evaluates nothing: it groups the runs' results.json by configuration (all overrides but the
seed) and reports PSNR / SSIM / MSE / KID against the FP model as mean ± std over seeds (report.md and a
plot), with BKD's wall time; see dq.evaluation.seeds.

Each run dir gets `eval/` (evaluate.py's outputs) and a metrics.json copy; the FP model of the runs is
evaluated into `<sweep>/fp_eval/`. Runs that already hold a metrics.json of the same protocol (eval seed
and N) are skipped (pass --force to redo them), so an interrupted sweep evaluation resumes; one evaluated
with another seed or N is evaluated again. All runs must share one model config.

--seeded evaluates each run with its own seed (`eval.seed` = the run's `seed`: new noise for every
calibration draw) and the FP model once per seed (`<sweep>/fp_eval/seed_<S>/`), so that the domain FID of
a configuration can be given as mean ± std over seeds, beside the fidelity figures, by --fidelity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from dq import cli
from dq.errors import MissingFileError, UserError
from dq.evaluation.overrides import refuse_ignored_overrides
from dq.evaluation.pipeline import evaluate
from dq.evaluation.report import write_report
from dq.evaluation.seeds import run_seed, write_seed_report

CONF_DIR = cli.CONF_DIR


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """The train.py run dirs under sweep_dir (those holding student.safetensors and config.yaml), sorted."""
    runs = sorted(p.parent for p in Path(sweep_dir).rglob("student.safetensors") if (p.parent / "config.yaml").is_file())
    if not runs:
        raise UserError(f"no train.py run dirs (student.safetensors + config.yaml) under {sweep_dir}")
    return runs


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def _run_seed(run: Path) -> int:
    seed = run_seed(run, {})
    if seed is None:
        raise UserError(f"{run}/config.yaml has no seed; --seeded needs each run's seed")
    return seed


def _up_to_date(metrics_path: Path, cfg: DictConfig) -> str | None:
    """Why the metrics.json at metrics_path cannot stand for an evaluation under cfg (None: it can).
    Compared: the eval seed and N of its protocol, the two figures a sweep's overrides change."""
    if not metrics_path.is_file():
        return "not evaluated"
    try:
        protocol = json.loads(metrics_path.read_text()).get("protocol") or {}
    except (json.JSONDecodeError, AttributeError):
        return f"{metrics_path} is not a metrics.json (unreadable JSON)"
    wanted = {"seed": int(cfg.eval.seed), "num_samples": int(cfg.eval.num_samples)}
    stale = [f"{k} {protocol.get(k)} (wanted {v})" for k, v in wanted.items() if protocol.get(k) != v]
    return f"evaluated with {', '.join(stale)}" if stale else None


def evaluate_sweep(sweep_dir: Path, overrides: list[str], force: bool = False, metric: str = "fid",
                   seeded: bool = False) -> Path:
    """Evaluate the FP model and every run under sweep_dir (skipping evaluated ones unless force), then
    write the report; returns the path of report.md. seeded: each run with eval.seed = its own seed, and
    the FP model once per seed (fp_eval/seed_<S>)."""
    runs = sweep_runs(sweep_dir)
    models = {OmegaConf.to_yaml(OmegaConf.load(run / "config.yaml").model) for run in runs}
    if len(models) > 1:
        raise UserError(f"the runs under {sweep_dir} use {len(models)} different model configs; evaluate them apart")
    if seeded and any(o.startswith(("eval.seed=", "+eval.seed=")) for o in overrides):
        raise UserError("--seeded sets eval.seed from each run's seed; leave eval.seed out of the overrides")
    # every run, and the FP model they came from, brings its own model: a model.* override would be dropped
    refuse_ignored_overrides([f"run={sweep_dir}", *overrides])
    seeds = {run: _run_seed(run) for run in runs} if seeded else {}
    run_seeds = {run: [f"eval.seed={seeds[run]}"] if seeded else [] for run in runs}
    fp_jobs = ([(Path(sweep_dir) / "fp_eval" / f"seed_{s}", [f"eval.seed={s}"]) for s in sorted(set(seeds.values()))]
               if seeded else [(Path(sweep_dir) / "fp_eval", [])])
    for fp_dir, seed_override in fp_jobs:
        cfg = _compose([f"output_dir={fp_dir}", *overrides, *seed_override])
        reason = "forced" if force else _up_to_date(fp_dir / "metrics.json", cfg)
        if reason is not None:
            with open_dict(cfg):
                cfg.model = OmegaConf.load(runs[0] / "config.yaml").model  # the FP model the students came from
            print(f"dq: evaluating the FP model -> {fp_dir} ({reason})")
            evaluate(cfg)
    for index, run in enumerate(runs, 1):
        cfg = _compose([f"run={run}", f"output_dir={run / 'eval'}", *overrides, *run_seeds[run]])
        reason = "forced" if force else _up_to_date(run / "metrics.json", cfg)
        if reason is None:
            print(f"dq: [{index}/{len(runs)}] {run} already evaluated")
            continue
        print(f"dq: [{index}/{len(runs)}] evaluating {run} ({reason})")
        evaluate(cfg)
    if seeded:
        return write_seed_report([Path(sweep_dir)], Path(sweep_dir))
    return write_report([Path(sweep_dir)], Path(sweep_dir), metric)


@cli.entry
def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="evaluate.py overrides, e.g. eval.num_samples=2000; with "
                        "--fidelity, more sweep dirs")
    parser.add_argument("--force", action="store_true", help="re-evaluate runs that already hold a metrics.json of the same protocol")
    parser.add_argument("--metric", default="fid", help="the report's table and plot metric")
    parser.add_argument("--fidelity", action="store_true", help="no evaluate.py: group the runs' results.json by "
                        "configuration and report fidelity to FP as mean ± std over seeds (dq.evaluation.seeds)")
    parser.add_argument("--seeded", action="store_true", help="evaluate each run with its own seed and the FP model "
                        "once per seed, then write the report over seeds (domain FID as mean ± std)")
    parser.add_argument("--out", type=Path, default=None, help="--fidelity: the report's dir (default: the sweep dir)")
    args = parser.parse_args(argv)
    if args.fidelity:
        roots = [args.sweep_dir, *map(Path, args.overrides)]
        missing = [str(r) for r in roots if not r.is_dir()]
        if missing:
            raise MissingFileError(f"{missing[0]} is not a directory")
        path = write_seed_report(roots, args.out or args.sweep_dir)
        print(path.read_text())
        print(f"report -> {path}")
        return
    path = evaluate_sweep(args.sweep_dir, args.overrides, args.force, args.metric, args.seeded)
    print(path.read_text())
    print(f"report -> {path}")


if __name__ == "__main__":
    main()
