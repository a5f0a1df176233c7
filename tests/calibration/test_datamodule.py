import copy
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dq.arch import describe
from dq.calibration import (
    CalibrationDataModule,
    CalibrationTuples,
    draw_plan,
    generate_shard,
    load_tuples,
    select_rows,
    shard_range,
)
from dq.quant import QuantConfig, calibrate_activations, quantize_model, set_step
from dq.sampling import SamplerConfig, planned_timesteps, sample

DDIM_5 = SamplerConfig(name="ddim", num_steps=5, eta=0.0, spacing="quad")


def make_datamodule(unet, scheduler, cache_dir, sampler=DDIM_5, **kwargs):
    settings = {"num_samples": 40, "num_trajectories": 12, "batch_size": 8, "generation_batch_size": 5, "seed": 0}
    settings.update(kwargs)
    return CalibrationDataModule(unet, scheduler.config, sampler, cache_dir=cache_dir, progress=False, **settings)


def test_draw_plan_covers_every_step_evenly():
    plan = draw_plan(num_trajectories=30, num_steps=7, num_samples=100, seed=1)
    assert plan.shape == (100, 2) and plan.dtype == torch.int64
    assert len({tuple(pair) for pair in plan.tolist()}) == 100  # no pair twice
    counts = torch.bincount(plan[:, 1], minlength=7)
    assert set(counts.tolist()) <= {14, 15} and int(counts.sum()) == 100
    assert plan[:, 0].max() < 30
    keys = plan[:, 0] * 7 + plan[:, 1]
    assert torch.equal(keys, keys.sort().values)
    assert torch.equal(plan, draw_plan(30, 7, 100, seed=1))
    assert not torch.equal(plan, draw_plan(30, 7, 100, seed=2))
    with pytest.raises(ValueError, match="need >= 15 trajectories"):
        draw_plan(num_trajectories=10, num_steps=7, num_samples=100, seed=1)


def test_tuples_have_contract_shapes_and_cover_steps(tiny_unet, ddpm_scheduler, tmp_path):
    dm = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    dm.setup("fit")
    tuples = dm.tuples
    assert set(tuples) == {"x_t", "timestep", "step"}
    assert tuples["x_t"].shape == (40, 1, 8, 8) and tuples["x_t"].dtype == torch.float32
    assert tuples["timestep"].shape == (40,) and tuples["timestep"].dtype == torch.int64
    assert tuples["step"].dtype == torch.int64
    timesteps = planned_timesteps(ddpm_scheduler.config, DDIM_5)
    assert torch.equal(tuples["timestep"], timesteps[tuples["step"]])
    assert torch.bincount(tuples["step"], minlength=5).tolist() == [8] * 5
    assert dm.metadata["guidance_scale"] is None and dm.metadata["num_model_calls"] == 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["x_t"].shape == (8, 1, 8, 8) and batch["step"].shape == (8,)


def test_x_t_is_the_model_input_of_that_trajectory_and_step(tiny_unet, ddpm_scheduler, tmp_path):
    dm = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    dm.setup()
    seen = {}

    def record(step, timestep, x, indices):
        for row, k in enumerate(indices.tolist()):
            seen[(k, step)] = x[row].clone()

    sample(tiny_unet, ddpm_scheduler.config, DDIM_5, 12, seed=0, batch_size=12, on_step=record, progress=False)
    for row, (k, step) in enumerate(dm.plan.tolist()):
        torch.testing.assert_close(dm.tuples["x_t"][row], seen[(k, step)], atol=1e-4, rtol=1e-4)


def test_cache_is_reused_and_invalidated(tiny_unet, ddpm_scheduler, tmp_path, monkeypatch):
    first = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    first.setup()
    path = first.cache_path()
    assert path.is_file() and json.loads(path.with_name(path.name + ".json").read_text())["num_samples"] == 40
    assert not list(tmp_path.glob("*.tmp-*"))

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr("dq.calibration.datamodule.generate_shard", no_generation)
    again = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    again.setup()
    for key, tensor in first.tuples.items():
        assert torch.equal(again.tuples[key], tensor)

    other_unet = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        other_unet.conv_out.bias.add_(1.0)
    changed = [
        make_datamodule(tiny_unet, ddpm_scheduler, tmp_path, num_samples=30),
        make_datamodule(tiny_unet, ddpm_scheduler, tmp_path, seed=1),
        make_datamodule(tiny_unet, ddpm_scheduler, tmp_path, sampler=SamplerConfig(num_steps=5, eta=0.5)),
        make_datamodule(tiny_unet, ddpm_scheduler, tmp_path, sampler=SamplerConfig(num_steps=6)),
        make_datamodule(tiny_unet, ddpm_scheduler, tmp_path, sampler=SamplerConfig(num_steps=5, spacing="uniform")),
        make_datamodule(other_unet, ddpm_scheduler, tmp_path),
    ]
    paths = {dm.cache_path() for dm in changed}
    assert len(paths) == len(changed) and path not in paths
    for dm in changed:
        with pytest.raises(AssertionError, match="cache should have been reused"):
            dm.setup()


def test_shards_do_not_depend_on_world_size(tiny_unet, ddpm_scheduler):
    plan = draw_plan(num_trajectories=7, num_steps=5, num_samples=20, seed=0)
    timesteps = planned_timesteps(ddpm_scheduler.config, DDIM_5)
    common = {"seed": 0, "batch_size": 4, "progress": False}
    whole = generate_shard(tiny_unet, ddpm_scheduler.config, DDIM_5, plan, timesteps, (0, 7), **common)
    parts = [
        generate_shard(tiny_unet, ddpm_scheduler.config, DDIM_5, plan, timesteps, shard_range(7, rank, 3), **common)
        for rank in range(3)
    ]
    for key, tensor in whole.items():
        torch.testing.assert_close(torch.cat([part[key] for part in parts]), tensor, atol=1e-4, rtol=1e-4)


def test_class_conditional_guidance_tuples(tiny_class_unet, ddpm_scheduler, tmp_path):
    guided = SamplerConfig(name="ddim", num_steps=5, spacing="quad", guidance_scale=3.0)
    dm = make_datamodule(tiny_class_unet, ddpm_scheduler, tmp_path, sampler=guided, num_classes=10, uncond_class=10)
    dm.setup()
    assert dm.tuples["cond"].shape == (40,) and dm.tuples["cond"].dtype == torch.int64
    assert torch.equal(dm.tuples["cond"], dm.plan[:, 0] % 10)
    assert torch.equal(dm.tuples["uncond"], torch.full((40,), 10))
    assert dm.metadata["guidance_scale"] == 3.0 and dm.guidance_scale == 3.0
    with pytest.raises(ValueError, match="needs uncond_class or uncond_embeds"):
        make_datamodule(tiny_class_unet, ddpm_scheduler, tmp_path, sampler=guided, num_classes=10)


def test_text_conditional_tuples(tiny_text_unet, ddpm_scheduler, tmp_path):
    guided = SamplerConfig(name="plms", num_steps=4, spacing="uniform", guidance_scale=7.5)
    prompts, empty = torch.randn(3, 5, 6), torch.zeros(1, 5, 6)
    dm = make_datamodule(tiny_text_unet, ddpm_scheduler, tmp_path, sampler=guided, num_samples=20,
                         num_trajectories=6, prompt_embeds=prompts, uncond_embeds=empty)
    dm.setup()
    assert dm.tuples["x_t"].shape == (20, 2, 8, 8)
    # the embeddings once per prompt (and the empty prompt last), an index per tuple
    assert torch.equal(dm.tuples["cond_table"], torch.cat([prompts, empty])) and "cond" not in dm.tuples
    assert torch.equal(dm.tuples["cond_index"], dm.plan[:, 0] % 3) and set(dm.tuples["uncond_index"].tolist()) == {3}
    assert set(dm.tuples["step"].tolist()) == set(range(5))  # PLMS: 4 steps, 5 model calls
    rows = select_rows(dm.tuples, torch.tensor([0, 7, 19]))
    assert rows["cond"].shape == (3, 5, 6) and rows["uncond"].shape == (3, 5, 6)
    assert torch.equal(rows["cond"], prompts[dm.plan[[0, 7, 19], 0] % 3]) and not rows["uncond"].any()
    # the same x_t as a sampler fed the expanded embeddings: only the storage changed
    assert torch.equal(select_rows(dm.tuples, slice(None))["cond"], prompts[dm.plan[:, 0] % 3])
    assert torch.equal(CalibrationTuples(dm.tuples)[4]["cond"], prompts[int(dm.plan[4, 0]) % 3])


def test_cache_file_holds_metadata(tiny_unet, ddpm_scheduler, tmp_path):
    dm = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    dm.setup()
    tuples, metadata = load_tuples(dm.cache_path())
    assert metadata["sampler"] == DDIM_5.to_dict() and metadata["seed"] == 0
    assert metadata["timesteps"] == planned_timesteps(ddpm_scheduler.config, DDIM_5).tolist()
    assert set(tuples) == {"x_t", "timestep", "step"}


def test_student_calibrates_on_tuples_then_samples(tiny_unet, ddpm_scheduler, tmp_path):
    dm = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    dm.setup()
    student = quantize_model(tiny_unet, QuantConfig(weight_bits=8, act_bits=8, num_steps=5, num_groups=5),
                             describe(tiny_unet))
    with torch.no_grad(), calibrate_activations(student):
        for batch in dm.train_dataloader():
            set_step(student, batch["step"])
            student(batch["x_t"], batch["timestep"])
    set_step(student, None)
    images = sample(student, ddpm_scheduler.config, DDIM_5, 2, progress=False)
    reference = sample(tiny_unet, ddpm_scheduler.config, DDIM_5, 2, progress=False)
    assert torch.isfinite(images).all() and images.shape == reference.shape


def test_hydra_data_config_instantiates(tiny_unet, ddpm_scheduler, tmp_path):
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    overrides = [f"data.cache_dir={tmp_path}", "data.num_samples=10", "data.num_trajectories=4", "data.progress=false"]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        default_cache_dir = compose(config_name="config").data.cache_dir
    assert default_cache_dir.endswith("/calibration")
    dm = instantiate(cfg.data, unet=tiny_unet, scheduler_config=ddpm_scheduler.config, sampler=DDIM_5)
    assert isinstance(dm, CalibrationDataModule) and dm.batch_size == 32
    dm.setup()
    assert dm.tuples["x_t"].shape == (10, 1, 8, 8) and dm.cache_path().parent == tmp_path
