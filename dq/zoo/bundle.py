"""The one loader of a model config: everything dq uses from a diffusion model, in one bundle.

    model = load_model(cfg.model, prompt_limit=256)
    model.unet, model.scheduler, model.sampler          # the FP UNet, its noise schedule, its sampler settings
    model.components                                    # FP VAE / text encoder / class embeddings (never quantized)
    model.conditioning                                  # model.conditioning as tensors (class labels, prompts)

The model config (conf/model/*.yaml) is the one home of a model's conditioning: calibration, the fidelity
check, evaluation and export all take it from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from dq.sampling.config import SamplerConfig
from dq.zoo.components import ModelComponents, load_components
from dq.zoo.conditioning import ModelConditioning, model_conditioning
from dq.zoo.families import family_sampler
from dq.zoo.loading import load_model_folder, model_folder, model_sampler, read_layout


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model config. The UNet is in eval mode, in model.dtype (null: float32), on the CPU."""

    folder: Path
    unet: nn.Module
    scheduler: SchedulerMixin  # the training noise schedule; samplers are built from its config
    sampler: SamplerConfig  # the sampler settings of the model config
    components: ModelComponents
    conditioning: ModelConditioning


def load_model(model_cfg: Mapping[str, Any], *, prompt_limit: int | None = None,
               encode_device: torch.device | str | None = None) -> ModelBundle:
    """Everything of a model config (source, path / repo_id, variant, dtype, sampler, conditioning,
    latent_scale), from one resolution of its folder; a model.sampler setting left null is the folder's own
    pipeline's (`dq.zoo.families`). prompt_limit: encode only the first prompts of a text model (sample k
    uses prompt k % P, so P = the number of samples gives the same tensors). encode_device: where the text
    encoders encode the prompts (the job's device; None: the CPU)."""
    folder = model_folder(model_cfg)
    unet, scheduler = load_model_folder(folder, variant=model_cfg.get("variant"), dtype=model_cfg.get("dtype"),
                                         sample_size=model_cfg.get("sample_size"))
    components = load_components(model_cfg, folder, text=False)  # the text encoders: only on a cache miss
    conditioning = model_conditioning(model_cfg, components, limit=prompt_limit, denoiser=unet, scheduler=scheduler,
                                      folder=folder, device=encode_device)
    defaults, reason = family_sampler(read_layout(folder).pipeline_class, scheduler,
                                      text_conditional=conditioning.prompt_embeds is not None
                                      and conditioning.num_classes is None, denoiser_config=unet.config)
    sampler = model_sampler(model_cfg, defaults, reason)
    return ModelBundle(folder, unet, scheduler, sampler, components, conditioning)
