import numpy as np
import pytest
import torch

from dq.sampling import (
    SamplerConfig,
    planned_timesteps,
    quad_timesteps,
    sampling_timesteps,
    uniform_timesteps,
)


@pytest.mark.parametrize("num_steps", [2, 10, 25, 100, 250])
def test_quad_matches_method_formula(num_steps):
    # docs/method.md §6: round(linspace(0, sqrt(0.8 * 1000), T)^2), visited in descending order
    expected = np.round(np.linspace(0, np.sqrt(0.8 * 1000), num_steps) ** 2).astype(np.int64)[::-1]
    timesteps = quad_timesteps(num_steps, 1000)
    assert timesteps.dtype == torch.int64
    assert timesteps.tolist() == expected.tolist()
    assert int(timesteps[0]) == 800 and int(timesteps[-1]) == 0


def test_quad_25_steps_values():
    assert quad_timesteps(25, 1000).tolist()[:4] == [800, 735, 672, 612]
    assert quad_timesteps(25, 1000).tolist()[-4:] == [13, 6, 1, 0]


def test_quad_keeps_repeats_of_reference_protocol():
    assert quad_timesteps(100, 1000).tolist()[-5:] == [1, 1, 0, 0, 0]


def test_uniform_is_leading_spacing_with_offset():
    assert uniform_timesteps(4, 1000).tolist() == [750, 500, 250, 0]
    assert uniform_timesteps(50, 1000, offset=1).tolist()[:2] == [981, 961]
    assert sampling_timesteps("uniform", 4, 1000).tolist() == [750, 500, 250, 0]


def test_bad_spacing_arguments_raise():
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps("cosine", 10, 1000)
    with pytest.raises(ValueError, match="num_steps"):
        quad_timesteps(0, 1000)
    with pytest.raises(ValueError, match="num_steps"):
        uniform_timesteps(1001, 1000)


def test_planned_timesteps_per_sampler(ddpm_scheduler):
    config = ddpm_scheduler.config
    assert planned_timesteps(config, SamplerConfig(num_steps=25)).tolist() == quad_timesteps(25, 1000).tolist()
    uniform = planned_timesteps(config, SamplerConfig(num_steps=10, spacing="uniform", eta=1.0))
    assert uniform.tolist() == uniform_timesteps(10, 1000).tolist()
    # PLMS without Runge-Kutta warm-up calls the model once more than its step count
    assert len(planned_timesteps(config, SamplerConfig(name="plms", num_steps=10, spacing="uniform"))) == 11
    assert planned_timesteps(config, SamplerConfig(name="dpm_solver", num_steps=10)).tolist() == quad_timesteps(
        10, 1000
    ).tolist()


def test_sampler_config_validation():
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        SamplerConfig(name="plms", eta=0.5, spacing="uniform")
    with pytest.raises(ValueError, match="supports spacing 'uniform' only"):
        SamplerConfig(name="plms", spacing="quad")
    with pytest.raises(ValueError, match="unknown sampler setting"):
        SamplerConfig.from_mapping({"name": "ddim", "steps": 10})
    with pytest.raises(ValueError, match="sampler name"):
        SamplerConfig(name="euler")
    assert SamplerConfig.from_mapping({"num_steps": 5, "eta": 0, "guidance_scale": 3}).guidance_scale == 3.0
