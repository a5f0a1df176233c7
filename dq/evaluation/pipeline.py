"""evaluate(cfg): sample a model or a quantized student, compute FID / sFID / IS (/ CLIP score) and fidelity
to the FP model, and write metrics.json with the protocol of every number. evaluate.py at the repository
root is the Hydra command around it (conf/evaluate.yaml); tests call evaluate(cfg) directly.

Flow: every rank loads the model and makes its share of the sample indices (dq.evaluation.samples); rank
0 settles the metrics first (backend, reference: a bad setting fails before any sampling), then reads all
samples back and computes, writes and logs the figures.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from dq.arch import describe
from dq.calibration import model_fingerprint, shard_range
from dq.config_values import config_bool, config_choice, config_int, config_str
from dq.errors import UserError
from dq.evaluation import (
    check_identity,
    code_version,
    generate_missing,
    identity_key,
    library_versions,
    read_samples,
    write_grid,
    write_identity,
    write_npz,
)
from dq.export.backends import names as int_backends
from dq.export.compiled import GLUE
from dq.io import atomic_write, check_writable_dir, file_sha256
from dq.metrics import fidelity_figures, inception_score
from dq.metrics.backends import FeatureBackend, build_backend, display_path
from dq.metrics.clip_score import clip_score
from dq.metrics.figures import FIDELITY_KEYS
from dq.metrics.reference import resolve_reference
from dq.metrics.ssim import ssim_window
from dq.placement import PhaseRecorder, recording, trainer_settings
from dq.placement import enter as enter_phase
from dq.placement import finish as finish_phase
from dq.quant import load_quant_state, quant_config, timestep_keying
from dq.quant.timesteps import POLICIES
from dq.sampling import SamplerConfig, check_student_steps, key_by_trained_sampler, planned_timesteps
from dq.tracking import close_logger, open_logger
from dq.zoo import ModelComponents, ModelConditioning, load_model, model_folder, to_images

METRICS_VERSION = 1
KNOWN_METRICS = ("fid", "sfid", "is", "fidelity", "clip_score")


class Target(NamedTuple):
    """What is evaluated: `unet` (the FP model, or the student built from a run dir) and, for a student,
    the FP model it is compared with."""

    unet: torch.nn.Module
    fp_unet: torch.nn.Module | None  # None when the FP model itself is evaluated
    scheduler_config: dict[str, Any]
    sampler: SamplerConfig
    model_cfg: DictConfig
    run_dir: Path | None
    run_config: DictConfig | None
    run_results: dict[str, Any]
    components: ModelComponents = ModelComponents()  # FP VAE (latent models decode through it) / text encoder
    conditioning: ModelConditioning = ModelConditioning()  # the model config's (class labels / prompts)
    export: dict[str, Any] | None = None  # an integer export's metadata (+ path, sha256) when `unet` runs one
    remap: dict[str, Any] | None = None  # a student sampled off its trained schedule: policy and schedules


def eval_sampler(cfg: DictConfig, trained: SamplerConfig) -> SamplerConfig:
    """The sampler of an evaluation: the model's (a run's: the one it was trained for), with the settings of
    cfg.sampler that are not null put over it (sampling a student off its trained schedule: cfg.tpq_policy)."""
    overrides = {k: v for k, v in (cfg.get("sampler") or {}).items() if v is not None}
    if not overrides:
        return trained
    return SamplerConfig.from_mapping({**trained.to_dict(), **overrides})


def _remap(cfg: DictConfig, unet: torch.nn.Module, scheduler_config: dict[str, Any], sampler: SamplerConfig
           ) -> dict[str, Any] | None:
    """The remap record of a student sampled with `sampler` (None on its trained schedule); ValueError when
    its policy refuses that schedule (before any sampling)."""
    timesteps = planned_timesteps(scheduler_config, sampler)
    if check_student_steps(unet, timesteps, sampler):  # explicit steps: the trained schedule (or a float model)
        return None
    keying = timestep_keying(unet)
    return {"tpq_policy": keying.policy, "trained_timesteps": keying.timestep_list(),
            "sampled_timesteps": timesteps.tolist(), "off_schedule": keying.unmatched(timesteps)}


def load_target(cfg: DictConfig, device: torch.device | None = None) -> Target:
    """The FP model of cfg.model (run=null), the student of a train.py run dir with that run's model, or the
    integer model of an export (export=PATH) with the model it was exported from as the FP reference."""
    if cfg.get("export") is not None:
        if cfg.run is not None:
            raise UserError("set either run= (a fake-quant student) or export= (an integer export), not both")
        return _export_target(cfg, device or torch.device("cpu"))
    limit = int(cfg.eval.num_samples)  # sample k uses prompt k % P: the first N prompts suffice
    if cfg.run is None:
        model = load_model(cfg.model, prompt_limit=limit, encode_device=device)
        return Target(model.unet, None, dict(model.scheduler.config), eval_sampler(cfg, model.sampler), cfg.model,
                      None, None, {}, model.components, model.conditioning)
    run_dir = Path(str(cfg.run)).expanduser()
    for name in ("config.yaml", "student.safetensors"):
        if not (run_dir / name).is_file():
            raise UserError(f"run={run_dir} is not a train.py output dir: {name} is missing")
    run_config = OmegaConf.load(run_dir / "config.yaml")
    if "model" not in run_config:
        raise UserError(f"{run_dir / 'config.yaml'} has no `model` section")
    # the model and sampler the student was trained for
    loaded = load_model(run_config.model, prompt_limit=limit, encode_device=device)
    policy = str(cfg.get("tpq_policy", "exact"))
    # a quantized copy (the FP unet is kept), keyed by timestep with the policy
    student = load_quant_state(loaded.unet, run_dir / "student.safetensors", describe(loaded.unet), tpq_policy=policy)
    key_by_trained_sampler(student, loaded.scheduler.config, loaded.sampler, policy)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    sampler = eval_sampler(cfg, loaded.sampler)
    scheduler_config = dict(loaded.scheduler.config)
    return Target(student.eval(), loaded.unet, scheduler_config, sampler, run_config.model, run_dir, run_config,
                  results, loaded.components, loaded.conditioning, remap=_remap(cfg, student, scheduler_config, sampler))


def _export_target(cfg: DictConfig, device: torch.device) -> Target:
    from dq.export import compile_int_model, load_int_model

    path = Path(str(cfg.export)).expanduser()
    unet = load_int_model(path, device=device, backend=str(cfg.get("int_backend", "auto")),
                          tpq_policy=str(cfg.get("tpq_policy", "exact")))
    meta = unet.dq_export
    glue = str(cfg.get("int_compile", "none"))
    if glue != "none":
        unet = compile_int_model(unet, glue)
    if "model_config" not in meta:
        raise UserError(f"{path} does not record the model it was exported from (export it with python -m dq.export)")
    model_cfg = OmegaConf.create(meta["model_config"])
    loaded = load_model(model_cfg, prompt_limit=int(cfg.eval.num_samples))
    export = {**{k: meta.get(k) for k in ("method", "quant", "backend", "float_dtype", "source")},
              "compiled": glue, "path": str(path), "sha256": file_sha256(path)}
    sampler = eval_sampler(cfg, loaded.sampler)
    scheduler_config = dict(loaded.scheduler.config)
    return Target(unet, loaded.unet, scheduler_config, sampler, model_cfg, None, None, {},
                  loaded.components, loaded.conditioning, export, _remap(cfg, unet, scheduler_config, sampler))


def select_metrics(requested: Any, backend: FeatureBackend, is_student: bool, has_clip: bool) -> list[str]:
    """The metrics to compute: `requested` (eval.metrics) or, when null, all the backend provides plus
    fidelity (students) and CLIP score (when eval.clip_model is set). ValueError for ones that cannot run."""
    available = [*backend.metrics, *(["fidelity"] if is_student else []), *(["clip_score"] if has_clip else [])]
    if requested is None:
        return available
    requested = [str(name) for name in requested]
    unknown = sorted(set(requested) - set(KNOWN_METRICS))
    if unknown:
        raise UserError(f"eval.metrics has unknown metric(s) {unknown}; expected some of {list(KNOWN_METRICS)}")
    for name in requested:
        if name in ("fid", "sfid", "is") and name not in backend.metrics:
            raise UserError(f"backend {backend.name!r} does not provide {name!r} (it provides {list(backend.metrics)}); "
                             "eval.backend=digits gives IS for the embedded model")
        if name == "clip_score" and not has_clip:
            raise UserError("eval.metrics asks for clip_score: set eval.clip_model (a local CLIP folder)")
    return requested


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _samples_identity(fingerprint: str, target: Target, eval_cfg: DictConfig, cond_record: dict,
                      remap: dict[str, Any] | None = None) -> dict:
    """What a folder of samples depends on: resuming into a folder with another identity is refused."""
    identity = {"model": fingerprint, "sampler": target.sampler.to_dict(), "seed": int(eval_cfg.seed),
                "conditioning": cond_record}
    if remap is not None:  # off its trained schedule a student's samples depend on its TPQ policy
        identity["tpq_policy"] = remap["tpq_policy"]
    return identity


def _fill_folder(fabric: L.Fabric, folder: Path, unet: torch.nn.Module, identity: dict, target: Target,
                 eval_cfg: DictConfig, conditioning: Any, progress: bool, description: str) -> float:
    """Make the samples of this rank's share of indices 0..N-1 missing from `folder`; returns seconds."""
    start = time.perf_counter()
    if fabric.global_rank == 0:
        write_identity(folder, identity)
    fabric.barrier()
    check_identity(folder, identity)  # every rank: all fail together on a mismatch
    own = range(*shard_range(int(eval_cfg.num_samples), fabric.global_rank, fabric.world_size))
    generate_missing(folder, unet.to(fabric.device), target.scheduler_config, target.sampler, own,
                     seed=int(eval_cfg.seed), batch_size=int(eval_cfg.batch_size), conditioning=conditioning,
                     progress=progress and fabric.global_rank == 0, description=description,
                     to_pixels=lambda samples: to_images(target.components, samples))
    fabric.barrier()
    return time.perf_counter() - start


class MetricPlan(NamedTuple):
    """What rank 0 will compute, settled before any sampling so that a bad setting fails in seconds."""

    backend: FeatureBackend
    metrics: list[str]
    reference: dict[str, Any]  # FeatureStats per Fréchet metric
    reference_record: dict[str, Any] | None
    prompts: list[str]


def plan_metrics(eval_cfg: DictConfig, target: Target) -> MetricPlan:
    """Build the backend, choose the metrics and load the reference; ValueError / BackendUnavailable when
    any of them cannot run."""
    backend = build_backend(str(eval_cfg.backend), inception_path=eval_cfg.inception_path,
                            classifier_path=eval_cfg.classifier_path, batch_size=int(eval_cfg.feature_batch_size),
                            device=_device(str(eval_cfg.device)), progress=False)
    metrics = select_metrics(eval_cfg.metrics, backend, target.fp_unet is not None, eval_cfg.clip_model is not None)
    if "is" in metrics and not 1 <= int(eval_cfg.is_splits) <= int(eval_cfg.num_samples):
        raise UserError(f"eval.is_splits must lie in [1, eval.num_samples={eval_cfg.num_samples}], got {eval_cfg.is_splits}")
    reference, record = ({}, None)
    if {"fid", "sfid"} & set(metrics):
        reference, record = resolve_reference(str(eval_cfg.reference), backend)
    return MetricPlan(backend, metrics, reference, record, clip_prompts(eval_cfg, target))


def compute_figures(plan: MetricPlan, images: torch.Tensor, fp_images: torch.Tensor | None,
                    eval_cfg: DictConfig) -> dict[str, Any]:
    """The numbers of metrics.json from uint8 samples [N, C, H, W] (and the FP model's, for a student)."""
    figures: dict[str, Any] = {}
    features = plan.backend.extract(images) if {"fid", "sfid", "is"} & set(plan.metrics) else {}
    for name in ("fid", "sfid"):
        if name in plan.metrics:
            figures[name] = plan.backend.frechet(features[name], plan.reference[name])
    if "is" in plan.metrics:
        figures["is"], figures["is_std"] = inception_score(features["is"], int(eval_cfg.is_splits))
    if fp_images is None:  # the FP model is its own reference
        figures.update(dict.fromkeys(FIDELITY_KEYS))
    elif "fidelity" in plan.metrics:
        figures.update(fidelity_figures(images.float() / 127.5 - 1.0, fp_images.float() / 127.5 - 1.0))
    if "clip_score" in plan.metrics:
        prompts = [plan.prompts[k % len(plan.prompts)] for k in range(len(images))]
        figures["clip_score"] = clip_score(images, prompts, str(eval_cfg.clip_model), device=_device(str(eval_cfg.device)))
    return figures


def build_protocol(plan: MetricPlan, target: Target, eval_cfg: DictConfig, cond_record: dict[str, Any],
                   fp_fingerprint: str, image_size: tuple[int, int], fabric: L.Fabric) -> dict[str, Any]:
    """Everything a reader needs to compare a number: backend, network hash, N, reference, sampler, seed, code."""
    sampler = target.sampler
    return {
        **plan.backend.describe(),
        "metrics": plan.metrics,
        "num_samples": int(eval_cfg.num_samples),
        "reference": plan.reference_record,
        "sampler": sampler.name,
        "steps": sampler.num_steps,
        "eta": sampler.eta,
        "spacing": sampler.spacing,
        "guidance_scale": sampler.guidance_scale,
        "seed": int(eval_cfg.seed),
        "sample_seeding": "sample k: noise from its own generator seeded by dq.sampling.sample_seed(seed, k)",
        "images": "uint8 PNG pixels round((x + 1) * 127.5) of samples clamped to [-1, 1]; metrics read them back",
        "latent_decode": target.components.decode_record(),
        "conditioning": cond_record,
        "model": {"source": target.model_cfg.get("source"), "path": display_path(model_folder(target.model_cfg)),
                  "fingerprint": fp_fingerprint},
        "student": _student_record(target),
        "remap": target.remap,
        "fidelity": None if target.fp_unet is None else (
            "the FP model's samples from the same noise (same seed and indices), uint8 pixels compared in [0, 1] "
            f"units; PSNR averaged per image; SSIM Gaussian window {ssim_window(*image_size)}, sigma 1.5"),
        "is_splits": int(eval_cfg.is_splits) if "is" in plan.metrics else None,
        "clip_model": str(eval_cfg.clip_model) if "clip_score" in plan.metrics else None,
        "code_version": code_version(),
        "versions": library_versions(),
        "world_size": fabric.world_size,
        "device": str(fabric.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_config(cfg: DictConfig) -> None:
    """evaluate.py's own settings, checked before any work (UserError naming the key)."""
    num_samples = config_int(cfg, "eval.num_samples")
    if num_samples < 2:
        raise UserError(f"eval.num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
    config_int(cfg, "eval.batch_size", minimum=1)
    config_int(cfg, "eval.feature_batch_size", minimum=1)
    config_int(cfg, "eval.seed", minimum=0)
    config_int(cfg, "eval.is_splits", minimum=1)
    config_int(cfg, "eval.grid_rows", minimum=1)
    config_choice(cfg, "eval.device", ("auto", "cpu", "cuda"))
    config_choice(cfg, "tpq_policy", POLICIES)
    config_choice(cfg, "int_backend", ("auto", *int_backends()))
    config_choice(cfg, "int_compile", ("none", *GLUE))
    config_bool(cfg, "progress_bar")
    for key in ("run", "export"):
        config_str(cfg, key, optional=True)


def check_outputs(cfg: DictConfig) -> Path:
    """Every folder evaluate.py writes is writable (refused before any work); returns the output dir."""
    out_dir = check_writable_dir(cfg.output_dir, "output_dir")
    check_writable_dir(cfg.eval.fp_cache_dir, "eval.fp_cache_dir")
    if cfg.run is not None and Path(str(cfg.run)).expanduser().is_dir():  # metrics.json is copied there
        check_writable_dir(Path(str(cfg.run)).expanduser(), "run")
    return out_dir


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample, compute the metrics and write metrics.json; returns the metrics on rank 0 ({} elsewhere).
    metrics.json records each phase's device, wall time and peak memory (dq.placement)."""
    with recording() as phases:
        return _evaluate(cfg, phases)


def _evaluate(cfg: DictConfig, phases: PhaseRecorder) -> dict[str, Any]:
    start = time.perf_counter()
    eval_cfg = cfg.eval
    check_config(cfg)
    out_dir = check_outputs(cfg)
    fabric = L.Fabric(**trainer_settings(OmegaConf.to_container(cfg.trainer, resolve=True)))  # auto: the GPU if any
    fabric.launch()
    if str(eval_cfg.device) == "auto":  # the feature networks run where the sampling does
        eval_cfg = eval_cfg.copy()
        eval_cfg.device = fabric.device.type
    progress = bool(cfg.progress_bar)
    target = load_target(cfg, fabric.device)
    cfg = _with_run_names(cfg, target)
    conditioning, cond_record = target.conditioning.indexer(), target.conditioning.record()
    plan = plan_metrics(eval_cfg, target) if fabric.global_rank == 0 else None

    seconds: dict[str, float] = {}
    # an integer model's weights live in its kernels, not its state_dict: the export file is its identity
    fingerprint = fp_fingerprint = (f"export-{target.export['sha256']}" if target.export
                                    else model_fingerprint(target.unet, target.scheduler_config))
    identity = _samples_identity(fingerprint, target, eval_cfg, cond_record, target.remap)
    if target.components.vae is not None:  # a latent model's samples are decoded where they are made
        target.components.vae.to(fabric.device)
    enter_phase("sampling", fabric.device)
    seconds["sampling"] = _fill_folder(fabric, out_dir / "samples", target.unet, identity, target, eval_cfg,
                                       conditioning, progress, "samples")
    fp_dir = None
    if target.fp_unet is not None:
        fp_fingerprint = model_fingerprint(target.fp_unet, target.scheduler_config)
        fp_identity = _samples_identity(fp_fingerprint, target, eval_cfg, cond_record)
        fp_dir = Path(str(eval_cfg.fp_cache_dir)) / identity_key(fp_identity)
        enter_phase("fp_sampling", fabric.device)
        seconds["fp_sampling"] = _fill_folder(fabric, fp_dir, target.fp_unet, fp_identity, target, eval_cfg,
                                              conditioning, progress, "FP samples (cached)")
    finish_phase()
    if fabric.global_rank != 0:
        return {}

    metrics_start = time.perf_counter()
    enter_phase("metrics", _device(str(eval_cfg.device)))
    num = int(eval_cfg.num_samples)
    images = read_samples(out_dir / "samples", num)
    write_npz(out_dir / "samples.npz", images)
    write_grid(out_dir / "grid.png", images, int(eval_cfg.grid_rows))
    plan.backend.progress = progress
    fp_images = read_samples(fp_dir, num) if fp_dir is not None else None
    figures = compute_figures(plan, images, fp_images, eval_cfg)
    finish_phase()
    seconds["metrics"] = time.perf_counter() - metrics_start
    seconds["total"] = time.perf_counter() - start
    results = {
        "metrics_version": METRICS_VERSION,
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()},
        "num_samples": num,
        "model_kind": "fp" if target.fp_unet is None else "student",
        "execution": "integer" if target.export else ("float" if target.fp_unet is None else "fake-quant"),
        **_run_summary(target),
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "evaluation_dir": str(out_dir),
        "evaluation_id": uuid.uuid4().hex,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "device": str(fabric.device),
        "phases": phases.summary(),  # per phase: device, seconds, peak memory (this process: rank 0)
        "protocol": build_protocol(plan, target, eval_cfg, cond_record, fp_fingerprint, tuple(images.shape[-2:]), fabric),
    }
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    _write_json(out_dir / "metrics.json", results)
    if target.run_dir is not None:
        atomic_write(target.run_dir / "metrics.json", lambda tmp: shutil.copyfile(out_dir / "metrics.json", tmp))
    _log(cfg, figures, results["protocol"], out_dir / "grid.png")
    return results


def clip_prompts(eval_cfg: DictConfig, target: Target) -> list[str]:
    """The prompts the CLIP score compares samples with: the model config's (model.conditioning.prompts_file)."""
    if eval_cfg.clip_model is None:
        return []
    if not target.conditioning.prompts:
        raise UserError("eval.clip_model is set: the CLIP score needs the model's prompts "
                        "(model.conditioning.prompts_file)")
    return list(target.conditioning.prompts)


def _student_record(target: Target) -> dict[str, Any] | None:
    if target.export:
        return {"export": target.export, "quant_config": quant_config(target.unet).to_dict(),
                "method": target.export["method"], "quant": target.export["quant"]}
    if target.run_dir is None:
        return None
    summary = _run_summary(target)
    return {"run_dir": str(target.run_dir), "quant_config": quant_config(target.unet).to_dict(),
            "method": summary["method"], "quant": summary["quant"]}


def _run_summary(target: Target) -> dict[str, Any]:
    """method / quant / bits of what was evaluated, at the top level for tables (the FP model: "fp")."""
    if target.export:
        config = quant_config(target.unet)
        return {"method": target.export["method"], "quant": target.export["quant"],
                "weight_bits": config.weight_bits, "act_bits": config.act_bits}
    if target.run_dir is None:
        return {"method": "fp", "quant": "fp32", "weight_bits": 32, "act_bits": 32}
    config = quant_config(target.unet)
    run_cfg = target.run_config
    method = target.run_results.get("method") or (run_cfg.method.name if "method" in run_cfg else None)
    quant = target.run_results.get("quant") or (run_cfg.quant.name if "quant" in run_cfg else None)
    return {"method": method, "quant": quant, "weight_bits": config.weight_bits, "act_bits": config.act_bits}


def _log(cfg: DictConfig, figures: dict[str, Any], protocol: dict[str, Any], grid: Path) -> None:
    """The figures, the protocol and the sample grid to the configured Lightning logger."""
    if cfg.get("logger") is None:
        return
    logger = open_logger(cfg, "evaluate")  # a W&B run: named, grouped by sweep, the resolved config as its config
    logger.log_hyperparams({"protocol": protocol})
    logger.log_metrics({f"eval/{k}": v for k, v in figures.items() if isinstance(v, (int, float))}, step=0)
    if hasattr(logger, "log_image"):  # W&B
        logger.log_image(key="eval/samples", images=[str(grid)])
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
        pixels = np.asarray(Image.open(grid))
        logger.experiment.add_image("eval/samples", pixels, 0, dataformats="HW" if pixels.ndim == 2 else "HWC")
    close_logger(logger, "success")  # finishes a W&B run: the next job of a multirun must not log into it


def _write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def _with_run_names(cfg: DictConfig, target: Target) -> DictConfig:
    """A copy of cfg with the run's method and quant sections (the logger names and the saved config use
    them); the FP model keeps evaluate.yaml's fp / fp32."""
    if target.export:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.method.name = f"{target.export['method']}_int"
            cfg.quant.name = target.export["quant"]
        return cfg
    if target.run_config is None:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ("method", "quant"):
            if key in target.run_config:
                cfg[key] = target.run_config[key]
    return cfg
