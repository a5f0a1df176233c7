"""Quantize a diffusion model with DilateQuant (Weight Dilation + TPQ + Block-wise Knowledge Distillation).

    python train.py                                          # (or dq-train) embedded digits model, W4A4, DilateQuant
    python train.py quant=w6a6 method=no_wd                  # another bit-width / an ablation
    python train.py -m quant=w4a4,w6a6 method=dilatequant,no_wd      # a sweep (one run dir each)
    python train.py trainer=ddp trainer.devices=2            # DDP (gloo on CPU, NCCL on GPU)
    python train.py model=local model.path=/dir              # any diffusers model folder
    python train.py hydra.run.dir=<old run dir> ckpt_path=last       # resume an interrupted run

Outputs (in the run dir): student/ (the student as one folder: `dq.load_student(dir)` gives a diffusers UNet,
keyed by timestep, for stock pipelines), student.safetensors (the same quant state + weights, a hard link
into student/; loadable with dq.quant.load_quant_state), config.yaml (resolved), results.json, samples.png
(FP row over student row), tpq_ranges.json, logs/, checkpoints/.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from dq.bkd import (
    BlockCheckpoint,
    BlockDistiller,
    BlockProgressBar,
    DistillConfig,
    TPQRangeLogger,
    training_blocks,
)
from dq.bkd.callbacks import group_ranges
from dq.calibration import CalibrationDataModule, calibration_cache_key
from dq.cli import CONF_DIR, discard_if_untouched, reported_errors, run_hydra_entry
from dq.config_values import config_bool, config_choice, config_int, config_str, known_fields
from dq.io import atomic_write, check_writable_dir, place_file, write_json
from dq.jobs.plan import cond_of_bundle, plan_enabled, plan_job, plan_only
from dq.metrics import fidelity_figures, kernel_distance, to_uint8
from dq.metrics.backends import build_backend
from dq.metrics.kernel import KID_PROTOCOL
from dq.placement import PhaseRecorder, job_device, module_device, recording, trainer_settings
from dq.placement import enter as enter_phase
from dq.placement import finish as finish_phase
from dq.pretrained import STATE_FILE, save_student
from dq.quant import QuantConfig, TemporalActQuantizer, TokenActQuantizer, key_by_timestep
from dq.resume import check_checkpoint, phase, resolve_checkpoint, run_identity
from dq.sampling import planned_timesteps, sample
from dq.sampling.grid import image_grid, write_png
from dq.tracking import job_tracker
from dq.zoo import ModelBundle, load_model, to_images

RESULTS_VERSION = 1
log = logging.getLogger("dq.train")


# what quant.act_granularity / quant.rotation "auto" (the shipped quant configs) give: per-token, rotated Linear
# inputs for a transformer (embedded DiT, W4A4: 26.16 ± 0.19 dB PSNR vs FP against 23.22 ± 0.14 per tensor, 3 seeds,
# at 1.3-1.4x the job time; docs/transformers.md), the paper's per-tensor inputs for a UNet
AUTO_OPTIONS = {True: {"act_granularity": "token", "rotation": True},
                False: {"act_granularity": "tensor", "rotation": False}}


def is_transformer(denoiser: torch.nn.Module | None) -> bool:
    """Whether a denoiser is a diffusion transformer (DiT, PixArt, SD3, Flux, Sana): a token-wise model."""
    return denoiser is not None and "Transformer" in type(denoiser).__name__


def build_quant_config(cfg: DictConfig, num_steps: int, denoiser: torch.nn.Module | None = None) -> QuantConfig:
    """The QuantConfig of a run: every key of `quant` but its name (bit-widths, precision policy), the
    QuantConfig fields of `method` (WD, initialisation, LSQ), and the TPQ groups (method.tpq_groups, null =
    one per step). A key of `quant` that QuantConfig lacks is an error naming it. `act_granularity` and
    `rotation` set to "auto" follow the denoiser (AUTO_OPTIONS; no denoiser: a UNet's)."""
    quant = {k: v for k, v in OmegaConf.to_container(cfg.quant, resolve=True).items() if k != "name"}
    for key, value in AUTO_OPTIONS[is_transformer(denoiser)].items():
        if quant.get(key) == "auto":
            quant[key] = value
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    method = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k in fields}
    groups = num_steps if cfg.method.tpq_groups is None else int(cfg.method.tpq_groups)
    return QuantConfig.from_dict({**quant, **method, "num_steps": num_steps, "num_groups": groups})


def calibration_data(cfg: DictConfig, model: ModelBundle) -> CalibrationDataModule:
    """The calibration DataModule of `cfg.data` for the model and its conditioning (the model config's class
    labels / text embeddings). BlockDistiller loads it in its setup: under DDP the process group exists by
    then, and the ranks share the generation."""
    conditioning = model.conditioning
    extra = conditioning.datamodule_kwargs() if conditioning.is_conditional else {}
    return hydra.utils.instantiate(
        cfg.data, unet=model.unet, scheduler_config=model.scheduler.config, sampler=model.sampler, **extra
    )


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


FEATURE_CHOICES = ("auto", "digits", "inception", "none", None)


def check_config(cfg: DictConfig) -> None:
    """The run's own settings checked before any work (the groups' configs check themselves when built):
    a wrong type or range is a UserError naming the key."""
    config_int(cfg, "seed", minimum=0)
    config_int(cfg, "fidelity.num_samples", minimum=2)
    config_int(cfg, "fidelity.batch_size", minimum=1)
    config_int(cfg, "fidelity.seed", minimum=0, optional=True)
    config_choice(cfg, "fidelity.features", FEATURE_CHOICES)
    config_int(cfg, "checkpoint_every_n_steps", minimum=1)
    config_bool(cfg, "progress_bar")
    config_str(cfg, "ckpt_path", optional=True)
    config_int(cfg, "data.num_samples", minimum=1)
    config_int(cfg, "data.num_trajectories", minimum=1, optional=True)
    config_int(cfg, "method.tpq_groups", minimum=1, optional=True)
    config_int(cfg, "model.sampler.num_steps", minimum=1, optional=True)  # null: the folder's pipeline's
    distill_config(cfg)


def distill_config(cfg: DictConfig) -> DistillConfig:
    return DistillConfig(**known_fields(DistillConfig, OmegaConf.to_container(cfg.method.distill, resolve=True),
                                        "method.distill key(s)"))


def identity_of(cfg: DictConfig, datamodule, quant_config: QuantConfig) -> dict[str, Any]:
    """The run's identity for its checkpoints (dq.resume): hashes the model weights once."""
    identity = datamodule.identity()
    return run_identity(model=identity["model"], calibration_key=calibration_cache_key(identity),
                        quant=quant_config.to_dict(), method=OmegaConf.to_container(cfg.method, resolve=True),
                        seed=cfg.seed)


def fidelity_seed(cfg: DictConfig) -> int:
    """The fidelity samples' noise seed: fidelity.seed, or 1234 + the run's seed when it is null."""
    return int(cfg.fidelity.seed) if cfg.fidelity.get("seed") is not None else 1234 + int(cfg.seed)


@torch.no_grad()
def fidelity(cfg: DictConfig, model: ModelBundle, student: torch.nn.Module, out_dir: Path) -> dict[str, float]:
    """FP teacher and student sample from the same noise (and conditioning: sample k gets class / prompt
    k % P); MSE, PSNR and SSIM of the final images (decoded by the FP VAE for a latent model), and the
    kernel distance of the student's samples to the teacher's on a feature network (fidelity.features)."""
    f = cfg.fidelity
    cond, uncond = model.conditioning.for_indices(torch.arange(f.num_samples))
    kwargs = dict(seed=fidelity_seed(cfg), batch_size=f.batch_size, progress=cfg.progress_bar, cond=cond, uncond=uncond)
    config, components = model.scheduler.config, model.components
    teacher_images = to_images(components, sample(model.unet, config, model.sampler, f.num_samples, **kwargs))
    student_images = to_images(components, sample(student, config, model.sampler, f.num_samples, **kwargs))
    shown = min(8, f.num_samples)
    grid = image_grid(torch.cat([teacher_images[:shown], student_images[:shown]]), rows=2, scale=4)
    write_png(grid, out_dir / "samples.png")  # FP row over student row
    figures = fidelity_figures(student_images, teacher_images)
    features = fidelity_features(cfg)
    if features is not None:
        backend = build_backend(features, batch_size=f.batch_size, device=module_device(student))
        student_features = backend.extract(to_uint8(student_images))["fid"]
        teacher_features = backend.extract(to_uint8(teacher_images))["fid"]
        figures["kid_vs_fp"] = kernel_distance(student_features, teacher_features, standardize=True, paired=True)
    return figures


def fidelity_features(cfg: DictConfig) -> str | None:
    """The feature network of the kernel distance to the FP samples: fidelity.features, where "auto" is the
    digit classifier for the embedded model and none otherwise (an Inception pass is not free)."""
    choice = cfg.fidelity.get("features", "auto")
    if choice == "auto":
        return "digits" if cfg.model.get("source") == "embedded" else None
    return None if choice in (None, "none") else str(choice)


@dataclass
class Job:
    """What one train.py job works with, from its config to the trained student."""

    cfg: DictConfig
    out_dir: Path
    start: float  # perf_counter at the job's start
    model: ModelBundle  # the FP UNet, its scheduler, sampler, FP components (never quantized), conditioning
    timesteps: torch.Tensor  # the sampler's planned timesteps (TPQ's T = their number)
    quant_config: QuantConfig
    distill: DistillConfig
    datamodule: CalibrationDataModule
    distiller: BlockDistiller
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)  # cfg.trainer, accelerator made explicit
    phases: PhaseRecorder = dataclasses.field(default_factory=PhaseRecorder)  # device, time, memory per phase

    @property
    def device(self) -> torch.device:
        """Where this process runs every phase: the configured device (trainer=auto: the GPU if present)."""
        return job_device(self.trainer)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one quantization job; returns the results (also written to <output_dir>/results.json)."""
    start = time.perf_counter()
    # teacher and student stay in eval mode on purpose (no dropout; BKD trains weights and quantizers only)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # inside Lightning
    if plan_enabled(cfg):
        plan = plan_only(cfg)
        return {"plan": plan.to_dict()}
    job = prepare(cfg, start)
    checkpoint = check_resume(job)
    check_writable_dir(cfg.data.cache_dir, "data.cache_dir")  # after the checks: a refused run creates nothing
    # one logger run per job (a W&B run), finished also when it fails; per phase its device, time and memory
    with job_tracker(cfg, "train") as tracker, recording(job.phases):
        rank = fit_student(job, checkpoint, tracker.logger)
        if rank != 0:
            return {}
        if job.distiller.state.block < len(job.distiller.blocks):  # interrupted (Ctrl-C, max_steps, time limit)
            log.warning(
                "training stopped in block %d of %d; nothing is written but the checkpoint. Resume with: "
                "python train.py hydra.run.dir=%s ckpt_path=last (and the same overrides)",
                job.distiller.state.block + 1, len(job.distiller.blocks), job.out_dir,
            )
            return {"complete": False, "block": job.distiller.state.block, "num_blocks": len(job.distiller.blocks)}
        results = write_outputs(job)
        tracker.log_results(results, {"samples": job.out_dir / "samples.png"})
        return results


def prepare(cfg: DictConfig, start: float) -> Job:
    """Check the config, load the FP model and its parts, build the calibration source and the distiller."""
    check_config(cfg)
    trainer = trainer_settings(OmegaConf.to_container(cfg.trainer, resolve=True))  # announces the device
    out_dir = check_writable_dir(cfg.output_dir, "output_dir")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # encode only the prompts calibration trajectories and fidelity samples use (k % P is then the same)
    limit = max(int(cfg.data.num_trajectories or cfg.data.num_samples), int(cfg.fidelity.num_samples))
    model = load_model(cfg.model, prompt_limit=limit, encode_device=job_device(trainer))
    timesteps = planned_timesteps(model.scheduler.config, model.sampler)
    quant_config = build_quant_config(cfg, len(timesteps), model.unet)
    distill = distill_config(cfg)
    # the run's plan (plan.json), and a run that cannot fit refused here, before calibration and training
    plan = plan_job(cfg, model.unet, len(timesteps), model.sampler.uses_guidance, cond_of_bundle(model), out_dir)
    if plan is not None:
        distill = fitted_batches(cfg, distill, plan)
    datamodule = calibration_data(cfg, model)
    distiller = BlockDistiller(model.unet, quant_config, distill, datamodule, seed=cfg.seed)
    if plan is not None and distill.cache_device == "auto":  # each block's cache where the plan put it
        distiller.planned_tiers = {block.name: block.cache_device for block in plan.blocks}
    return Job(cfg, out_dir, start, model, timesteps, quant_config, distill, datamodule, distiller, trainer)


def fitted_batches(cfg: DictConfig, distill: DistillConfig, plan) -> DistillConfig:
    """The capture, micro and fidelity batch sizes the plan lowered to fit the GPU (budget.fit_batches), put in
    place (fidelity.batch_size in cfg); said in one line when any changed."""
    sizes = plan.batch_sizes
    changed = []
    if sizes.get("capture", distill.capture_batch_size) != distill.capture_batch_size:
        changed.append(f"capture_batch_size {distill.capture_batch_size} -> {sizes['capture']}")
        distill = dataclasses.replace(distill, capture_batch_size=sizes["capture"])
    if sizes.get("micro", distill.batch_size) < min(distill.micro_batch_size or distill.batch_size, distill.batch_size):
        changed.append(f"micro_batch_size {distill.micro_batch_size} -> {sizes['micro']}")
        distill = dataclasses.replace(distill, micro_batch_size=sizes["micro"])
    if sizes.get("fidelity", cfg.fidelity.batch_size) != cfg.fidelity.batch_size:
        changed.append(f"fidelity.batch_size {cfg.fidelity.batch_size} -> {sizes['fidelity']}")
        with open_dict(cfg):
            cfg.fidelity.batch_size = sizes["fidelity"]
    if changed:
        log.info("dq: the plan lowered batch sizes to fit the GPU: %s (budget.fit_batches=false keeps them)",
                 ", ".join(changed))
    return distill


def check_resume(job: Job) -> Path | None:
    """The checkpoint to resume from (ckpt_path), checked against the run's identity, which every checkpoint
    of a training run records."""
    if job.distill.iters_per_block == 0:
        return None
    job.distiller.run_identity = identity_of(job.cfg, job.datamodule, job.quant_config)
    checkpoint = resolve_checkpoint(job.cfg.ckpt_path, job.out_dir / "checkpoints")
    if checkpoint is not None:
        check_checkpoint(checkpoint, job.distiller.run_identity)
    return checkpoint


def fit_student(job: Job, checkpoint: Path | None, logger: Logger | None = None) -> int:
    """Initialise (PTQ) or train the student block by block (the Trainer logs to `logger`, the job's: see
    dq.tracking); returns this process's global rank."""
    if job.distill.iters_per_block == 0:  # initialisation only: no optimisation, no Lightning loop needed
        job.distiller.to(job.device)  # no Trainer places it: calibration and initialisation run there too
        job.distiller.initialize_only()
        finish_phase()
        return 0
    trainer = make_trainer(job.cfg, job.out_dir, len(training_blocks(job.distiller.student, job.distill)), logger)
    trainer.fit(job.distiller, ckpt_path=checkpoint)
    finish_phase()
    return trainer.global_rank


def make_trainer(cfg: DictConfig, out_dir: Path, num_blocks: int, logger: Logger | None = None) -> L.Trainer:
    """One epoch per block; the observing callbacks (progress, TPQ ranges) and the resume checkpoint; the
    configured accelerator, and `logger` (None: a new one from cfg.logger)."""
    return L.Trainer(
        **trainer_settings(OmegaConf.to_container(cfg.trainer, resolve=True), announce=False),  # auto made explicit
        max_epochs=num_blocks,
        reload_dataloaders_every_n_epochs=1,  # each block's loader has its own length (BlockBatches)
        logger=hydra.utils.instantiate(cfg.logger) if logger is None else logger,
        callbacks=[
            *([BlockProgressBar()] if cfg.progress_bar else []),
            TPQRangeLogger(),
            BlockCheckpoint(out_dir / "checkpoints", cfg.checkpoint_every_n_steps),  # the run's one resume point
        ],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=out_dir,
    )


def write_outputs(job: Job) -> dict[str, Any]:
    """The student folder, config, TPQ ranges, the fidelity check and, last, results.json."""
    cfg, out_dir, model = job.cfg, job.out_dir, job.model
    job.distiller.to(job.device)  # Lightning's teardown left teacher and student on the CPU
    if model.components.vae is not None:  # a latent model's samples are decoded where they are made
        model.components.vae.to(job.device)
    student = job.distiller.student
    results = run_record(job, train_seconds=time.perf_counter() - job.start)
    key_by_timestep(student, job.timesteps)  # stock pipelines pass only t: the student finds its TPQ row from it
    # results.json is written last and says complete: true; an earlier run's copy goes first, so that an
    # interrupted rewrite never leaves new files beside an old results.json
    (out_dir / "results.json").unlink(missing_ok=True)
    save_student(student, out_dir / "student", scheduler_config=model.scheduler.config,
                 sampler=model.sampler.to_dict(), overwrite=True)
    place_file(out_dir / "student" / STATE_FILE, out_dir / STATE_FILE)
    atomic_write(out_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
    write_json(out_dir / "tpq_ranges.json", tpq_ranges(student))
    phase("fidelity")
    enter_phase("fidelity", job.device)
    results.update(fidelity(cfg, model, student, out_dir))
    finish_phase()
    phase("write")
    results["wall_seconds"] = round(time.perf_counter() - job.start, 1)
    results["quant_config"] = job.quant_config.to_dict()
    results["sampler"] = model.sampler.to_dict()
    results["fidelity_protocol"] = fidelity_protocol(job)
    metadata = job.datamodule.metadata or {}
    results["calibration"] = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float))}
    results["device"] = str(job.device)
    results["phases"] = job.phases.summary()  # per phase: device, seconds, peak memory (dq.placement)
    write_json(out_dir / "results.json", results)
    return results


def _model_name(model_cfg) -> str | None:
    """The model's name in results.json: its source, and which embedded model ("embedded_dit")."""
    source = model_cfg.get("source")
    embedded = model_cfg.get("embedded")
    return f"embedded_{embedded}" if source == "embedded" and embedded not in (None, "unet") else source


def run_record(job: Job, train_seconds: float) -> dict[str, Any]:
    """The head of results.json: what ran, how long, the per-block losses."""
    cfg, distiller = job.cfg, job.distiller
    return {
        "results_version": RESULTS_VERSION,
        "complete": True,
        "method": cfg.method.name,
        "quant": cfg.quant.name,
        "weight_bits": job.quant_config.weight_bits,
        "act_bits": job.quant_config.act_bits,
        "model": _model_name(cfg.model),
        "num_steps": len(job.timesteps),
        "num_groups": job.quant_config.num_groups,
        "num_blocks": len(distiller.blocks),
        "iters_per_block": job.distill.iters_per_block,
        "end_to_end_iters": job.distill.end_to_end_iters,
        "block_final_losses": distiller.state.final_losses,
        "train_seconds": round(train_seconds, 1),
        # block preparation inside train_seconds (this process only, when resumed): caches and initialisation
        "prep_seconds": {k: round(v, 1) for k, v in distiller.prep_seconds.items()},
        "end_to_end_seconds": round(distiller.end_to_end_seconds, 1),  # the stage after BKD, inside train_seconds
        "peak_memory_mb": round(_peak_memory_mb(), 1),
    }


def fidelity_protocol(job: Job) -> dict[str, Any]:
    cfg = job.cfg
    return {
        "num_samples": cfg.fidelity.num_samples, "seed": fidelity_seed(cfg),
        "images": "final samples (decoded by the FP VAE for a latent model) clamped to [-1, 1], compared in "
                  "[0, 1] units; psnr_mse_vs_fp = 10 log10(1 / mse_vs_fp), psnr_vs_fp the mean and psnr_median_vs_fp the median of per-image PSNRs; SSIM with an 11x11 Gaussian window (or the image side)",
        "kid_features": fidelity_features(cfg),
        "kid": KID_PROTOCOL,
        "conditioning": job.model.conditioning.record(),
        "latent_decode": job.model.components.decode_record(),
    }


def tpq_ranges(student: torch.nn.Module) -> dict[str, dict[str, list[float]]]:
    """Per activation quantizer, the real-valued range [lo, hi] of each TPQ group; for a per-token quantizer
    (whose ranges are each token's), each group's clip ratio."""
    out = {}
    for name, module in student.named_modules():
        if isinstance(module, TokenActQuantizer):
            out[name] = {"clip_ratio": [round(v, 6) for v in module.scale.detach().tolist()]}
        elif isinstance(module, TemporalActQuantizer):
            lo, hi = group_ranges(module)
            out[name] = {"lo": [round(v, 6) for v in lo.tolist()], "hi": [round(v, 6) for v in hi.tolist()]}
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    with discard_if_untouched(cfg.output_dir), reported_errors():
        results = train(cfg)
    if results.get("complete"):
        print(
            f"dq: {results['method']} {results['quant']} done in {results['wall_seconds']:.0f} s; "
            f"PSNR vs FP {results['psnr_vs_fp']:.2f} dB (mean per image; median {results['psnr_median_vs_fp']:.2f}, "
            f"of the mean MSE {results['psnr_mse_vs_fp']:.2f}), MSE vs FP {results['mse_vs_fp']:.5f}\n"
            f"dq: outputs in {cfg.output_dir} (student/ for dq.load_student, student.safetensors, results.json, "
            "samples.png)"
        )


def cli() -> None:
    """The `dq-train` command (and `python train.py`): main() with dq's one-line errors."""
    run_hydra_entry(main)


if __name__ == "__main__":
    cli()
