"""The model zoo: dq's embedded digits DDPM (trained by dq/zoo/recipe_digits.py), the loader for it, for any
diffusers model folder and for hub checkpoints in the local cache, the FP components around a UNet (VAE,
text encoder) and the conditioning of a model config; `load_model` returns all of them as one bundle."""

from dq.zoo.bundle import ModelBundle, load_model
from dq.zoo.components import ModelComponents, decode_latents, load_components, to_images
from dq.zoo.conditioning import ModelConditioning, encode_prompts, model_conditioning, read_prompts
from dq.zoo.loading import EMBEDDED_MODEL_DIR, load_model_folder, model_folder, model_sampler

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "ModelBundle",
    "ModelComponents",
    "ModelConditioning",
    "decode_latents",
    "encode_prompts",
    "load_components",
    "load_model",
    "load_model_folder",
    "model_conditioning",
    "model_folder",
    "model_sampler",
    "read_prompts",
    "to_images",
]
