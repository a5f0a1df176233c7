"""Facts about diffusers architectures that several layers of dq need (model loading, the integer runtime,
student folders). Imports torch and diffusers only."""

from dq.arch.attention import attention_heads, set_attention_heads
from dq.arch.unets import UNET_CLASSES, build_unet

__all__ = ["UNET_CLASSES", "attention_heads", "build_unet", "set_attention_heads"]
