"""A quantized cross-attention UNet inside a stock StableDiffusionPipeline with classifier-free guidance
(tiny random weights: UNet, VAE, CLIP text encoder and a CLIP tokenizer built from a toy vocabulary)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import dq
from dq.pretrained import save_student
from dq.quant import QuantConfig, key_by_timestep
from dq.sampling import SamplerConfig, planned_timesteps, sample, sample_seed
from tests.conftest import make_tiny_text_unet
from tests.export.conftest import calibrated_student

STEPS, GUIDANCE, SEED = 4, 5.0, 11
PROMPTS = ["a cat", "a red dog"]


def _tokenizer(tmp_path) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=6, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=6,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=8).eval()


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """(FP pipeline, quantized student folder, the sampler dq uses for the same schedule)."""
    root = tmp_path_factory.mktemp("sd")
    tokenizer = _tokenizer(root)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    unet = make_tiny_text_unet()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(name="ddim", num_steps=STEPS, spacing="uniform", guidance_scale=GUIDANCE)
    timesteps = planned_timesteps(scheduler.config, sampler)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4, 8, 6, generator=g)
    inputs = {i: torch.randn(4, 2, 8, 8, generator=g) for i in range(STEPS)}
    config = QuantConfig(weight_bits=8, act_bits=8, num_steps=STEPS, num_groups=STEPS)
    student = calibrated_student(unet, config, inputs, timesteps, cond)
    key_by_timestep(student, timesteps)
    folder = save_student(student, root / "student", scheduler_config=scheduler.config)
    return pipe, folder, sampler


def _run(pipe, unet, output_type="latent", steps=STEPS):
    pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(sample_seed(SEED, k)) for k in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generators,
                output_type=output_type).images


def test_quantized_unet_runs_in_stable_diffusion_pipeline_with_cfg(sd_parts):
    pipe, folder, sampler = sd_parts
    student = dq.load_student(folder)
    latents = _run(pipe, student)
    assert pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]
    # dq's own sampler, same generators, same text embeddings, same CFG: the same latents
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    ours = sample(student, pipe.scheduler.config, sampler, len(PROMPTS), seed=SEED, cond=cond, uncond=uncond,
                  progress=False)
    assert latents.shape == ours.shape == (2, 2, 8, 8)
    assert (latents - ours).abs().max() < 1e-4
    fp = _run(pipe, pipe.unet)
    assert 1e-4 < (latents - fp).abs().max() < 0.5 * fp.abs().max()  # quantized, and still close to FP
    images = _run(pipe, student, output_type="np")  # the whole pipeline, VAE decode included
    assert images.shape == (2, 8, 8, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_exact_refuses_and_nearest_runs_another_step_count(sd_parts):
    pipe, folder, _ = sd_parts
    with pytest.raises(ValueError, match=r"timestep\(s\) .* are not in the schedule .* \(4 steps: \[751, 501, 251, 1\]\)"):
        _run(pipe, dq.load_student(folder), steps=6)
    latents = _run(pipe, dq.load_student(folder, tpq_policy="nearest"), steps=6)
    assert latents.shape == (2, 2, 8, 8) and bool(torch.isfinite(latents).all())
