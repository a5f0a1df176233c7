"""The real low-bit model: export a trained student as packed integer codes with its per-step TPQ tables, and
run it with integer kernels. Imports torch, safetensors and diffusers (never Lightning, Hydra or W&B).

    export_student(student, "student_int.safetensors", timesteps)     # or: python -m dq.export run=<run dir>
    unet = load_int_model("student_int.safetensors")                  # a diffusers UNet with integer layers
    sample(unet, ...)                                                  # dq's sampler drives it unchanged
    fast = compile_int_model(unet, glue="bf16")                        # torch.compile: fused quantize, bf16 glue
"""

from dq.export.artifact import Export, ExportError, export_student, read_export
from dq.export.compiled import CompiledIntModel, compile_int_model
from dq.export.layers import IntActQuantizer, IntConv2d, IntLinear
from dq.export.runtime import int_model_from_export, int_twin, load_int_model

__all__ = [
    "CompiledIntModel",
    "Export",
    "ExportError",
    "IntActQuantizer",
    "IntConv2d",
    "IntLinear",
    "compile_int_model",
    "export_student",
    "int_model_from_export",
    "int_twin",
    "load_int_model",
    "read_export",
]
