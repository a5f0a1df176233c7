"""A quantized Flux / SD3 transformer inside the stock FluxPipeline and StableDiffusion3Pipeline (tiny random
transformers, prompt embeddings given directly). FluxPipeline calls the transformer with σ = t/1000 and
StableDiffusion3Pipeline with the unrounded σ·1000, while dq trains on t = round(1000 σ): the student folder
keys its TPQ rows in the units the pipeline passes, so the trained schedule finds row i at step i under
"exact", another schedule is refused, and "nearest" runs it."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

import dq
from dq.arch import pack_text_conditioning
from dq.pretrained import save_student
from dq.quant import QuantConfig, key_by_timestep
from dq.quant.quantizers import StepIndexed
from dq.sampling import SamplerConfig, planned_timesteps, sample, sample_seed
from dq.zoo.families import flux_shift
from tests.arch.test_flow_transformers import POOLED, TEXT_DIM, TEXT_LEN, tiny_flux, tiny_sd3
from tests.export.conftest import calibrated_student

T, SEED, N, PIXELS = 4, 3, 2, 64  # 64 px: 8x8 latents at the pipelines' VAE factor 8 (no VAE given)
FLUX_SCHEDULER = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
# shift 2.5 (SD3 ships 3.0, whose 4 levels happen to fall on the grid): σ·1000 = 1000, 882.35, 714.29, 454.55
SD3_SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.5)


def _text(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(N, POOLED, generator=g)


def _student_folder(model, scheduler, sampler, root):
    """A W8A8 student calibrated on random per-step latents, keyed and saved as train.py saves it."""
    timesteps = planned_timesteps(scheduler.config, sampler)
    g = torch.Generator().manual_seed(0)
    inputs = {i: torch.randn(4, 4, 8, 8, generator=g) for i in range(T)}
    embeds, pooled = _text(7)
    cond = pack_text_conditioning(embeds, pooled).repeat(2, 1, 1)
    student = calibrated_student(model, QuantConfig(weight_bits=8, act_bits=8, num_steps=T, num_groups=T),
                                 inputs, timesteps, cond)
    key_by_timestep(student, timesteps)
    return save_student(student, root / "student", scheduler_config=scheduler.config, sampler=sampler.to_dict())


def _rows_used(student):
    """The TPQ row of every call, as the student's quantizers see it."""
    rows = []
    quantizer = next(m for m in student.modules() if isinstance(m, StepIndexed))
    quantizer.register_forward_pre_hook(lambda module, args: rows.append(module.step))
    return rows


def _generators():
    return [torch.Generator().manual_seed(sample_seed(SEED, k)) for k in range(N)]


@pytest.fixture(scope="module")
def flux_parts(tmp_path_factory):
    sampler = SamplerConfig(name="flow_euler", num_steps=T, spacing="uniform",
                            shift=flux_shift(FLUX_SCHEDULER.config, {"sample_size": 8}))
    folder = _student_folder(tiny_flux(), FLUX_SCHEDULER, sampler, tmp_path_factory.mktemp("flux"))
    return folder, sampler


def _flux(transformer, steps=T):
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER.config), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = _text(1)
    packed = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=steps, height=PIXELS,
                  width=PIXELS, generator=_generators(), output_type="latent").images
    return FluxPipeline._unpack_latents(packed, PIXELS, PIXELS, 8)


def test_flux_pipeline_runs_the_student_on_its_trained_rows(flux_parts):
    folder, sampler = flux_parts
    student = dq.load_student(folder)
    rows = _rows_used(student)
    latents = _flux(student)
    assert rows == [0, 1, 2, 3]  # σ = t/1000 found step i's row at step i
    # dq's sampler with the same noise and text: the same trajectory but for dq's levels on the 1000-point
    # grid (σ within 5e-4 of the pipeline's)
    embeds, pooled = _text(1)
    ours = sample(student, FLUX_SCHEDULER.config, sampler, N, seed=SEED, cond=pack_text_conditioning(embeds, pooled),
                  progress=False)
    assert latents.shape == ours.shape == (N, 4, 8, 8)
    assert (latents - ours).abs().max() < 0.02 * ours.abs().max()
    # the quantization error in the pipeline is dq's sampler's (the grid's share cancels out)
    fp_ours = sample(tiny_flux(), FLUX_SCHEDULER.config, sampler, N, seed=SEED,
                     cond=pack_text_conditioning(embeds, pooled), progress=False)
    error, error_ours = latents - _flux(tiny_flux()), ours - fp_ours
    assert (error - error_ours).abs().max() < 0.25 * error.abs().max()  # measured 0.07


def test_flux_pipeline_exact_refuses_another_schedule_and_nearest_runs_it(flux_parts):
    folder, _ = flux_parts
    with pytest.raises(ValueError, match=r"timestep\(s\) .* are not in the schedule .* \(4 steps: \[1, 0\.826064, 0\.612866, 0\.345419\]\)"):
        _flux(dq.load_student(folder), steps=6)
    student = dq.load_student(folder, tpq_policy="nearest")
    rows = _rows_used(student)
    latents = _flux(student, steps=6)
    assert bool(torch.isfinite(latents).all()) and rows[0] == 0 and rows[-1] == 3 and rows == sorted(rows)


@pytest.fixture(scope="module")
def sd3_parts(tmp_path_factory):
    sampler = SamplerConfig(name="flow_euler", num_steps=T, spacing="uniform", guidance_scale=2.0)
    folder = _student_folder(tiny_sd3(), SD3_SCHEDULER, sampler, tmp_path_factory.mktemp("sd3"))
    return folder, sampler


def _sd3(transformer, sigmas=None, steps=T):
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER.config),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    (embeds, pooled), (negative, negative_pooled) = _text(1), _text(2)
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                negative_pooled_prompt_embeds=negative_pooled, guidance_scale=2.0, num_inference_steps=steps,
                sigmas=sigmas, height=PIXELS, width=PIXELS, generator=_generators(), output_type="latent").images


def test_sd3_pipeline_runs_the_student_on_its_trained_rows(sd3_parts):
    folder, sampler = sd3_parts
    student = dq.load_student(folder)
    rows = _rows_used(student)
    trained = list(np.linspace(1.0, 1.0 / T, T))  # dq's flow levels before the shift (FluxPipeline's spacing)
    latents = _sd3(student, sigmas=trained)
    assert rows == [0, 1, 2, 3]  # unrounded σ·1000 (882.35 vs dq's 882, 454.55 vs 455) found row i
    (embeds, pooled), (negative, negative_pooled) = _text(1), _text(2)
    ours = sample(student, SD3_SCHEDULER.config, sampler, N, seed=SEED, cond=pack_text_conditioning(embeds, pooled),
                  uncond=pack_text_conditioning(negative, negative_pooled), progress=False)
    assert latents.shape == ours.shape == (N, 4, 8, 8)
    assert (latents - ours).abs().max() < 0.02 * ours.abs().max()
    fp_ours = sample(tiny_sd3(), SD3_SCHEDULER.config, sampler, N, seed=SEED, cond=pack_text_conditioning(embeds, pooled),
                     uncond=pack_text_conditioning(negative, negative_pooled), progress=False)
    error, error_ours = latents - _sd3(tiny_sd3(), sigmas=trained), ours - fp_ours
    # measured 0.29: these levels lie up to 0.45 off dq's grid (Flux's above: 0.07) and CFG 2 doubles that
    assert (error - error_ours).abs().max() < 0.5 * error.abs().max()


def test_sd3_pipeline_exact_refuses_its_default_schedule_and_nearest_runs_it(sd3_parts):
    folder, _ = sd3_parts
    # StableDiffusion3Pipeline's own spacing runs to its smallest training σ, not to 1/T: another schedule
    with pytest.raises(ValueError, match=r"are not in the schedule .* \(4 steps: \[1000, 882\.352941, 714\.285714, 454\.545455\]\)"):
        _sd3(dq.load_student(folder))
    student = dq.load_student(folder, tpq_policy="nearest")
    rows = _rows_used(student)
    assert bool(torch.isfinite(_sd3(student)).all()) and rows[0] == 0 and rows == sorted(rows)
