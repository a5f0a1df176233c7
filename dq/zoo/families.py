"""The sampler a model folder's own pipeline runs by default: what `model=local` samples with when
model.sampler leaves a setting null, read from the folder instead of assumed.

    defaults, reason = family_sampler("StableDiffusionPipeline", scheduler, text_conditional=True)
    # {"name": "plms", "num_steps": 50, "spacing": "uniform", "guidance_scale": 7.5}, "StableDiffusionPipeline ..."

The pipeline class (model_index.json's _class_name) decides first, with the defaults of that pipeline's
__call__ in diffusers 0.42; a folder without one (unet/ + scheduler/) goes by its scheduler class. A DDPM
model (DDPMScheduler, no pipeline class or DDPMPipeline) keeps the paper's protocol for DDPM models (DDIM,
100 steps, quad spacing). Each setting is one of dq's samplers (dq.sampling.config): where a pipeline's
own scheduler is not one of them (SDXL's Euler), the nearest one dq has is named in the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# pipeline class -> (sampler settings, where they come from); guidance is dropped for a model without text
PIPELINE_SAMPLERS: dict[str, tuple[dict[str, Any], str]] = {
    # StableDiffusionPipeline.__call__: num_inference_steps=50, guidance_scale=7.5; SD 1.x ships PNDM (PLMS),
    # SD 2.x DDIM: the scheduler class picks the sampler below
    "StableDiffusionPipeline": ({"num_steps": 50, "spacing": "uniform", "guidance_scale": 7.5},
                                "StableDiffusionPipeline's 50 steps, guidance 7.5"),
    # StableDiffusionXLPipeline.__call__: 50 steps, guidance 5.0 (its EulerDiscreteScheduler: dq samples DDIM)
    "StableDiffusionXLPipeline": ({"name": "ddim", "num_steps": 50, "spacing": "uniform", "guidance_scale": 5.0},
                                  "StableDiffusionXLPipeline's 50 steps, guidance 5.0, with DDIM for its Euler"),
    # PixArtAlphaPipeline / PixArtSigmaPipeline.__call__: num_inference_steps=20, guidance_scale=4.5, DPM-Solver++
    # on the timesteps its scheduler config spaces ("linspace": from 999)
    "PixArtAlphaPipeline": ({"name": "dpm_solver", "num_steps": 20, "spacing": "scheduler", "guidance_scale": 4.5},
                            "PixArtAlphaPipeline's DPM-Solver, 20 steps, guidance 4.5"),
    "PixArtSigmaPipeline": ({"name": "dpm_solver", "num_steps": 20, "spacing": "scheduler", "guidance_scale": 4.5},
                            "PixArtSigmaPipeline's DPM-Solver, 20 steps, guidance 4.5"),
    # StableDiffusion3Pipeline.__call__: num_inference_steps=28, guidance_scale=7.0
    "StableDiffusion3Pipeline": ({"name": "flow_euler", "num_steps": 28, "spacing": "scheduler", "guidance_scale": 7.0},
                                 "StableDiffusion3Pipeline's flow Euler, 28 steps, guidance 7.0"),
    # FluxPipeline.__call__: num_inference_steps=28, true_cfg_scale=1.0 (no CFG; its guidance_scale 3.5 feeds
    # FLUX.1-dev's guidance embedding: model.conditioning.distilled_guidance); FLUX.1-schnell is run with 4 steps
    "FluxPipeline": ({"name": "flow_euler", "num_steps": 28, "spacing": "uniform", "guidance_scale": None},
                     "FluxPipeline's flow Euler, 28 steps, no CFG"),
    # SanaPipeline.__call__: num_inference_steps=20, guidance_scale=4.5 (its flow DPM-Solver: dq samples flow Euler)
    "SanaPipeline": ({"name": "flow_euler", "num_steps": 20, "spacing": "scheduler", "guidance_scale": 4.5},
                     "SanaPipeline's 20 steps, guidance 4.5, with flow Euler for its flow DPM-Solver"),
}

# scheduler class -> dq's sampler of that scheduler (for a pipeline entry that leaves the name open, and
# for a folder without a pipeline class)
SCHEDULER_SAMPLERS: dict[str, dict[str, Any]] = {
    "PNDMScheduler": {"name": "plms", "num_steps": 50, "spacing": "uniform"},
    "DDIMScheduler": {"name": "ddim", "num_steps": 50, "spacing": "uniform"},
    "DPMSolverMultistepScheduler": {"name": "dpm_solver", "num_steps": 20, "spacing": "uniform"},
    "FlowMatchEulerDiscreteScheduler": {"name": "flow_euler", "num_steps": 28, "spacing": "uniform"},
}
PAPER_DDPM = {"name": "ddim", "num_steps": 100, "spacing": "quad", "guidance_scale": None}  # docs/method.md §6, DDPM models
FALLBACK = {"name": "ddim", "num_steps": 50, "spacing": "uniform", "guidance_scale": None}
TEXT_GUIDANCE = 7.5  # a text model's guidance with no pipeline class (StableDiffusionPipeline's)


def family_sampler(pipeline_class: str | None, scheduler: Any, *, text_conditional: bool,
                   denoiser_config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(sampler settings, the reason in words) for a folder whose model_index.json names `pipeline_class`
    (None without one) and whose scheduler is `scheduler` (a diffusers scheduler). Guidance only for a text model;
    a FLUX.1-schnell transformer (no guidance_embeds) gets 4 steps; a dynamic-shift flow scheduler (Flux) its
    shift at the denoiser's latent size (`flux_shift`) when its config records one."""
    scheduler_class, scheduler_config = type(scheduler).__name__, scheduler.config
    denoiser_config = denoiser_config or {}
    if pipeline_class in PIPELINE_SAMPLERS:
        settings, reason = PIPELINE_SAMPLERS[pipeline_class]
        settings = {**SCHEDULER_SAMPLERS.get(scheduler_class, FALLBACK), "guidance_scale": None, **settings}
        if pipeline_class == "FluxPipeline" and not denoiser_config.get("guidance_embeds", False):
            settings["num_steps"], reason = 4, "FluxPipeline with FLUX.1-schnell's 4 steps, no CFG"
        reason = f"{reason} ({scheduler_class})"
    elif scheduler_class == "DDPMScheduler" and pipeline_class in (None, "DDPMPipeline"):
        settings, reason = dict(PAPER_DDPM), "a DDPM model: the paper's DDIM, 100 steps, quad spacing"
    elif scheduler_class in SCHEDULER_SAMPLERS:
        settings = {"guidance_scale": TEXT_GUIDANCE, **SCHEDULER_SAMPLERS[scheduler_class]}
        reason = f"its {scheduler_class}: {settings['name']}, {settings['num_steps']} steps"
    else:
        settings = dict(FALLBACK)
        reason = f"no sampler known for {pipeline_class or 'a folder'} with {scheduler_class}: DDIM, 50 steps"
    if not text_conditional:
        settings["guidance_scale"] = None
    elif pipeline_class not in PIPELINE_SAMPLERS and settings.get("guidance_scale") is None:
        settings["guidance_scale"] = TEXT_GUIDANCE
    if settings["name"] == "flow_euler" and scheduler_config.get("use_dynamic_shifting", False):
        shift = flux_shift(scheduler_config, denoiser_config)
        if shift is not None:
            settings["shift"] = shift
            reason += f", shift {shift:.4f} at its latent size as FluxPipeline computes it"
    return settings, reason


def flux_shift(scheduler_config: Mapping[str, Any], denoiser_config: Mapping[str, Any]) -> float | None:
    """exp(mu) of FluxPipeline's calculate_shift for the denoiser's latent size (sample_size, packed in 2x2
    patches: (H/2)(W/2) image tokens), None when its config records no size. mu runs linearly from
    base_shift at base_image_seq_len tokens to max_shift at max_image_seq_len (the scheduler config's)."""
    size = denoiser_config.get("sample_size")
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    tokens = (int(height) // 2) * (int(width) // 2)
    base_len = int(scheduler_config.get("base_image_seq_len", 256))
    max_len = int(scheduler_config.get("max_image_seq_len", 4096))
    base_shift = float(scheduler_config.get("base_shift", 0.5))
    max_shift = float(scheduler_config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = tokens * slope + base_shift - slope * base_len
    return math.exp(mu)
