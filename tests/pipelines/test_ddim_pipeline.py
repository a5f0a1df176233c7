"""A student in diffusers' own DDIMPipeline: the pipeline passes only the timestep, the student finds its
TPQ row from it; the images equal dq's sampler's from the same generators."""

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

import dq
from dq.sampling import SamplerConfig, sample, sample_seed
from tests.pipelines.conftest import UNIFORM10

SEED = 3


def _generators(num: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(SEED, k)) for k in range(num)]


def _pipeline(folder, policy="exact") -> DDIMPipeline:
    unet = dq.load_student(folder, tpq_policy=policy)
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))


def _dq_images(unet, loaded, sampler: SamplerConfig, num: int) -> torch.Tensor:
    x = sample(unet, loaded.scheduler.config, sampler, num, seed=SEED, progress=False)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # the pipeline's "np" output: [B, H, W, C] in [0, 1]


def _record_rows(unet) -> list:
    """The TPQ row each forward call of `unet` uses (an int step, or a blend's (start, end, weight)), as the
    calls go."""
    quantizer = dq.quant.step_indexed(unet)[0]
    rows = []

    def hook(module, args, kwargs):
        step = quantizer.step
        rows.append((step.start.tolist(), step.end.tolist(), step.weight.tolist())
                    if hasattr(step, "weight") else torch.as_tensor(step).tolist())

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def test_ddim_pipeline_gives_dq_sampler_images(embedded_folder):
    loaded, folder, timesteps = embedded_folder
    pipe = _pipeline(folder)
    out = pipe(batch_size=3, generator=_generators(3), num_inference_steps=10, eta=0.0, output_type="np")
    assert pipe.scheduler.timesteps.tolist() == timesteps  # diffusers' "leading" spacing = dq's "uniform"
    ours = _dq_images(dq.load_student(folder), loaded, UNIFORM10, 3)
    theirs = torch.from_numpy(out.images)
    assert theirs.shape == ours.shape == (3, 16, 16, 1)
    # DDIMScheduler's tensor arithmetic and dq's scalar DDIM update differ by float32 rounding only
    assert (theirs - ours).abs().max() < 1e-4
    fp = _dq_images(loaded.unet, loaded, UNIFORM10, 3)
    assert (theirs - fp).abs().max() > 1e-3  # the quantized student, not the FP model


def test_exact_policy_refuses_another_schedule(embedded_folder):
    _, folder, _ = embedded_folder
    pipe = _pipeline(folder, "exact")
    with pytest.raises(ValueError, match=r"timestep\(s\) 950 are not in the schedule .* tpq_policy='nearest'"):
        pipe(batch_size=1, generator=_generators(1), num_inference_steps=20, output_type="np")


@pytest.mark.parametrize("policy", ["nearest", "interpolate"])
def test_off_schedule_policies_run_a_20_step_pipeline(embedded_folder, policy):
    loaded, folder, _ = embedded_folder
    pipe = _pipeline(folder, policy)
    theirs_rows = _record_rows(pipe.unet)
    out = pipe(batch_size=2, generator=_generators(2), num_inference_steps=20, eta=0.0, output_type="np")
    student = dq.load_student(folder, tpq_policy=policy)
    our_rows = _record_rows(student)
    ours = _dq_images(student, loaded, SamplerConfig(name="ddim", num_steps=20, spacing="uniform"), 2)
    theirs = torch.from_numpy(out.images)
    assert torch.isfinite(theirs).all()
    # dq's sampler keys the rows the same way off schedule: the same TPQ row (or blend) at every call
    assert len(our_rows) == len(theirs_rows) == 20 and our_rows == theirs_rows
    # and the images agree; not to 1e-4 as on schedule: over 20 steps the two DDIM updates' float32 rounding
    # can move a 4-bit activation across a rounding boundary (it does with one thread), and that moves a region
    assert (theirs - ours).abs().mean() < 1e-2
    with pytest.raises(ValueError, match="not in the schedule"):  # and refuses it under exact, before sampling
        _dq_images(dq.load_student(folder), loaded, SamplerConfig(name="ddim", num_steps=20, spacing="uniform"), 2)
