"""Evaluate a diffusion model or a quantized student: FID, sFID, IS (and CLIP score) and fidelity to the FP
model from the same noise, every number stamped with its protocol.

    python evaluate.py                                           # (or dq-evaluate) embedded FP model: digits domain metrics, N=1000
    python evaluate.py run=outputs/<date>/<time>_dilatequant_w4a4  # a train.py run's student, + PSNR/SSIM vs FP
    python evaluate.py export=<run dir>/student_int.safetensors    # the integer model of an export (python -m dq.export)
    python evaluate.py eval.num_samples=5000                     # more samples (same first 1000 images)
    python evaluate.py eval=inception eval.reference=digits      # Inception FID/sFID (local TorchScript, offline)
    python evaluate.py eval=cifar10_paper run=DIR trainer=gpu    # the paper's CIFAR-10 protocol (clean-fid, 50k)
    python -m dq.evaluation.sweep multirun/<date>/<time>         # every run of a train.py sweep + report.md
    python evaluate.py trainer=ddp trainer.devices=2             # shard sampling over 2 processes (same images)
    python evaluate.py hydra.run.dir=<old eval dir>              # resume: samples already written are skipped
    python evaluate.py -m run=DIR1,DIR2                          # several runs, one eval dir each

Outputs (in the eval dir): metrics.json (copied into the run dir too), samples/ (one PNG per sample index
and identity.json), samples.npz (arr_0: uint8 [N, H, W, C]), grid.png, logs/. The FP model's samples for
the fidelity metrics are cached under eval.fp_cache_dir and shared by every student of that model.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dq.cli import CONF_DIR, discard_if_untouched, reported_errors, run_hydra_entry
from dq.evaluation.overrides import refuse_ignored_overrides
from dq.evaluation.pipeline import check_config, evaluate

__all__ = ["evaluate"]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with discard_if_untouched(cfg.output_dir), reported_errors():
        check_config(cfg)  # a bad value first, then an override that run= / export= would drop
        refuse_ignored_overrides(HydraConfig.get().overrides.task)
        results = evaluate(cfg)
    if results:
        shown = ", ".join(f"{k} {results[k]:.4g}" for k in ("fid", "sfid", "is", "psnr_vs_fp", "ssim_vs_fp", "clip_score")
                          if isinstance(results.get(k), float))
        protocol = results["protocol"]
        print(f"dq: {results['method']} {results['quant']}: {shown}\n"
              f"dq: {protocol['backend']} backend, N={results['num_samples']}, {protocol['sampler']} "
              f"{protocol['steps']} steps eta {protocol['eta']}, seed {protocol['seed']}; "
              f"{results['seconds']['total']:.0f} s\n"
              f"dq: outputs in {cfg.output_dir} (metrics.json, samples.npz, grid.png)")


def cli() -> None:
    """The `dq-evaluate` command (and `python evaluate.py`): main() with dq's one-line errors."""
    run_hydra_entry(main)


if __name__ == "__main__":
    cli()
