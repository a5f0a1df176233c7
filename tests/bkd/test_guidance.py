"""Guidance rows in calibration: the share of rows per sampling step that take the unconditional input, a pure
function of the seed; the distiller's initialisation, caches and training see them; a model without guidance
is left as it is."""

import torch

from dq.bkd.guidance import guidance_rows, with_guidance_rows


def _tuples(n_per_step=10, steps=4, text=False):
    step = torch.arange(steps).repeat_interleave(n_per_step)
    n = len(step)
    if text:
        cond, uncond = torch.randn(n, 3, 5), torch.zeros(1, 3, 5).expand(n, -1, -1)
    else:
        cond, uncond = torch.arange(n) % 7, torch.full((n,), 10)
    return {"x_t": torch.randn(n, 1, 2, 2), "timestep": step * 10, "step": step, "cond": cond, "uncond": uncond}


def test_each_step_gets_its_share_of_unconditional_rows_from_the_seed():
    steps = torch.arange(4).repeat_interleave(10)[torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    mask = guidance_rows(steps, 0.5, seed=3)
    for s in range(4):
        assert int(mask[steps == s].sum()) == 5
    assert torch.equal(mask, guidance_rows(steps, 0.5, seed=3))
    assert not torch.equal(mask, guidance_rows(steps, 0.5, seed=4))
    assert int(guidance_rows(steps, 0.25, seed=3).sum()) == 4 * round(2.5)
    assert int(guidance_rows(steps, 1.0, seed=3).sum()) == 40 and int(guidance_rows(steps, 0.0, seed=3).sum()) == 0


def test_class_and_text_conditions_are_replaced_on_the_chosen_rows_only():
    for text in (False, True):
        tuples = _tuples(text=text)
        mixed = with_guidance_rows(tuples, 0.5, seed=0)
        mask = guidance_rows(tuples["step"], 0.5, seed=0)
        assert torch.equal(mixed["cond"][mask], tuples["uncond"][mask])
        assert torch.equal(mixed["cond"][~mask], tuples["cond"][~mask])
        assert mixed["x_t"] is tuples["x_t"] and mixed["uncond"] is tuples["uncond"]
        assert not torch.equal(mixed["cond"], tuples["cond"])


def test_a_conditioning_table_switches_the_same_rows_by_index():
    from dq.calibration import select_rows

    plain = _tuples(text=True)
    n = len(plain["step"])
    table = torch.cat([plain["cond"], plain["uncond"][:1]])  # every tuple its own prompt, the empty one last
    indexed = {k: v for k, v in plain.items() if k not in ("cond", "uncond")}
    indexed.update(cond_table=table, cond_index=torch.arange(n), uncond_index=torch.full((n,), n))
    plain["uncond"] = plain["uncond"][:1].expand(n, *plain["uncond"].shape[1:])
    mixed = select_rows(with_guidance_rows(indexed, 0.5, seed=0), slice(None))
    assert torch.equal(mixed["cond"], with_guidance_rows(plain, 0.5, seed=0)["cond"])


def test_without_guidance_the_tuples_are_unchanged():
    tuples = _tuples()
    del tuples["uncond"]
    assert with_guidance_rows(tuples, 0.5, seed=0)["cond"] is tuples["cond"]
    tuples = _tuples()
    assert with_guidance_rows(tuples, 0.0, seed=0)["cond"] is tuples["cond"]


def test_a_guided_run_trains_on_the_mixed_rows(tmp_path, caplog):
    """The embedded DiT (class labels, guidance): with uncond_fraction 0.5 half the rows of every step carry the
    null class, which changes what the blocks are trained on; 0 is the conditional-only calibration."""
    import logging

    from dq.jobs import train as train_job
    from tests.train.conftest import compose_config

    def run(fraction):
        out = tmp_path / f"f{fraction}"
        cfg = compose_config([
            "model=embedded_dit", "model.sampler.num_steps=4", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_samples=32", "data.num_trajectories=8", "data.progress=false", "method.distill.batch_size=8",
            "method.distill.capture_batch_size=32", "method.distill.iters_per_block=2", "method.distill.end_to_end_iters=0",
            "method.act_init=minmax", "fidelity.num_samples=4", "fidelity.batch_size=4", "progress_bar=false",
            "checkpoint_every_n_steps=1000", f"method.distill.uncond_fraction={fraction}"])
        with caplog.at_level(logging.INFO, logger="dq.bkd.guidance"):
            return train_job.train(cfg)

    plain = run(0.0)
    assert "take the unconditional input" not in caplog.text
    mixed = run(0.5)
    assert "16 of 32 rows take the unconditional input" in caplog.text
    assert plain["block_final_losses"] != mixed["block_final_losses"]
