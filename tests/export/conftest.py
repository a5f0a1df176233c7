"""Calibrated tiny students and the embedded model's, for the export tests."""

import pytest
import torch

from dq.arch import describe
from dq.quant import QuantConfig, calibrate_activations, quantize_model, set_step
from dq.sampling import planned_timesteps, sample, unet_forward
from tests.quant.conftest import tiny_unet2d

TINY_STEPS = 3
TINY_TIMESTEPS = [900, 500, 100]


def calibrated_student(unet, config: QuantConfig, trajectories: dict[int, torch.Tensor], timesteps,
                       cond: torch.Tensor | None = None) -> torch.nn.Module:
    """A student whose TPQ tables come from per-step inputs {step: x [B, C, H, W]} (no training); cond:
    class labels or text embeddings for a conditional UNet."""
    student = quantize_model(unet, config, describe(unet))
    with calibrate_activations(student), torch.no_grad():
        for step, x in trajectories.items():
            set_step(student, step)
            unet_forward(student, x, torch.full((x.shape[0],), int(timesteps[step])), cond)
    set_step(student, None)
    return student


def tiny_student(weight_bits=4, act_bits=4, seed=0):
    unet = tiny_unet2d(seed)
    g = torch.Generator().manual_seed(seed)
    inputs = {i: torch.randn(4, 3, 8, 8, generator=g) * (1 + i) for i in range(TINY_STEPS)}
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, num_steps=TINY_STEPS, num_groups=TINY_STEPS)
    return unet, calibrated_student(unet, config, inputs, TINY_TIMESTEPS)


@pytest.fixture(scope="module")
def embedded_w4a4():
    """(loaded embedded model, its W4A4 student calibrated on 16 FP trajectories, the schedule's timesteps)."""
    from omegaconf import OmegaConf

    from dq.zoo import load_model
    from tests.train.conftest import CONF_DIR

    loaded = load_model(OmegaConf.load(f"{CONF_DIR}/model/embedded.yaml"))
    timesteps = planned_timesteps(loaded.scheduler.config, loaded.sampler)
    steps: dict[int, torch.Tensor] = {}
    sample(loaded.unet, loaded.scheduler.config, loaded.sampler, 16, seed=5, progress=False,
           on_step=lambda i, t, x, idx: steps.setdefault(i, x.clone()))
    config = QuantConfig(weight_bits=4, act_bits=4, num_steps=len(timesteps), num_groups=len(timesteps))
    return loaded, calibrated_student(loaded.unet, config, steps, timesteps), timesteps.tolist()
