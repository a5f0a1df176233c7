"""The experiment tracker of one job: the configured Lightning logger (conf/logger), opened when the job starts
and closed when it ends, also when it fails, so that each job of a `-m` sweep is its own W&B run (Lightning's
WandbLogger would otherwise reuse the first job's run for every later one).

    with job_tracker(cfg, "train") as tracker:            # dq.jobs.train
        L.Trainer(logger=tracker.logger, ...).fit(...)    # per-block losses, TPQ ranges
        tracker.log_results(results, {"samples": out_dir / "samples.png"})

With logger=wandb the run is named <model>_<method>_<quant>_s<seed> (logger.name overrides it), grouped by the
sweep dir of a `-m` sweep (logger.group overrides it), has the resolved config as its config, the job's final
figures in its summary and samples.png as an image. WANDB_MODE=offline writes it under <output_dir>/wandb for a
later `wandb sync`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


def model_label(model_cfg: Mapping[str, Any]) -> str:
    """A short name of the model config: embedded / embedded_dit, the hub repo's name, a local folder's name."""
    source = model_cfg.get("source")
    if source == "embedded":
        embedded = model_cfg.get("embedded")
        return "embedded" if embedded in (None, "unet") else f"embedded_{embedded}"
    if source == "hub" and model_cfg.get("repo_id"):
        return str(model_cfg["repo_id"]).rsplit("/", 1)[-1]
    if model_cfg.get("path"):
        return Path(str(model_cfg["path"])).name
    return str(source)


def run_name(cfg: DictConfig) -> str:
    """<model>_<method>_<quant>_s<seed>, e.g. embedded_dilatequant_w4a4_s0 (evaluate.py: the eval seed)."""
    seed = OmegaConf.select(cfg, "seed", default=None)
    if seed is None:
        seed = OmegaConf.select(cfg, "eval.seed", default=None)
    parts = [model_label(cfg.model), cfg.method.name, cfg.quant.name]
    return "_".join(str(p) for p in parts) + ("" if seed is None else f"_s{seed}")


def sweep_group() -> str | None:
    """The W&B group of a `-m` sweep's jobs: the sweep dir's last two parts (multirun/<date>/<time> gives
    <date>/<time>); None outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "/".join(Path(str(HydraConfig.get().sweep.dir)).parts[-2:])


def is_wandb(logger_cfg: Mapping[str, Any]) -> bool:
    """Whether a logger config builds a WandbLogger (its _target_ class, imported but not instantiated)."""
    target = logger_cfg.get("_target_")
    return target is not None and issubclass(hydra.utils.get_class(str(target)), WandbLogger)


def open_logger(cfg: DictConfig, job_type: str) -> Logger | None:
    """The job's Lightning logger from cfg.logger (None for logger=null). A W&B run is created here (rank 0),
    so that a job that fails before logging anything still shows as a failed run."""
    if cfg.get("logger") is None:
        return None
    if not is_wandb(cfg.logger):
        return hydra.utils.instantiate(cfg.logger)
    build = hydra.utils.instantiate(  # partial: the job's config goes in as is (instantiate would build its _target_s)
        cfg.logger, _partial_=True, name=cfg.logger.get("name") or run_name(cfg),
        group=cfg.logger.get("group") or sweep_group(), job_type=job_type)
    logger = build(config=OmegaConf.to_container(cfg, resolve=True))
    _ = logger.experiment  # wandb.init on rank 0; a no-op stand-in on the other ranks
    return logger


def close_logger(logger: Logger | None, status: str) -> None:
    """Finalize the logger; finish a W&B run (exit code 1 unless status is "success")."""
    if logger is None:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish(exit_code=0 if status == "success" else 1)


def final_figures(results: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a results.json / metrics.json (bools and strings left out), one level of nested numbers
    flattened with "/" (prep_seconds/calibration)."""
    figures: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            figures.update({f"{key}/{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            figures[key] = value
    return figures


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class JobTracker:
    """The logger of one job, for its Trainer and its final results."""

    logger: Logger | None

    @rank_zero_only
    def log_results(self, results: Mapping[str, Any], images: Mapping[str, Path]) -> None:
        """The final figures (W&B: the run summary; other loggers: metrics under final/) and the images."""
        if self.logger is None:
            return
        figures = final_figures(results)
        if isinstance(self.logger, WandbLogger):
            self.logger.experiment.summary.update(figures)
        else:
            self.logger.log_metrics({f"final/{k}": v for k, v in figures.items()})
        if hasattr(self.logger, "log_image"):
            for key, path in images.items():
                self.logger.log_image(key=key, images=[str(path)])


@contextlib.contextmanager
def job_tracker(cfg: DictConfig, job_type: str) -> Iterator[JobTracker]:
    """Open the job's logger; close it when the block ends: "success", or "failed" when it raises."""
    logger = open_logger(cfg, job_type)
    try:
        yield JobTracker(logger)
    except BaseException:
        close_logger(logger, "failed")
        raise
    close_logger(logger, "success")
