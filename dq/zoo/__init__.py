"""The model zoo: dq's embedded digits DDPM (trained by dq/zoo/recipe_digits.py), the loader for it, for any
diffusers model folder and for hub checkpoints in the local cache, the FP components around a UNet (VAE,
text encoder) and the conditioning of a model config."""

from dq.zoo.components import ModelComponents, decode_latents, load_components, to_images
from dq.zoo.conditioning import ModelConditioning, encode_prompts, model_conditioning, read_prompts
from dq.zoo.loading import EMBEDDED_MODEL_DIR, LoadedModel, load_model, load_model_folder, model_folder

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "LoadedModel",
    "ModelComponents",
    "ModelConditioning",
    "decode_latents",
    "encode_prompts",
    "load_components",
    "load_model",
    "load_model_folder",
    "model_conditioning",
    "model_folder",
    "read_prompts",
    "to_images",
]
