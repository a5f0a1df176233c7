"""Every pipeline folder tests/zoo/real_layouts.py writes is one diffusers reads as the hub repo it imitates:
its pipeline class loads it offline (the denoiser from its shards and index, or the variant's files), the
loaded tokenizers read the prompts, its encode_prompt embeds them, and its own __call__ runs 2 steps to
finite latents with PIPELINE_KWARGS[family] (the small sizes and sequence length the tiny parts need)."""

import inspect
import json

import pytest
import torch
from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from tests.zoo.real_layouts import PIPELINE_KWARGS, PROMPTS, WRITERS

CLIP = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
T5 = ["special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
T5_JSON = ["special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]
GEMMA = ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]

# family: (pipeline class, denoiser folder, {tokenizer folder: its files})
LAYOUTS = {
    "sd14": (StableDiffusionPipeline, "unet", {"tokenizer": CLIP}),
    "sd15": (StableDiffusionPipeline, "unet", {"tokenizer": CLIP}),
    "sd21": (StableDiffusionPipeline, "unet", {"tokenizer": CLIP}),
    "sdxl": (StableDiffusionXLPipeline, "unet", {"tokenizer": CLIP, "tokenizer_2": CLIP}),
    "pixart_sigma": (PixArtSigmaPipeline, "transformer", {"tokenizer": T5}),
    "pixart_alpha_1024": (PixArtAlphaPipeline, "transformer", {"tokenizer": T5}),
    "sd3": (StableDiffusion3Pipeline, "transformer", {"tokenizer": CLIP, "tokenizer_2": CLIP, "tokenizer_3": T5_JSON}),
    "flux_schnell": (FluxPipeline, "transformer", {"tokenizer": CLIP, "tokenizer_2": T5_JSON}),
    "flux_dev": (FluxPipeline, "transformer", {"tokenizer": CLIP, "tokenizer_2": T5_JSON}),
    "sana": (SanaPipeline, "transformer", {"tokenizer": GEMMA}),
}
CASES = [(family, None) for family in WRITERS] + [("sd21", "fp16"), ("sdxl", "fp16")]


def test_every_writer_has_a_layout_and_call_kwargs():
    assert set(WRITERS) == set(LAYOUTS) == set(PIPELINE_KWARGS)


@pytest.mark.parametrize(("family", "variant"), CASES, ids=[f"{f}-{v}" if v else f for f, v in CASES])
def test_folder_loads_encodes_and_runs_with_its_pipeline(family, variant, tmp_path):
    cls, denoiser, tokenizers = LAYOUTS[family]
    folder = WRITERS[family](tmp_path / family, variant)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls.__name__
    assert (folder / "prompts.txt").read_text().splitlines() == list(PROMPTS)
    weights = sorted(path.name for path in (folder / denoiser).iterdir())
    if variant is None:
        shards = [name for name in weights if name.endswith(".safetensors")]
        assert "diffusion_pytorch_model.safetensors.index.json" in weights and len(shards) >= 2, weights
    else:
        assert weights == ["config.json", f"diffusion_pytorch_model.{variant}.safetensors"]
    for name, files in tokenizers.items():
        assert sorted(path.name for path in (folder / name).iterdir()) == files, name

    pipe = cls.from_pretrained(folder, variant=variant, dtype=torch.float32, local_files_only=True)
    prompts = list(PROMPTS[:2])
    for name in tokenizers:
        tokenizer = getattr(pipe, name)
        texts = tokenizer.batch_decode(tokenizer(prompts).input_ids, skip_special_tokens=True)
        assert [text.strip() for text in texts] == prompts, name

    kwargs = PIPELINE_KWARGS[family]
    options = {"prompt": prompts, "prompt_2": None, "prompt_3": None, "device": "cpu", "num_images_per_prompt": 1,
               "do_classifier_free_guidance": True, **kwargs}
    accepted = inspect.signature(pipe.encode_prompt).parameters
    embeds = pipe.encode_prompt(**{k: v for k, v in options.items() if k in accepted})
    tensors = [t for t in embeds if isinstance(t, torch.Tensor)]
    assert tensors[0].shape[0] == len(prompts) and all(bool(torch.isfinite(t).all()) for t in tensors)

    latents = pipe(prompts, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                   **kwargs).images
    assert latents.shape[0] == len(prompts) and latents[0].numel() == pipe.vae.config.latent_channels * 8 * 8
    assert bool(torch.isfinite(latents).all())
