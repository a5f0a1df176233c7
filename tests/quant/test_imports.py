"""dq.quant is the torch-only core: importing it, and converting a model with it, loads neither diffusers nor
the architecture descriptions (dq.arch), which import it and hand their knowledge to the converter."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    """The top-level and dq modules loaded by a fresh interpreter that runs `code`."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_importing_dq_quant_loads_neither_diffusers_nor_dq_arch():
    loaded = _modules_after("import dq.quant")
    assert "dq.quant" in loaded and "torch" in loaded
    assert "diffusers" not in loaded and "dq.arch" not in loaded


def test_converting_a_described_torch_model_loads_neither():
    code = """
import torch
from torch import nn
from dq.quant import QuantConfig, quantize_model

class Layout:  # a description the caller writes itself: what dq.arch.describe gives for a known class
    first_layers, last_layers, modulation_layers = ("0",), (), ()
    skip_splits, attention, quantize_attention = {}, (), None

model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 3))
student = quantize_model(model, QuantConfig(num_steps=2, num_groups=2), Layout())
assert student[0].weight_quantizer.bits == 8 and student[2].weight_quantizer.bits == 4
"""
    loaded = _modules_after(code)
    assert "diffusers" not in loaded and "dq.arch" not in loaded
