"""What dq knows about model architectures, as descriptions (dq.arch.description): one module per backbone
family registers a describer; BKD reads a model's structure from `describe(model)` and its callers hand it to the
converter (`dq.quant.quantize_model(model, config, describe(model))`).
Also the diffusers UNet classes and their builder, and the head counts of diffusers attention modules (their
quantized processors are dq.quant's: the converter installs them where a description names attention)."""

from dq.arch import flow_transformers as _flow_transformers  # noqa: F401  (registers SD3/Flux/Sana)
from dq.arch import transformer2d as _transformer2d  # noqa: F401  (registers the DiT / PixArt descriptions)
from dq.arch import unet2d as _unet2d  # noqa: F401  (registers the UNet description)
from dq.arch.attention import attention_heads, set_attention_heads
from dq.arch.classes import DENOISER_CLASSES, build_denoiser
from dq.arch.description import (
    Architecture,
    cond_kwargs,
    describe,
    described_classes,
    model_call,
    register,
    sample_shape,
)
from dq.arch.text_conditioning import pack_text_conditioning, text_fields, unpack_text_conditioning

__all__ = [
    "DENOISER_CLASSES",
    "Architecture",
    "attention_heads",
    "cond_kwargs",
    "build_denoiser",
    "describe",
    "described_classes",
    "model_call",
    "pack_text_conditioning",
    "register",
    "sample_shape",
    "set_attention_heads",
    "text_fields",
    "unpack_text_conditioning",
]
