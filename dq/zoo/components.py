"""The full-precision parts around a diffusion UNet: the first-stage autoencoder of a latent model (VQ or
KL) and the text encoder of a text-to-image model, or the class-embedding table of an LDM that feeds class
labels through cross-attention. They are never quantized and never part of BKD: the student is the UNet.

    components = load_components(cfg.model)      # vae/, text_encoder/ + tokenizer/, class_embedder/ if present
    images = to_images(components, samples)      # latents -> pixels in [-1, 1]; pixel models pass through

Folder layout (diffusers `save_pretrained`): `vae/` (AutoencoderKL or VQModel, config.json + safetensors),
`text_encoder/` (transformers CLIPTextModel, config.json + model.safetensors), `tokenizer/` (CLIPTokenizer
files); weights sharded or as a fp16/bf16 variant as `dq.zoo.loading.weights_variant` reads them, `class_embedder/embeddings.safetensors` (key `weight`, [num_classes + 1, D]). Loading reads JSON
and safetensors only, so it never executes code from the folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderKL, VQModel
from safetensors.torch import load_file
from torch import nn

from dq.errors import MissingFileError, UnsupportedError, UserError
from dq.io import read_json_object
from dq.zoo.loading import model_folder, read_layout, torch_dtype, weights_variant

VAE_CLASSES: dict[str, type[nn.Module]] = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
CLASS_EMBEDDINGS_FILE = Path("class_embedder") / "embeddings.safetensors"
TRANSFORMERS_REQUIREMENT = "transformers==5.23.0"


class ModelComponents(NamedTuple):
    vae: nn.Module | None = None  # FP first stage (eval mode), None for a pixel-space model
    latent_scale: float | None = None  # latents = scale * encoder output; decode divides by it
    text_encoder: nn.Module | None = None  # FP transformers CLIPTextModel (eval mode)
    tokenizer: Any = None  # transformers CLIPTokenizer
    class_embeddings: torch.Tensor | None = None  # float32 [num_classes + 1, D]: label -> cross-attention context

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    def decode_record(self) -> dict[str, Any] | None:
        """How samples become pixels, for results and metrics files: None for a pixel-space model."""
        return None if self.vae is None else {"vae": type(self.vae).__name__, "latent_scale": self.latent_scale}


def load_vae(folder: str | Path, *, variant: str | None = None, dtype: str | None = None) -> nn.Module:
    """The autoencoder of `folder/vae` (AutoencoderKL or VQModel by its config's _class_name), FP, eval mode;
    its weights as `dq.zoo.loading.weights_variant` finds them, in `dtype` (null: float32)."""
    vae_dir = Path(folder) / "vae"
    config_path = vae_dir / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} is missing: a latent model folder needs vae/ as save_pretrained writes it")
    class_name = read_json_object(config_path, "VAE config").get("_class_name")
    if class_name not in VAE_CLASSES:
        raise UserError(f"{config_path} has _class_name {class_name!r}; expected one of {sorted(VAE_CLASSES)}")
    vae = VAE_CLASSES[class_name].from_pretrained(vae_dir, use_safetensors=True, local_files_only=True,
                                                  variant=weights_variant(vae_dir, variant),
                                                  dtype=torch_dtype(dtype), low_cpu_mem_usage=False)
    return vae.eval().requires_grad_(False)


def load_text_encoder(folder: str | Path, *, variant: str | None = None, dtype: str | None = None
                      ) -> tuple[nn.Module, Any]:
    """(CLIPTextModel, CLIPTokenizer) of `folder/text_encoder` and `folder/tokenizer`, FP, eval mode; the
    encoder's weights one safetensors file, sharded, or a variant (`weights_variant`). Another encoder class
    (T5, Gemma) is refused in one line: dq encodes prompts with CLIP only so far."""
    root = Path(folder)
    config_path = root / "text_encoder" / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} is missing: text_encoder/ needs its config as save_pretrained writes it")
    config = read_json_object(config_path, "text encoder config")
    architectures = config.get("architectures") or []
    if architectures != ["CLIPTextModel"] and not (not architectures and config.get("model_type") == "clip_text_model"):
        raise UnsupportedError(f"{root / 'text_encoder'} holds {'/'.join(map(str, architectures)) or 'no named model'}; "
                               "dq encodes prompts with a CLIPTextModel only so far (SD 1.x / 2.x): give "
                               "model.conditioning.prompt_embeds_file with embeddings made by the model's pipeline")
    try:  # lazy: only text-to-image models need transformers
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise ImportError(
            f"{folder} has a text encoder: install transformers to load it (pip install {TRANSFORMERS_REQUIREMENT})"
        ) from err
    if not (root / "tokenizer").is_dir():
        raise MissingFileError(f"{root / 'tokenizer'} is missing: text_encoder/ needs its tokenizer/ beside it")
    text_encoder = CLIPTextModel.from_pretrained(
        root / "text_encoder", use_safetensors=True, local_files_only=True,
        variant=weights_variant(root / "text_encoder", variant, stem="model"), dtype=torch_dtype(dtype))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    return text_encoder.eval().requires_grad_(False), tokenizer


def load_components(model_cfg: Mapping[str, Any], folder: Path | None = None) -> ModelComponents:
    """The optional FP components of the folder a model config points at (`folder`, when the caller has
    resolved it already): those its model_index.json lists (or, without one, whose folders exist), with
    model.variant and model.dtype. `model.latent_scale` (if set) overrides the VAE config's scaling_factor:
    diffusers' VQModel config defaults it to SD's 0.18215, while the CompVis VQ LDMs were trained on
    unscaled latents (scale 1.0)."""
    folder = model_folder(model_cfg) if folder is None else folder
    layout = read_layout(folder)
    options = {"variant": model_cfg.get("variant"), "dtype": model_cfg.get("dtype")}
    vae = latent_scale = text_encoder = tokenizer = class_embeddings = None
    if layout.has_component("vae"):
        vae = load_vae(folder, **options)
        configured = model_cfg.get("latent_scale")
        latent_scale = float(configured if configured is not None else vae.config.get("scaling_factor", 1.0))
        if latent_scale <= 0:
            raise UserError(f"model.latent_scale must be > 0, got {latent_scale}")
    elif model_cfg.get("latent_scale") is not None:
        raise UserError(f"model.latent_scale is set but {folder} has no vae/ (a pixel-space model)")
    # prompt embeddings made elsewhere (SD3, Flux, PixArt so far) need no text encoder: it is not loaded
    embeds_file = (model_cfg.get("conditioning") or {}).get("prompt_embeds_file")
    if layout.has_component("text_encoder") and embeds_file is None:
        text_encoder, tokenizer = load_text_encoder(folder, **options)
    if (folder / CLASS_EMBEDDINGS_FILE).is_file():
        tensors = load_file(str(folder / CLASS_EMBEDDINGS_FILE))
        if "weight" not in tensors or tensors["weight"].ndim != 2:
            raise UserError(f"{folder / CLASS_EMBEDDINGS_FILE} must hold `weight` [num_classes + 1, D]")
        class_embeddings = tensors["weight"].float()
    return ModelComponents(vae, latent_scale, text_encoder, tokenizer, class_embeddings)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, scaling_factor: float, batch_size: int = 8) -> torch.Tensor:
    """Pixels float32 [N, C_img, H·f, W·f] in [-1, 1] on the CPU from latents [N, C_lat, H, W] (the sampler's
    output) of a latent model whose first stage is `vae` (AutoencoderKL or VQModel; a VQModel quantizes to
    its codebook first, as the LDM decoder does; a VAE config's shift_factor, as SD3's and Flux's, is added
    back after the scaling). Runs on the VAE's device and dtype, `batch_size` at a time
    (the decoder at 256²-512² is the memory peak of latent sampling)."""
    if latents.ndim != 4:
        raise UserError(f"latents must be [N, C, H, W], got shape {tuple(latents.shape)}")
    if latents.shape[1] != int(vae.config.latent_channels):
        raise UserError(
            f"latents have {latents.shape[1]} channels, the VAE expects {vae.config.latent_channels}; is this the "
            "model's own vae/?"
        )
    parameter = next(vae.parameters())
    shift = vae.config.get("shift_factor")  # SD3's and Flux's VAEs: latents = scale * (z - shift)
    images = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start : start + batch_size].to(device=parameter.device, dtype=parameter.dtype) / scaling_factor
        images.append(vae.decode(chunk if not shift else chunk + float(shift)).sample.float().cpu())
    return torch.cat(images).clamp(-1.0, 1.0)


def to_images(components: ModelComponents | None, samples: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] for sampler outputs [N, C, H, W]: decoded when the model is latent, else clamped."""
    if components is None or components.vae is None:
        return samples.clamp(-1.0, 1.0)
    return decode_latents(components.vae, samples, float(components.latent_scale))
