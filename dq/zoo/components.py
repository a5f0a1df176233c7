"""The full-precision parts around a diffusion model's denoiser: the first-stage autoencoder of a latent
model (VQ, KL, or Sana's DC-AE), the text encoders and tokenizers of a text-to-image model, or the
class-embedding table of an LDM that feeds class labels through cross-attention. They are never quantized
and never part of BKD: the student is the denoiser.

    components = load_components(cfg.model)      # vae/, text_encoder*/ + tokenizer*/, class_embedder/ if present
    images = to_images(components, samples)      # latents -> pixels in [-1, 1]; pixel models pass through

Folder layout (diffusers `save_pretrained`, a hub download): `vae/` (AutoencoderKL, VQModel or
AutoencoderDC, config.json + safetensors); `text_encoder/`, `text_encoder_2/`, `text_encoder_3/` (the
transformers class model_index.json names: CLIP, CLIP with projection, T5 or Gemma 2) with `tokenizer/`,
`tokenizer_2/`, `tokenizer_3/` (CLIP, T5 or Gemma tokenizers; T5's spiece.model alone needs sentencepiece);
weights sharded or as a fp16/bf16 variant as `dq.zoo.loading.weights_variant` reads them;
`class_embedder/embeddings.safetensors` (key `weight`, [num_classes + 1, D], or [num_classes + 1, L, D]: a caption a label). Loading reads JSON,
tokenizer files and safetensors only, so it never executes code from the folder.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderDC, AutoencoderKL, VQModel
from safetensors.torch import load_file
from torch import nn

from dq.errors import MissingFileError, MissingPackageError, UnsupportedError, UserError
from dq.io import read_json_object
from dq.zoo.loading import FolderLayout, model_folder, read_layout, torch_dtype, weights_variant

VAE_CLASSES: dict[str, type[nn.Module]] = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel,
                                           "AutoencoderDC": AutoencoderDC}
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "Gemma2Model")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "GemmaTokenizer",
                     "GemmaTokenizerFast")
CLASS_EMBEDDINGS_FILE = Path("class_embedder") / "embeddings.safetensors"
TRANSFORMERS_REQUIREMENT = "transformers==5.23.0"


class ModelComponents(NamedTuple):
    vae: nn.Module | None = None  # FP first stage (eval mode), None for a pixel-space model
    latent_scale: float | None = None  # latents = scale * encoder output; decode divides by it
    text_encoder: nn.Module | None = None  # the first FP text encoder (eval mode), None without one
    tokenizer: Any = None  # its tokenizer
    class_embeddings: torch.Tensor | None = None  # float32 [num_classes + 1, (L,) D]: label -> cross-attention context
    text_parts: Mapping[str, Any] | None = None  # every text encoder and tokenizer, by folder name (None: not loaded)
    pipeline_class: str | None = None  # model_index.json's pipeline class: whose encode_prompt encodes prompts
    index: Mapping[str, Any] | None = None  # model_index.json (its pipeline settings, e.g. force_zeros_for_empty_prompt)
    text_names: tuple[str, ...] = ()  # the text encoders and tokenizers the folder holds, loaded or not

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


def _transformers_class(name: str, allowed: tuple[str, ...], where: Path) -> Any:
    """The transformers class `name` if dq loads it (a known text encoder or tokenizer), else a one-line
    refusal naming the folder."""
    if name not in allowed:
        raise UnsupportedError(f"{where} holds {name or 'no named class'}; dq loads the text encoders and "
                               f"tokenizers {list(allowed)} (or give model.conditioning.prompt_embeds_file)")
    try:  # lazy: only text-to-image models need transformers
        import transformers
    except ImportError as err:
        raise MissingPackageError(f"{where} is a text model's part: install transformers to load it "
                          f"(pip install {TRANSFORMERS_REQUIREMENT})") from err
    return getattr(transformers, name)


def _part_class(root: Path, name: str, index: Mapping[str, Any] | None) -> str:
    """The class of part `name` (text_encoder_2, tokenizer, ...): model_index.json's entry, or without an
    index a text encoder's config architectures and CLIPTokenizer (an SD folder saved part by part)."""
    entry = (index or {}).get(name)
    if isinstance(entry, list) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    if name.startswith("text_encoder"):
        config_path = root / name / "config.json"
        if not config_path.is_file():
            raise MissingFileError(f"{config_path} is missing: {name}/ needs its config as save_pretrained writes it")
        config = read_json_object(config_path, "text encoder config")
        architectures = config.get("architectures") or []
        if not architectures and config.get("model_type") == "clip_text_model":
            return "CLIPTextModel"
        return "/".join(map(str, architectures))
    return "CLIPTokenizer"


def load_text_part(folder: str | Path, name: str, *, index: Mapping[str, Any] | None = None,
                   variant: str | None = None, dtype: str | None = None) -> Any:
    """Text encoder or tokenizer `name` of `folder` (text_encoder, text_encoder_2, text_encoder_3,
    tokenizer, ...) as the class model_index.json names for it: CLIP, CLIP with projection, T5 or Gemma 2
    encoders (FP, eval mode, weights one safetensors file, sharded, or a variant: `weights_variant`) and
    their tokenizers, from local files only."""
    root = Path(folder)
    where = root / name
    if not where.is_dir():
        raise MissingFileError(f"{where} is missing: the model folder lists {name} but has no such folder")
    class_name = _part_class(root, name, index)
    if name.startswith("text_encoder"):
        cls = _transformers_class(class_name, TEXT_ENCODER_CLASSES, where)
        encoder = cls.from_pretrained(where, use_safetensors=True, local_files_only=True,
                                      variant=weights_variant(where, variant, stem="model"), dtype=torch_dtype(dtype))
        return encoder.eval().requires_grad_(False)
    cls = _transformers_class(class_name, TOKENIZER_CLASSES, where)
    has_json = (where / "tokenizer.json").is_file()
    if not has_json and (where / "spiece.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise MissingPackageError(f"{where} ships spiece.model without tokenizer.json: reading it needs sentencepiece "
                          "(pip install sentencepiece)")
    return cls.from_pretrained(where, local_files_only=True)


def load_text_parts(folder: str | Path, layout: FolderLayout, *, variant: str | None = None,
                    dtype: str | None = None) -> dict[str, Any]:
    """{part name: loaded part} for every text encoder and tokenizer the folder holds (`load_text_part`)."""
    return {name: load_text_part(folder, name, index=layout.index, variant=variant, dtype=dtype)
            for name in TEXT_PARTS if layout.has_component(name)}


def load_components(model_cfg: Mapping[str, Any], folder: Path | None = None, *, text: bool = True
                    ) -> ModelComponents:
    """The optional FP components of the folder a model config points at (`folder`, when the caller has
    resolved it already): those its model_index.json lists (or, without one, whose folders exist), with
    model.variant and model.dtype. `model.latent_scale` (if set) overrides the VAE config's scaling_factor:
    diffusers' VQModel config defaults it to SD's 0.18215, while the CompVis VQ LDMs were trained on
    unscaled latents (scale 1.0). text=False: the text encoders and tokenizers are named (text_names) but not
    loaded."""
    folder = model_folder(model_cfg) if folder is None else folder
    layout = read_layout(folder)
    options = {"variant": model_cfg.get("variant"), "dtype": model_cfg.get("dtype")}
    vae = latent_scale = class_embeddings = None
    if layout.has_component("vae"):
        vae = load_vae(folder, **options)
        configured = model_cfg.get("latent_scale")
        latent_scale = float(configured if configured is not None else vae.config.get("scaling_factor", 1.0))
        if latent_scale <= 0:
            raise UserError(f"model.latent_scale must be > 0, got {latent_scale}")
    elif model_cfg.get("latent_scale") is not None:
        raise UserError(f"model.latent_scale is set but {folder} has no vae/ (a pixel-space model)")
    # prompt embeddings made elsewhere need no text encoder: it is not loaded
    embeds_file = (model_cfg.get("conditioning") or {}).get("prompt_embeds_file")
    text_names = () if embeds_file is not None else tuple(n for n in TEXT_PARTS if layout.has_component(n))
    # text=False leaves them on disk: dq.zoo.conditioning loads them only to encode prompts not in its cache
    text_parts = load_text_parts(folder, layout, **options) if text and text_names else None
    text_encoder = next((text_parts[n] for n in text_names if n.startswith("text_encoder")), None) if text_parts else None
    tokenizer = text_parts.get("tokenizer") if text_parts else None
    if (folder / CLASS_EMBEDDINGS_FILE).is_file():
        tensors = load_file(str(folder / CLASS_EMBEDDINGS_FILE))
        if "weight" not in tensors or tensors["weight"].ndim not in (2, 3):
            raise UserError(f"{folder / CLASS_EMBEDDINGS_FILE} must hold `weight` [num_classes + 1, D] (one "
                            "token a label) or [num_classes + 1, L, D] (a caption of L tokens a label)")
        class_embeddings = tensors["weight"].float()
    return ModelComponents(vae, latent_scale, text_encoder, tokenizer, class_embeddings, text_parts,
                           layout.pipeline_class, layout.index, text_names)


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
