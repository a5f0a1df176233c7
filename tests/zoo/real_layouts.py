"""Tiny random pipelines saved in the layouts the real hub repos have, built offline from configs.

    folder = write_sd15(tmp / "sd15")                       # model_index.json, the UNet sharded with an index
    folder = write_sd15(tmp / "sd15_fp16", variant="fp16")  # the fp16 variant files only (*.fp16.safetensors)
    folder = write_sd3(tmp / "sd3")                         # StableDiffusion3Pipeline: transformer/ sharded
    folder = WRITERS["flux_dev"](tmp / "flux")              # any family; PIPELINE_KWARGS["flux_dev"] to call it

What a download of stable-diffusion-v1-5 holds (unet/, vae/, text_encoder/, tokenizer/, scheduler/ and
model_index.json naming StableDiffusionPipeline and each part's class), at toy widths: a cross-attention
UNet2DConditionModel on 2x8x8 latents, a one-block AutoencoderKL, a one-layer CLIPTextModel and a
CLIPTokenizer whose vocabulary is the letters a-z (built here; no hub files). The scheduler is SD 1.5's
PNDMScheduler config. Weights are written by DiffusionPipeline.save_pretrained: sharded at 100 KB (the UNet
becomes 3 shards and a diffusion_pytorch_model.safetensors.index.json, as FLUX.1's and SD3.5's transformers
ship), or as the fp16 variant only (what `hf download ... --include "*fp16*"` gives).

The other writers, each `write_X(root, variant=None) -> root` (root/prompts.txt holds PROMPTS):

- write_sd14: CompVis/stable-diffusion-v1-4, the SD 1.5 layout (the same PNDMScheduler config).
- write_sd21: stabilityai/stable-diffusion-2-1, a linear-projection UNet on 4x8x8 latents, SD 2.1's
  v-prediction DDIMScheduler, and a CLIPTokenizer padding with "!" as SD 2.x's does.
- write_sdxl: stabilityai/stable-diffusion-xl-base-1.0, a UNet with SDXL's text_time conditioning on both
  encoders (CLIPTextModel, CLIPTextModelWithProjection; tokenizer_2 pads with "!"), SDXL's
  EulerDiscreteScheduler, force_zeros_for_empty_prompt.
- write_pixart_sigma: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, PixArtTransformer2DModel (learned sigma, no
  additional conditions), a T5EncoderModel saved in 2 shards, the T5Tokenizer as spiece.model,
  tokenizer_config.json and special_tokens_map.json (no tokenizer.json), PixArt's DPMSolverMultistepScheduler.
- write_pixart_alpha_1024: PixArt-alpha/PixArt-XL-2-1024-MS, the same parts with sample_size 128 and the
  resolution / aspect-ratio conditions; called at 8x8 pixels (8x8 latents) without resolution binning.
- write_sd3_full: stabilityai/stable-diffusion-3-medium-diffusers, the two CLIP encoders with projection and
  the T5 encoder (text_encoder_3/ in 2 shards, tokenizer_3/ with tokenizer.json), 16 latent channels.
- write_flux: black-forest-labs/FLUX.1-schnell (dev=True: FLUX.1-dev, guidance embedding, shift 3.0 with
  dynamic shifting), the transformer and the T5 encoder sharded, a 4-block VAE (vae_scale_factor 8).
- write_sana: Efficient-Large-Model/Sana_1600M_1024px_diffusers, SanaTransformer2DModel, a 3-block
  AutoencoderDC (vae_scale_factor 4), a Gemma2Model and the GemmaTokenizer files (tokenizer.json and a
  sentencepiece BPE tokenizer.model), Sana's flow DPMSolverMultistepScheduler.

The denoiser (and the T5 / Gemma encoders where the real repo shards them) is saved in at least 2 shards with
its index; a `variant` (fp16, bf16) writes that variant's files only, unsharded, in half precision. The T5
and Gemma tokenizers are trained here by sentencepiece on PROMPTS and the letters (deterministic, offline).
Their model_max_length is TOKEN_LENGTH: the pipelines pass max_sequence_length to the tokenizer themselves
(PixArt-Sigma 300, SD3 256, FLUX 512, Sana 300), so a call passes PIPELINE_KWARGS' small value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from tests.conftest import make_tiny_text_unet

SHARD_SIZE = "100KB"
TOKEN_LENGTH = 8  # the tokenizer's model_max_length (77 in the real CLIP tokenizer)
PROMPTS = ("a cat", "a red dog", "two birds on a tree", "a house")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_PAD = "<|endoftext|>"


def clip_tokenizer(folder: Path, pad_token: str = CLIP_PAD) -> CLIPTokenizer:
    """A CLIPTokenizer with a letters-only vocabulary (no merges), its files written to `folder`; a pad token
    other than <|endoftext|> (SD 2.x's and SDXL's tokenizer_2 pad with "!") joins the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in LETTERS + ("" if pad_token == CLIP_PAD else pad_token):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKEN_LENGTH,
                         pad_token=pad_token)


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
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": tokenizer.pad_token,
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": tokenizer.model_max_length, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_sd3(root: Path) -> Path:
    """A StableDiffusion3Pipeline folder at `root` as stable-diffusion-3-medium-diffusers is saved: its
    transformer (tests.arch.test_flow_transformers' tiny SD3) sharded with an index, a VAE, the SD3 flow
    scheduler (shift 3.0), and its two CLIP encoders with projection and their tokenizers. The T5 encoder and
    tokenizer (text_encoder_3/) are left out (model_index.json lists them as absent; write_sd3_full has
    them). Also writes root/embeds.safetensors (prompt_embeds packed with the pooled row)."""
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


def _work(root: Path) -> Path:
    """The folder beside `root` where a writer builds its tokenizers' source files."""
    return root.parent / f"{root.name}_work"


def _write_prompts(root: Path) -> Path:
    """root/prompts.txt, PROMPTS one a line; returns `root`."""
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _two_shards(model: torch.nn.Module) -> int:
    """A max_shard_size (bytes) that splits `model`'s weights into at least two shards."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 2


def _save(pipe: DiffusionPipeline, root: Path, variant: str | None, sharded: tuple[str, ...]) -> None:
    """pipe.save_pretrained, then the `sharded` parts again in >= 2 shards with their index; with a
    `variant`, only that variant's files, unsharded, in its half precision."""
    if variant is not None:
        pipe.to(HALF[variant]).save_pretrained(root, variant=variant)
        return
    pipe.save_pretrained(root)
    for name in sharded:
        part = getattr(pipe, name)
        shutil.rmtree(root / name)
        part.save_pretrained(root / name, max_shard_size=_two_shards(part))


def _install_files(source: Path, folder: Path) -> None:
    """`folder` holding exactly the files of `source` (a tokenizer as the hub repo ships it)."""
    shutil.rmtree(folder)
    shutil.copytree(source, folder)


def _edit_model_index(root: Path, **parts: list[str] | None) -> None:
    """model_index.json entries set to the real repo's (None: an entry the real one does not have)."""
    index = json.loads((root / "model_index.json").read_text())
    for name, entry in parts.items():
        if entry is None:
            index.pop(name, None)
        else:
            index[name] = entry
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _clip(cls: type, vocab_size: int, hidden: int, seed: int, act: str = "quick_gelu"):
    """A two-layer CLIP text encoder of class `cls` (with or without projection, projection_dim = hidden)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKEN_LENGTH,
                            projection_dim=hidden, hidden_act=act, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return cls(config).eval()


def _t5(vocab_size: int, d_model: int = 16, seed: int = 0) -> T5EncoderModel:
    """A T5 v1.1 encoder (gated-gelu, untied embeddings) at toy width."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, blocks: int = 1, seed: int = 0, **config) -> AutoencoderKL:
    """An AutoencoderKL of `blocks` 8-wide blocks (vae_scale_factor 2 ** (blocks - 1))."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=4, sample_size=8,
                         **config).eval()


def _train_sentencepiece(path: Path, **options) -> None:
    """A sentencepiece model trained on PROMPTS and the letters, written to `path`; trained in memory on one
    thread, so its bytes do not depend on the machine or the folder."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter((*PROMPTS, " ".join(LETTERS))),
                                             model_writer=model, minloglevel=2, hard_vocab_limit=False,
                                             num_threads=1, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())


def t5_tokenizer_files(folder: Path, tokenizer_json: bool) -> T5Tokenizer:
    """A T5Tokenizer's files as the hub repos ship them in `folder`: spiece.model (unigram; <pad> 0, </s> 1,
    <unk> 2, 100 <extra_id_*>), tokenizer_config.json, special_tokens_map.json, and tokenizer.json when
    `tokenizer_json` (SD3's tokenizer_3/, FLUX's tokenizer_2/; PixArt's tokenizer/ has none)."""
    _train_sentencepiece(folder / "spiece.model", model_type="unigram", vocab_size=32, pad_id=0, eos_id=1,
                         unk_id=2, bos_id=-1)
    extra = [f"<extra_id_{i}>" for i in range(100)]
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "clean_up_tokenization_spaces": True, "extra_ids": len(extra), "legacy": True,
              "model_max_length": TOKEN_LENGTH, "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = T5Tokenizer.from_pretrained(folder)
    if tokenizer_json:
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def gemma_tokenizer_files(folder: Path) -> GemmaTokenizer:
    """A GemmaTokenizer's files as gemma-2 (and Sana's tokenizer/) ship them in `folder`: tokenizer.model (a
    sentencepiece BPE with byte fallback; <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4), tokenizer.json,
    tokenizer_config.json (add_bos_token) and special_tokens_map.json."""
    turns = ["<start_of_turn>", "<end_of_turn>"]
    _train_sentencepiece(folder / "tokenizer.model", model_type="bpe", vocab_size=300, pad_id=0, eos_id=1, bos_id=2,
                         unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                         control_symbols=["<mask>", *turns], byte_fallback=True, add_dummy_prefix=False,
                         split_digits=True)
    special = {"additional_special_tokens": turns, "bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": TOKEN_LENGTH, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
              "tokenizer_class": "GemmaTokenizer", "use_default_system_prompt": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    GemmaTokenizer.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))
    return GemmaTokenizer.from_pretrained(folder)


def write_sd14(root: Path, variant: str | None = None) -> Path:
    """A CompVis/stable-diffusion-v1-4 folder: SD 1.4's layout and scheduler are SD 1.5's."""
    return write_sd15(root, variant)


def write_sd21(root: Path, variant: str | None = None) -> Path:
    """A stabilityai/stable-diffusion-2-1 folder: v-prediction DDIM, the tokenizer padding with "!"."""
    tokenizer = clip_tokenizer(_work(root) / "tokenizer", pad_token="!")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=(2, 4), use_linear_projection=True).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=_clip(CLIPTextModel, len(tokenizer), 8, 0, "gelu"),
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    _save(pipe, root, variant, sharded=("unet",))
    write_clip_tokenizer_files(tokenizer, root / "tokenizer")
    _edit_model_index(root, image_encoder=None)
    return _write_prompts(root)


def write_sdxl(root: Path, variant: str | None = None) -> Path:
    """A stabilityai/stable-diffusion-xl-base-1.0 folder: text_time conditioning on the pooled projection of
    text_encoder_2 and 6 size / crop numbers, cross-attention on both encoders' hidden states (6 + 8)."""
    tokenizer = clip_tokenizer(_work(root) / "tokenizer")
    tokenizer_2 = clip_tokenizer(_work(root) / "tokenizer_2", pad_token="!")
    text_encoder = _clip(CLIPTextModel, len(tokenizer), 6, 0)
    text_encoder_2 = _clip(CLIPTextModelWithProjection, len(tokenizer_2), 8, 1, "gelu")
    time_dim = 4
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), cross_attention_dim=6 + 8,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=8 + 6 * time_dim).eval()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear",
                                       use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(vae=_vae(4, scaling_factor=0.13025, force_upcast=True),
                                     text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    _save(pipe, root, variant, sharded=("unet",))
    write_clip_tokenizer_files(tokenizer, root / "tokenizer")
    write_clip_tokenizer_files(tokenizer_2, root / "tokenizer_2")
    _edit_model_index(root, image_encoder=None, feature_extractor=None)
    return _write_prompts(root)


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    """The PixArt-α / PixArt-Σ repos' scheduler/scheduler_config.json."""
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                       beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", lower_order_final=True, prediction_type="epsilon",
                                       timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False)


def _write_pixart(root: Path, variant: str | None, sigma: bool) -> Path:
    """A PixArt-Σ (sigma) or PixArt-α 1024 pipeline folder."""
    tokenizer = t5_tokenizer_files(_work(root) / "tokenizer", tokenizer_json=False)
    text_encoder = _t5(len(tokenizer))
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8 if sigma else 128, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
        activation_fn="gelu-approximate", attention_bias=True, use_additional_conditions=not sigma).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=pixart_scheduler(),
               vae=_vae(4, scaling_factor=0.13025 if sigma else 0.18215))
    _save(pipe, root, variant, sharded=("transformer", "text_encoder"))
    _install_files(_work(root) / "tokenizer", root / "tokenizer")
    return _write_prompts(root)


def write_pixart_sigma(root: Path, variant: str | None = None) -> Path:
    """A PixArt-alpha/PixArt-Sigma-XL-2-1024-MS folder (the SDXL VAE's scaling factor)."""
    return _write_pixart(root, variant, sigma=True)


def write_pixart_alpha_1024(root: Path, variant: str | None = None) -> Path:
    """A PixArt-alpha/PixArt-XL-2-1024-MS folder: sample_size 128, which is what makes PixArtAlphaPipeline
    pass the resolution and aspect ratio its use_additional_conditions transformer needs, so its default
    size is 128 latents: call it with PIPELINE_KWARGS' 8x8 (no resolution binning)."""
    return _write_pixart(root, variant, sigma=False)


def write_sd3_full(root: Path, variant: str | None = None) -> Path:
    """A stabilityai/stable-diffusion-3-medium-diffusers folder with all three text encoders: the CLIP
    hidden states (6 + 6, padded) and the T5's (16) share the joint attention width, the pooled
    projections (6 + 6) make the 12 pooled features; tokenizer_2 pads with "!"."""
    work = _work(root)
    tokenizer = clip_tokenizer(work / "tokenizer")
    tokenizer_2 = clip_tokenizer(work / "tokenizer_2", pad_token="!")
    tokenizer_3 = t5_tokenizer_files(work / "tokenizer_3", tokenizer_json=True)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=12,
                                        pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(CLIPTextModelWithProjection, len(tokenizer), 6, 0), tokenizer=tokenizer,
        text_encoder_2=_clip(CLIPTextModelWithProjection, len(tokenizer_2), 6, 1, "gelu"), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(len(tokenizer_3), seed=2), tokenizer_3=tokenizer_3)
    _save(pipe, root, variant, sharded=("transformer", "text_encoder_3"))
    write_clip_tokenizer_files(tokenizer, root / "tokenizer")
    write_clip_tokenizer_files(tokenizer_2, root / "tokenizer_2")
    _install_files(work / "tokenizer_3", root / "tokenizer_3")
    _edit_model_index(root, image_encoder=None, feature_extractor=None,
                      tokenizer_3=["transformers", "T5TokenizerFast"])
    return _write_prompts(root)


def write_flux(root: Path, variant: str | None = None, dev: bool = False) -> Path:
    """A black-forest-labs/FLUX.1-schnell folder (dev: FLUX.1-dev, with the guidance embedding and shift 3.0
    under dynamic shifting; schnell's schedule is unshifted, as its scheduler_config.json has it). The VAE
    has FLUX's 4 blocks, so vae_scale_factor is 8: FluxPipeline(height=64, width=64) makes 16x8x8 latents
    (16 packed tokens of 64)."""
    work = _work(root)
    tokenizer = clip_tokenizer(work / "tokenizer")
    tokenizer_2 = t5_tokenizer_files(work / "tokenizer_2", tokenizer_json=True)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=dev, axes_dims_rope=(2, 2, 4)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if dev else 1.0,
                                                use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    vae = _vae(16, blocks=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=_clip(CLIPTextModel, len(tokenizer), 8, 0),
                        tokenizer=tokenizer, text_encoder_2=_t5(len(tokenizer_2), seed=1), tokenizer_2=tokenizer_2,
                        transformer=transformer)
    _save(pipe, root, variant, sharded=("transformer", "text_encoder_2"))
    write_clip_tokenizer_files(tokenizer, root / "tokenizer")
    _install_files(work / "tokenizer_2", root / "tokenizer_2")
    _edit_model_index(root, image_encoder=None, feature_extractor=None,
                      tokenizer_2=["transformers", "T5TokenizerFast"])
    return _write_prompts(root)


def write_flux_dev(root: Path, variant: str | None = None) -> Path:
    """A black-forest-labs/FLUX.1-dev folder (write_flux with dev=True)."""
    return write_flux(root, variant, dev=True)


def write_sana(root: Path, variant: str | None = None) -> Path:
    """An Efficient-Large-Model/Sana_1600M_1024px_diffusers folder: the Gemma2Model's hidden states (8) are the
    captions; the AutoencoderDC has 3 blocks (vae_scale_factor 4), so SanaPipeline(height=32, width=32) (its
    least multiple of 32) makes 8x8 latents. The scheduler is the repo's flow DPMSolverMultistepScheduler."""
    tokenizer = gemma_tokenizer_files(_work(root) / "tokenizer")
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, query_pre_attn_scalar=4, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)).eval()
    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                        upsample_block_type="interpolate", downsample_block_type="Conv",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=8, mlp_ratio=2.5, sample_size=8,
                                         patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6).eval()
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", lower_order_final=True,
                                            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            final_sigmas_type="zero", timestep_spacing="linspace", steps_offset=0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    _save(pipe, root, variant, sharded=("transformer", "text_encoder"))
    _install_files(_work(root) / "tokenizer", root / "tokenizer")
    _edit_model_index(root, tokenizer=["transformers", "GemmaTokenizerFast"])
    return _write_prompts(root)


WRITERS = {"sd14": write_sd14, "sd15": write_sd15, "sd21": write_sd21, "sdxl": write_sdxl,
           "pixart_sigma": write_pixart_sigma, "pixart_alpha_1024": write_pixart_alpha_1024, "sd3": write_sd3_full,
           "flux_schnell": write_flux, "flux_dev": write_flux_dev, "sana": write_sana}

_SMALL = {"height": 8, "width": 8}
PIPELINE_KWARGS = {
    "sd14": {**_SMALL},
    "sd15": {**_SMALL},
    "sd21": {**_SMALL},
    "sdxl": {**_SMALL},
    "pixart_sigma": {**_SMALL, "max_sequence_length": TOKEN_LENGTH, "use_resolution_binning": False},
    "pixart_alpha_1024": {**_SMALL, "max_sequence_length": TOKEN_LENGTH, "use_resolution_binning": False},
    "sd3": {**_SMALL, "max_sequence_length": TOKEN_LENGTH},
    "flux_schnell": {"height": 64, "width": 64, "max_sequence_length": TOKEN_LENGTH},
    "flux_dev": {"height": 64, "width": 64, "max_sequence_length": TOKEN_LENGTH},
    "sana": {"height": 32, "width": 32, "max_sequence_length": TOKEN_LENGTH, "use_resolution_binning": False},
}
