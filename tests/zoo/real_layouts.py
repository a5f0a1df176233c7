"""Tiny random pipelines saved in the layouts the real hub repos have, built offline from configs.

    folder = write_sd15(tmp / "sd15")                       # model_index.json, the UNet sharded with an index
    folder = write_sd15(tmp / "sd15_fp16", variant="fp16")  # the fp16 variant files only (*.fp16.safetensors)
    folder = write_sd3(tmp / "sd3")                         # StableDiffusion3Pipeline: transformer/ sharded

What a download of stable-diffusion-v1-5 holds (unet/, vae/, text_encoder/, tokenizer/, scheduler/ and
model_index.json naming StableDiffusionPipeline and each part's class), at toy widths: a cross-attention
UNet2DConditionModel on 2x8x8 latents, a one-block AutoencoderKL, a one-layer CLIPTextModel and a
CLIPTokenizer whose vocabulary is the letters a-z (built here; no hub files). The scheduler is SD 1.5's
PNDMScheduler config. Weights are written by DiffusionPipeline.save_pretrained: sharded at 100 KB (the UNet
becomes 3 shards and a diffusion_pytorch_model.safetensors.index.json, as FLUX.1's and SD3.5's transformers
ship), or as the fp16 variant only (what `hf download ... --include "*fp16*"` gives).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tests.conftest import make_tiny_text_unet

SHARD_SIZE = "100KB"
TOKEN_LENGTH = 8  # the tokenizer's model_max_length (77 in the real CLIP tokenizer)
PROMPTS = ("a cat", "a red dog", "two birds on a tree", "a house")


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer with a letters-only vocabulary (no merges), its files written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKEN_LENGTH)


def clip_text_encoder(vocab_size: int, hidden: int = 6, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=TOKEN_LENGTH, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def tiny_vae(latent_channels: int = 2, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=8).eval()


def sd15_scheduler() -> PNDMScheduler:
    """stable-diffusion-v1-5's scheduler/scheduler_config.json."""
    return PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, trained_betas=None)


def sd15_pipeline(work: Path) -> StableDiffusionPipeline:
    """A tiny random StableDiffusionPipeline (its tokenizer's source files under `work`)."""
    tokenizer = clip_tokenizer(work / "tokenizer_source")
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                                   unet=make_tiny_text_unet(), scheduler=sd15_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def write_sd15(root: Path, variant: str | None = None) -> Path:
    """An SD 1.5 pipeline folder at `root`: weights sharded with an index (variant None), or the `variant`
    (fp16) files only, the weights in half precision. Also writes root/prompts.txt (one prompt a line)."""
    pipe = sd15_pipeline(root.parent / f"{root.name}_work")
    if variant is None:
        pipe.save_pretrained(root, max_shard_size=SHARD_SIZE)
    else:
        pipe.to(torch.float16).save_pretrained(root, variant=variant)
    write_clip_tokenizer_files(pipe.tokenizer, root / "tokenizer")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def write_clip_tokenizer_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """tokenizer/ as the SD repos ship it (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json; no tokenizer.json), in place of what save_pretrained wrote."""
    for old in folder.iterdir():
        old.unlink()
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": tokenizer.model_max_length, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_sd3(root: Path) -> Path:
    """A StableDiffusion3Pipeline folder at `root` as stable-diffusion-3-medium-diffusers is saved: its
    transformer (tests.arch.test_flow_transformers' tiny SD3) sharded with an index, a VAE, the SD3 flow
    scheduler (shift 3.0), and its two CLIP encoders with projection and their tokenizers. The T5 encoder and
    tokenizer (text_encoder_3/) are left out (model_index.json lists them as absent): no T5 tokenizer can be
    built offline here. Also writes root/embeds.safetensors (prompt_embeds packed with the pooled row)."""
    from safetensors.torch import save_file

    from tests.arch.test_flow_transformers import _cond, tiny_sd3

    tokenizer = clip_tokenizer(root.parent / f"{root.name}_work")
    encoders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=6, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=TOKEN_LENGTH, projection_dim=6,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)
        encoders.append(CLIPTextModelWithProjection(config).eval())
    pipe = StableDiffusion3Pipeline(transformer=tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(latent_channels=4), text_encoder=encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.save_pretrained(root, max_shard_size="20KB")  # small enough to shard the tiny transformer
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer_files(tokenizer, root / name)
    save_file({"prompt_embeds": _cond("sd3", 4).contiguous(), "uncond_embeds": _cond("sd3", 1, seed=9).contiguous()},
              str(root / "embeds.safetensors"))
    return root
