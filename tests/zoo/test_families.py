"""The sampler a folder's own pipeline runs by default (what model=local fills in for null settings)."""

import math

import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UnCLIPScheduler,
)
from omegaconf import OmegaConf

from dq.sampling import SamplerConfig
from dq.zoo.families import family_sampler, flux_shift
from dq.zoo.loading import model_sampler
from tests.zoo.real_layouts import sd15_scheduler


def test_each_pipeline_gets_its_own_defaults():
    sd15, _ = family_sampler("StableDiffusionPipeline", sd15_scheduler(), text_conditional=True)
    assert sd15 == {"name": "plms", "num_steps": 50, "spacing": "uniform", "guidance_scale": 7.5}
    sd21, _ = family_sampler("StableDiffusionPipeline", DDIMScheduler(), text_conditional=True)
    assert sd21 == {"name": "ddim", "num_steps": 50, "spacing": "uniform", "guidance_scale": 7.5}
    pixart, why = family_sampler("PixArtSigmaPipeline", DPMSolverMultistepScheduler(), text_conditional=True)
    assert pixart == {"name": "dpm_solver", "num_steps": 20, "spacing": "scheduler", "guidance_scale": 4.5}
    assert why == "PixArtSigmaPipeline's DPM-Solver, 20 steps, guidance 4.5 (DPMSolverMultistepScheduler)"
    sd3, _ = family_sampler("StableDiffusion3Pipeline", FlowMatchEulerDiscreteScheduler(shift=3.0),
                            text_conditional=True)
    assert sd3 == {"name": "flow_euler", "num_steps": 28, "spacing": "scheduler", "guidance_scale": 7.0}
    for defaults in (sd15, sd21, pixart, sd3):
        SamplerConfig.from_mapping(defaults)  # each is a valid dq sampler


def test_flux_schnell_gets_four_steps_and_its_resolution_shift():
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    schnell, why = family_sampler("FluxPipeline", flux, text_conditional=True,
                                  denoiser_config={"guidance_embeds": False, "sample_size": 128})
    # FluxPipeline at 1024 px: 64x64 = 4096 image tokens, mu = max_shift
    assert schnell == {"name": "flow_euler", "num_steps": 4, "spacing": "uniform", "guidance_scale": None,
                       "shift": pytest.approx(math.exp(1.15))}
    assert "4 steps, no CFG" in why and "shift 3.1582" in why
    assert flux_shift(flux.config, {"sample_size": 32}) == pytest.approx(math.exp(0.5))  # 256 tokens: base_shift
    assert flux_shift(flux.config, {}) is None  # no size recorded: sampler.shift must be given
    dev, _ = family_sampler("FluxPipeline", flux, text_conditional=True, denoiser_config={"guidance_embeds": True})
    assert dev["num_steps"] == 28 and "shift" not in dev


def test_a_folder_without_a_pipeline_class_goes_by_its_scheduler():
    ddpm, why = family_sampler(None, DDPMScheduler(), text_conditional=False)
    assert ddpm == {"name": "ddim", "num_steps": 100, "spacing": "quad", "guidance_scale": None}
    assert "paper's DDIM, 100 steps, quad" in why
    pndm_text, _ = family_sampler(None, sd15_scheduler(), text_conditional=True)
    assert pndm_text == {"name": "plms", "num_steps": 50, "spacing": "uniform", "guidance_scale": 7.5}
    unknown, why = family_sampler("KandinskyPipeline", UnCLIPScheduler(), text_conditional=False)
    assert unknown["name"] == "ddim" and "no sampler known for KandinskyPipeline with UnCLIPScheduler" in why


def test_set_settings_win_over_the_folders_and_the_filled_ones_are_logged(caplog):
    defaults = {"name": "plms", "num_steps": 50, "spacing": "uniform", "guidance_scale": 7.5}
    cfg = OmegaConf.create({"sampler": {"name": None, "num_steps": 4, "eta": 0.0, "spacing": None,
                                        "guidance_scale": None, "shift": None}})
    with caplog.at_level("INFO", logger="dq.zoo"):
        sampler = model_sampler(cfg, defaults, "why")
    assert sampler == SamplerConfig(name="plms", num_steps=4, spacing="uniform", guidance_scale=7.5)
    assert caplog.messages == ["dq: sampler from the folder (why): name=plms spacing=uniform guidance_scale=7.5; "
                               "set model.sampler.<key> to change"]
