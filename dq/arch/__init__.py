"""Facts about diffusers architectures that several layers of dq need (model loading, the integer runtime).
Imports torch and diffusers only."""

from dq.arch.attention import attention_heads, set_attention_heads

__all__ = ["attention_heads", "set_attention_heads"]
