"""Sampling: the one denoising loop (DDIM / PLMS / PNDM / DPM-Solver through diffusers schedulers), the
step spacings ("uniform", the paper's "quad") and the sample-grid command."""

from dq.sampling.config import SAMPLER_NAMES, SPACINGS, SamplerConfig
from dq.sampling.ddim import SpacedDDIMScheduler, ddim_update
from dq.sampling.sampler import (
    build_scheduler,
    check_student_steps,
    cond_kwargs,
    key_by_trained_sampler,
    pipeline_timesteps,
    planned_timesteps,
    predict_noise,
    sample,
    sample_seed,
    unet_forward,
)
from dq.sampling.spacing import quad_timesteps, sampling_timesteps, uniform_timesteps

__all__ = [
    "SAMPLER_NAMES",
    "SPACINGS",
    "SamplerConfig",
    "SpacedDDIMScheduler",
    "build_scheduler",
    "check_student_steps",
    "cond_kwargs",
    "ddim_update",
    "key_by_trained_sampler",
    "pipeline_timesteps",
    "planned_timesteps",
    "predict_noise",
    "quad_timesteps",
    "sample",
    "sample_seed",
    "sampling_timesteps",
    "uniform_timesteps",
    "unet_forward",
]
