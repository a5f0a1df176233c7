import pytest
import torch

from dq.arch import describe
from dq.quant import QuantConfig, act_quantizers, quantize_model, set_quant_enabled
from dq.sampling import (
    SamplerConfig,
    SpacedDDIMScheduler,
    ddim_update,
    planned_timesteps,
    sample,
    sample_seed,
)

DDIM_5 = SamplerConfig(name="ddim", num_steps=5, eta=0.0, spacing="quad")


def run(unet, scheduler, sampler=DDIM_5, num_samples=4, **kwargs):
    return sample(unet, scheduler.config, sampler, num_samples, progress=False, **kwargs)


@pytest.mark.parametrize(
    "sampler",
    [
        DDIM_5,
        SamplerConfig(name="ddim", num_steps=5, eta=1.0, spacing="uniform"),
        SamplerConfig(name="plms", num_steps=5, spacing="uniform"),
        SamplerConfig(name="pndm", num_steps=5, spacing="uniform"),
        SamplerConfig(name="dpm_solver", num_steps=5, spacing="quad"),
    ],
    ids=lambda s: f"{s.name}-{s.spacing}-eta{s.eta}",
)
def test_deterministic_per_sample_whatever_the_batching(tiny_unet, ddpm_scheduler, sampler):
    first = run(tiny_unet, ddpm_scheduler, sampler, seed=3, batch_size=2)
    again = run(tiny_unet, ddpm_scheduler, sampler, seed=3, batch_size=2)
    assert first.shape == (4, 1, 8, 8) and first.dtype == torch.float32
    assert torch.equal(first, again)
    one_batch = run(tiny_unet, ddpm_scheduler, sampler, seed=3, batch_size=4)
    torch.testing.assert_close(first, one_batch, atol=1e-4, rtol=1e-4)  # float error of other batch shapes only
    # sample k depends on (seed, k) alone: a shard starting at index 2 reproduces samples 2 and 3
    shard = run(tiny_unet, ddpm_scheduler, sampler, num_samples=2, seed=3, first_index=2, batch_size=2)
    torch.testing.assert_close(shard, first[2:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(run(tiny_unet, ddpm_scheduler, sampler, seed=4, batch_size=2), first)


def test_eta_adds_noise(tiny_unet, ddpm_scheduler):
    stochastic = SamplerConfig(name="ddim", num_steps=5, eta=1.0, spacing="quad")
    assert not torch.allclose(run(tiny_unet, ddpm_scheduler, stochastic), run(tiny_unet, ddpm_scheduler))


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(seed, index) for seed in range(3) for index in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)


def test_step_index_reaches_model_at_every_call_in_order(tiny_unet, ddpm_scheduler):
    student = quantize_model(tiny_unet, QuantConfig(num_steps=5, num_groups=5), describe(tiny_unet))
    set_quant_enabled(student, weights=False, activations=False)  # float path; the step index is still set
    quantizers = act_quantizers(student)
    calls = []
    student.register_forward_pre_hook(
        lambda module, args: calls.append(({q.step for q in quantizers}, int(args[1][0]), args[0].shape[0]))
    )
    run(student, ddpm_scheduler, num_samples=3, batch_size=2)
    timesteps = planned_timesteps(ddpm_scheduler.config, DDIM_5).tolist()
    expected = [({i}, t, batch) for batch in (2, 1) for i, t in enumerate(timesteps)]
    assert calls == expected
    assert {q.step for q in quantizers} == {None}  # cleared after each call


def test_classifier_free_guidance_doubles_batch_with_same_step(tiny_class_unet, ddpm_scheduler):
    student = quantize_model(tiny_class_unet, QuantConfig(num_steps=5, num_groups=5), describe(tiny_class_unet))
    set_quant_enabled(student, weights=False, activations=False)
    quantizers = act_quantizers(student)
    calls = []
    student.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            ({q.step for q in quantizers}, args[0].shape[0], kwargs["class_labels"].tolist())
        ),
        with_kwargs=True,
    )
    guided = SamplerConfig(name="ddim", num_steps=5, spacing="quad", guidance_scale=3.0)
    labels = torch.tensor([1, 7])
    out = run(student, ddpm_scheduler, guided, num_samples=2, cond=labels, uncond=torch.tensor([10]))
    assert [c[0] for c in calls] == [{i} for i in range(5)]
    assert all(c[1] == 4 and c[2] == [10, 10, 1, 7] for c in calls)
    unguided = run(student, ddpm_scheduler, num_samples=2, cond=labels)
    assert out.shape == unguided.shape and not torch.allclose(out, unguided)
    with pytest.raises(ValueError, match="needs cond and uncond"):
        run(student, ddpm_scheduler, guided, num_samples=2, cond=labels)


def test_text_conditioning(tiny_text_unet, ddpm_scheduler):
    embeds = torch.randn(2, 3, 6)
    guided = SamplerConfig(name="plms", num_steps=4, spacing="uniform", guidance_scale=7.5)
    out = run(tiny_text_unet, ddpm_scheduler, guided, num_samples=2, cond=embeds, uncond=torch.zeros(1, 3, 6))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


def test_student_with_other_step_count_is_refused(tiny_unet, ddpm_scheduler):
    student = quantize_model(tiny_unet, QuantConfig(num_steps=10, num_groups=10), describe(tiny_unet))
    with pytest.raises(ValueError, match="built for 10 sampling steps"):
        run(student, ddpm_scheduler)


def test_spaced_ddim_matches_diffusers_ddim_on_uniform_spacing(tiny_unet, ddpm_scheduler):
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_config(ddpm_scheduler.config)
    reference.set_timesteps(5)
    ours = SpacedDDIMScheduler.from_config(ddpm_scheduler.config)
    ours.set_timesteps(timesteps=reference.timesteps)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x.clone()
    for t in reference.timesteps:
        with torch.no_grad():
            eps = tiny_unet(x, t).sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        x = ours.step(eps, t, x, eta=0.5, variance_noise=noise).prev_sample
        x_ref = reference.step(eps, t, x_ref, eta=0.5, variance_noise=noise).prev_sample
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def test_ddim_update_repeated_timestep_is_identity():
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    alpha = 0.9
    x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    torch.testing.assert_close(ddim_update(x, x0, eps, alpha, alpha, 0.0, None), x)
    with pytest.raises(ValueError, match="needs `noise`"):
        ddim_update(x, x0, eps, alpha, 0.95, 1.0, None)
