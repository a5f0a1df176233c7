"""dq: DilateQuant quantization-aware training for diffusion models.

    import dq
    unet = dq.load_student("outputs/<run>/student", tpq_policy="nearest")   # a quantized diffusers UNet

`dq.load_student` / `dq.save_student` (`dq.pretrained`) are imported on first use, so that `import dq.quant`
stays free of diffusers.
"""

__version__ = "0.1.0"
__all__ = ["load_student", "save_student"]


def __getattr__(name: str):
    if name in ("load_student", "save_student"):
        from dq import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'dq' has no attribute {name!r}")
