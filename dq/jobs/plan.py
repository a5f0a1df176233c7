"""train.py's plan: `plan=true` prints the run's plan and writes plan.json without doing the work; every
real run makes the same plan first and refuses, in one line, a run that cannot fit (dq.plan).

    python train.py model=sd_v1_4 plan=true                 # no weights needed: the shipped denoiser config
    python train.py model=flux_dev plan=true budget.gpu_memory_gb=141

The denoiser's config comes from the model folder when it is on this machine (the embedded models, a
model.path, a hub snapshot in the local cache), else from dq/zoo/denoisers/<name>.json, the published
config of each supported real model (looked up by model.repo_id).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from omegaconf import DictConfig, OmegaConf

from dq.errors import UnsupportedError, UserError
from dq.plan import (
    ASSUMED_TFLOPS,
    DEFAULT_GPU_GB,
    GIB,
    Plan,
    PlanSpec,
    host_available_bytes,
    make_plan,
    measured_tflops,
)

log = logging.getLogger(__name__)

DENOISERS_DIR = Path(__file__).resolve().parent.parent / "zoo" / "denoisers"
CLIP_TOKENS = 77  # CLIP's token sequence (SD, SDXL, SD3's CLIP part)
# the token sequence a family's pipeline encodes by default when model.conditioning.max_sequence_length is null
TRACE_MIN_PARAMETERS = 100_000_000  # a real run traces its phases on meta from this size (SD 1.x: 860M)
DEFAULT_SEQUENCE = {"PixArtTransformer2DModel": 300, "SD3Transformer2DModel": 256, "FluxTransformer2DModel": 512,
                    "SanaTransformer2DModel": 300}


def shipped_config(repo_id: str | None) -> dict[str, Any] | None:
    """The shipped record (dq/zoo/denoisers/*.json) of the model with this hub repo id, or None."""
    for path in sorted(DENOISERS_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        if repo_id and record.get("repo_id") == repo_id:
            return record
    return None


def denoiser_config(model_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(the denoiser's config.json, where it was read) for a model config, without reading weights."""
    from dq.zoo.loading import model_folder, read_layout

    folder = None
    try:
        folder = model_folder(model_cfg)
    except (FileNotFoundError, UserError):
        folder = None
    if folder is not None and folder.is_dir():
        path = folder / read_layout(folder).denoiser / "config.json"
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    record = shipped_config(model_cfg.get("repo_id") if model_cfg.get("source") == "hub" else None)
    if record is None:
        raise UserError("plan=true needs the denoiser's config: no model folder on this machine and no shipped config "
                        f"for {model_cfg.get('repo_id') or model_cfg.get('path')}; give model.path=<the folder> "
                        "(its unet/ or transformer/config.json is enough)")
    return dict(record["denoiser"]), f"dq/zoo/denoisers ({record['repo_id']})"


def meta_denoiser(config: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The denoiser of `config` on the meta device, at model.sample_size (Flux: 128 when its config has none)
    and in model.dtype."""
    from dq.zoo.loading import FLUX_SAMPLE_SIZE, torch_dtype

    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":  # PixArt's hub config
        name = "PixArtTransformer2DModel"
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise UnsupportedError(f"the denoiser config names class {name!r}, which diffusers does not have")
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    size = model_cfg.get("sample_size")
    if size is not None:
        model.register_to_config(sample_size=int(size))
    elif name == "FluxTransformer2DModel" and model.config.get("sample_size") is None:
        model.register_to_config(sample_size=FLUX_SAMPLE_SIZE)
    dtype = model_cfg.get("dtype")
    return model.to(torch_dtype(dtype)) if dtype else model


def conditioning_of(model: torch.nn.Module, model_cfg: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, torch.dtype]:
    """(one row's conditioning shape, its dtype) as the run would store it: a class label (int64 []) for a
    class-conditional model config, the packed text embeddings [L (+1), D] of a text model (D: the width
    the denoiser takes; L: CLIP's 77 tokens and/or the T5/Gemma sequence; +1 for the packed extras row of
    dq.arch.text_conditioning), None for an unconditional model."""
    from dq.arch.text_conditioning import text_fields

    conditioning = model_cfg.get("conditioning") or {}
    if conditioning.get("num_classes") is not None:
        return (), torch.int64
    config, name = model.config, type(model).__name__
    sequence = conditioning.get("max_sequence_length") or DEFAULT_SEQUENCE.get(name)
    if name == "UNet2DConditionModel":
        width, tokens = config.cross_attention_dim, CLIP_TOKENS
    elif name in ("PixArtTransformer2DModel", "SanaTransformer2DModel"):
        width, tokens = config.caption_channels, sequence
    elif name == "SD3Transformer2DModel":
        width, tokens = config.joint_attention_dim, CLIP_TOKENS + sequence
    elif name == "FluxTransformer2DModel":
        width, tokens = config.joint_attention_dim, sequence
    else:
        return None, torch.float32
    width = width[0] if isinstance(width, (list, tuple)) else width
    extra = 1 if text_fields(model) else 0
    return (int(tokens) + extra, int(width)), torch.float32


def plan_device(cfg: DictConfig) -> str:
    """The device a run's phases run on: trainer.accelerator gpu (or auto with CUDA present) is "cuda"."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def budget_spec(cfg: DictConfig, device: str, measure: bool = True) -> dict[str, Any]:
    """The memory and throughput a plan is held to: budget.* where set, else this machine's (the GPU's total
    memory, the host's available memory, a measured matmul rate), else the stated constants."""
    budget = cfg.get("budget") or {}
    gpu_gb, host_gb, tflops = budget.get("gpu_memory_gb"), budget.get("host_memory_gb"), budget.get("tflops")
    gpu_bytes = None
    if device == "cuda":
        if gpu_gb is not None:
            gpu_bytes = int(float(gpu_gb) * GIB)
        elif torch.cuda.is_available():
            gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        else:
            gpu_bytes = int(DEFAULT_GPU_GB * GIB)
    host_bytes = int(float(host_gb) * GIB) if host_gb is not None else host_available_bytes()
    if tflops is not None:
        rate, source = float(tflops), "budget.tflops"
    elif measure and (device == "cpu" or torch.cuda.is_available()):
        rate, source = measured_tflops(device), f"measured here: fp32 matmul on the {device}"
    elif device == "cuda":
        rate, source = ASSUMED_TFLOPS["cuda"], "assumed: an H100's fp32 matmul peak at ~40%"
    else:
        rate, source = ASSUMED_TFLOPS["cpu"], "assumed: a 2-core CPU's fp32 matmul"
    return {"device": device, "gpu_bytes": gpu_bytes, "host_bytes": host_bytes, "tflops": round(rate, 3),
            "tflops_source": source, "disk_bytes": free_disk_bytes(cfg.method.distill.get("cache_dir"))}


def free_disk_bytes(cache_dir: str | None) -> int | None:
    """Free bytes on the file system of the disk-tier caches' folder (its nearest existing parent)."""
    from dq.bkd.store import default_directory

    path = Path(cache_dir) if cache_dir else default_directory()
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def ddp_world_size(cfg: DictConfig) -> int:
    """The DDP processes of the run on one node (trainer=ddp with a device count), else 1: each caches a share
    of the calibration rows."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices")
    if "ddp" not in str(trainer.get("strategy", "")) or not isinstance(devices, int):
        return 1
    return max(1, devices)


def run_plan(cfg: DictConfig, teacher: torch.nn.Module, num_steps: int, guidance: bool,
             cond: tuple[tuple[int, ...] | None, torch.dtype], name: str, measure: bool = True,
             trace: bool = True) -> Plan:
    """The plan of the run `cfg` for `teacher` (a meta-device denoiser)."""
    from dq.jobs.train import build_quant_config, distill_config

    device = plan_device(cfg)
    data = cfg.data
    n = int(data.num_samples)
    trajectories = int(data.num_trajectories) if data.get("num_trajectories") else math.ceil(n / num_steps)
    spec = PlanSpec(num_samples=n, num_trajectories=trajectories,
                    generation_batch_size=int(data.get("generation_batch_size") or 64), num_steps=num_steps,
                    guidance=guidance, cond_shape=cond[0], cond_dtype=cond[1],
                    fidelity_samples=int(cfg.fidelity.num_samples), fidelity_batch_size=int(cfg.fidelity.batch_size),
                    world_size=ddp_world_size(cfg),
                    **budget_spec(cfg, device, measure))
    fit = bool((cfg.get("budget") or {}).get("fit_batches", True))
    return make_plan(teacher, build_quant_config(cfg, num_steps, teacher), distill_config(cfg), spec, name,
                     trace=trace, fit_batches=fit)


def plan_only(cfg: DictConfig) -> Plan:
    """`plan=true`: the plan of the run from the model's config alone; printed, written to plan.json."""
    from dq.io import check_writable_dir
    from dq.jobs.train import check_config

    check_config(cfg)
    model_cfg = cfg.model
    config, where = denoiser_config(model_cfg)
    teacher = meta_denoiser(config, model_cfg)
    sampler = model_cfg.get("sampler") or {}
    num_steps = sampler.get("num_steps")
    if num_steps is None:
        raise UserError("plan=true needs model.sampler.num_steps (the folder's pipeline default is read only when "
                        "the model is loaded): set it")
    guidance_scale = sampler.get("guidance_scale")
    guidance = guidance_scale is not None and float(guidance_scale) != 1.0
    name = _model_name(cfg)
    log.info("dq: planning %s from %s", name, where)
    plan = run_plan(cfg, teacher, int(num_steps), guidance, conditioning_of(teacher, model_cfg), name)
    out_dir = check_writable_dir(cfg.output_dir, "output_dir")
    plan.write(Path(out_dir) / "plan.json")
    print(plan.table())
    print(f"dq: plan written to {Path(out_dir) / 'plan.json'}; nothing else was done (plan=true)")
    return plan


def plan_job(cfg: DictConfig, unet: torch.nn.Module, num_steps: int, guidance: bool,
             cond: tuple[tuple[int, ...] | None, torch.dtype], out_dir: Path) -> Plan | None:
    """A real run's plan, from its loaded denoiser's config, before any calibration or training: written to
    plan.json, and the run refused (UserError naming the phase) when budget.check is on and it does not fit."""
    budget = cfg.get("budget") or {}
    if not budget.get("check", True):
        return None
    config = dict(unet.config)
    config["_class_name"] = type(unet).__name__
    teacher = meta_denoiser(config, {"dtype": None})
    teacher.to(next(unet.parameters()).dtype)
    # a GPU run of a large model has its phases traced (their peaks decide whether it fits); a CPU run, or a
    # small model, checks its caches and host terms only: tracing every operation of every block on meta
    # takes about 30 s for the embedded UNet, longer than a small run itself
    params = sum(p.numel() for p in teacher.parameters())
    trace = plan_device(cfg) == "cuda" and params >= TRACE_MIN_PARAMETERS
    plan = run_plan(cfg, teacher, num_steps, guidance, cond, _model_name(cfg), measure=False, trace=trace)
    plan.write(out_dir / "plan.json")
    log.info("%s", plan.summary())
    plan.check_fits()
    tiers = {b.cache_device for b in plan.blocks}
    if "disk" in tiers:
        log.info("dq: the plan keeps some block caches on disk (memory-mapped under method.distill.cache_dir): the "
                 "host cannot hold them beside the rest")
    return plan


def _model_name(cfg: DictConfig) -> str:
    model_cfg = cfg.model
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("model")
    except (ImportError, ValueError):
        choice = None
    return str(choice or model_cfg.get("repo_id") or model_cfg.get("source"))


def cond_of_bundle(model) -> tuple[tuple[int, ...] | None, torch.dtype]:
    """(one row's conditioning shape, dtype) of a loaded model's conditioning (dq.zoo.ModelConditioning)."""
    conditioning = model.conditioning
    if conditioning.prompt_embeds is not None:
        return tuple(conditioning.prompt_embeds.shape[1:]), torch.float32
    if conditioning.num_classes is not None:
        return (), torch.int64
    return None, torch.float32


def plan_enabled(cfg: DictConfig) -> bool:
    value = OmegaConf.select(cfg, "plan", default=False)
    if not isinstance(value, bool):
        raise UserError(f"plan must be true or false, got {value!r}")
    return value
