"""dq: DilateQuant quantization-aware training for diffusion models."""

__version__ = "0.1.0"
