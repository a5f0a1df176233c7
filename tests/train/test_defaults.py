"""One source of defaults: QuantConfig() and DistillConfig() are the recipe that `python train.py` runs
(conf/quant/w4a4.yaml + conf/method/dilatequant.yaml), so the Python API and the command line train the same
student."""

import dataclasses

from dq.bkd import DistillConfig
from dq.jobs.train import build_quant_config, distill_config
from dq.quant import QuantConfig
from tests.train.conftest import compose_config


def test_python_defaults_are_the_recipe_train_py_runs():
    cfg = compose_config([])
    assert cfg.method.name == "dilatequant" and cfg.quant.name == "w4a4"
    recipe = build_quant_config(cfg, num_steps=25)
    assert recipe == QuantConfig(num_steps=25, num_groups=25), recipe.diff(QuantConfig(num_steps=25, num_groups=25))
    assert distill_config(cfg) == DistillConfig()


def test_every_distill_field_is_in_the_recipe_yaml():
    """The recipe names every field, so a new field cannot get a Python default the YAML does not show."""
    cfg = compose_config([])
    assert set(cfg.method.distill) == {f.name for f in dataclasses.fields(DistillConfig)}


def test_ptq_and_whole_model_get_no_end_to_end_stage_by_default():
    assert DistillConfig().end_to_end_iters == 300
    assert DistillConfig(iters_per_block=0).end_to_end_iters == 0
    assert DistillConfig(whole_model=True).end_to_end_iters == 0
    assert distill_config(compose_config(["method=ptq_minmax"])).end_to_end_iters == 0


def test_auto_activation_options_follow_the_denoiser():
    """quant.act_granularity / rotation "auto" (the shipped quant configs): per-token, rotated Linear inputs
    for a transformer, the paper's per-tensor ones for a UNet; an explicit value wins."""
    from tests.arch.test_transformers import tiny_dit
    from tests.quant.conftest import tiny_unet2d

    cfg = compose_config([])
    assert (cfg.quant.act_granularity, cfg.quant.rotation) == ("auto", "auto")
    dit, unet = build_quant_config(cfg, 25, tiny_dit()), build_quant_config(cfg, 25, tiny_unet2d())
    assert (dit.act_granularity, dit.rotation, unet.act_granularity, unet.rotation) == ("token", True, "tensor", False)
    explicit = build_quant_config(compose_config(["quant.act_granularity=tensor", "quant.rotation=false"]), 25, tiny_dit())
    assert (explicit.act_granularity, explicit.rotation) == ("tensor", False)
