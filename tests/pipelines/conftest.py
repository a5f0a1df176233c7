"""A calibrated W4A4 student of the embedded model for a 10-step uniform DDIM schedule (the one diffusers'
DDIMScheduler visits by default), keyed by timestep and written as a student folder."""

import pytest
import torch
from omegaconf import OmegaConf

from dq.pretrained import save_student
from dq.quant import QuantConfig, key_by_timestep
from dq.sampling import SamplerConfig, planned_timesteps, sample
from tests.export.conftest import calibrated_student
from tests.train.conftest import CONF_DIR

UNIFORM10 = SamplerConfig(name="ddim", num_steps=10, spacing="uniform")


@pytest.fixture(scope="module")
def embedded_folder(tmp_path_factory):
    """(loaded embedded model, the student folder, its trained timesteps [900, 800, ..., 0])."""
    from dq.zoo import load_model

    loaded = load_model(OmegaConf.load(f"{CONF_DIR}/model/embedded.yaml"))
    timesteps = planned_timesteps(loaded.scheduler.config, UNIFORM10)
    steps: dict[int, torch.Tensor] = {}
    sample(loaded.unet, loaded.scheduler.config, UNIFORM10, 16, seed=5, progress=False,
           on_step=lambda i, t, x, idx: steps.setdefault(i, x.clone()))
    config = QuantConfig(weight_bits=4, act_bits=4, num_steps=len(timesteps), num_groups=len(timesteps))
    student = calibrated_student(loaded.unet, config, steps, timesteps)
    key_by_timestep(student, timesteps)
    folder = save_student(student, tmp_path_factory.mktemp("student") / "student",
                          scheduler_config=loaded.scheduler.config, sampler=UNIFORM10.to_dict())
    return loaded, folder, timesteps.tolist()
