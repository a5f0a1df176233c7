"""evaluate.py refuses, before any work, an override that run= or export= makes meaningless (every model.* key
of every model config, the model group, method.* and quant.*), naming the key to use instead."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dq.errors import UserError
from dq.evaluation.overrides import EVAL_SAMPLER_KEYS, refuse_ignored_overrides
from tests.evaluate.conftest import CONF_DIR

SOURCES = ["run=/runs/a", "export=/runs/a/student_int.safetensors"]


def _leaf_keys(node, prefix: str) -> list[str]:
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _leaf_keys(value, f"{prefix}.{name}")]
    return [prefix]


def every_model_key() -> list[str]:
    """Every model.* key (sub-keys included) of every conf/model/*.yaml, and each model.sampler.* field."""
    keys = set()
    for path in sorted(Path(CONF_DIR, "model").glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        keys |= set(_leaf_keys(config, "model"))
        keys |= {f"model.{name}" for name, value in config.items() if isinstance(value, dict)}  # a whole section
    return sorted(keys | {f"model.sampler.{field}" for field in (*EVAL_SAMPLER_KEYS, "guidance_scale", "shift")})


def test_the_model_keys_cover_every_model_config():
    keys = every_model_key()
    assert {"model.path", "model.source", "model.sampler.num_steps", "model.conditioning.prompts_file",
            "model.embedded", "model.repo_id", "model.sampler"} <= set(keys)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key", every_model_key())
def test_every_model_key_is_refused_under_run_and_export(source, key):
    override = f"{key}=13"
    with pytest.raises(UserError) as info:
        refuse_ignored_overrides([source, override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{override} does nothing with {source.split('=')[0]}=")
    field = key.removeprefix("model.sampler.")
    if key.startswith("model.sampler.") and field in EVAL_SAMPLER_KEYS:
        assert f"use sampler.{field}=13 instead" in message
    elif key.startswith("model.sampler."):
        assert f"use +sampler.{field}=13 instead" in message
    else:
        assert "drop it" in message


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("override", ["model=ddpm_cifar10", "+model.dtype=float16", "~model.path", "method.name=x",
                                      "quant.name=w8a8"])
def test_groups_additions_deletions_and_replaced_names_are_refused(source, override):
    with pytest.raises(UserError, match=f"^{re.escape(override)} does nothing with {source.split('=')[0]}="):
        refuse_ignored_overrides([override, source])  # in any order


def test_the_issue_example_names_sampler_num_steps():
    with pytest.raises(UserError, match=r"use sampler\.num_steps=13 instead; off the trained schedule add "
                                        r"tpq_policy=nearest"):
        refuse_ignored_overrides(["run=outputs/x", "model.sampler.num_steps=13"])


@pytest.mark.parametrize("overrides", [
    ["run=/r", "sampler.num_steps=13", "tpq_policy=nearest", "eval.num_samples=8", "trainer=gpu", "seed=1"],
    ["export=/r/e.safetensors", "int_backend=gemm", "sampler.eta=0.5", "eval=inception"],
    ["model=local", "model.path=/m", "model.sampler.num_steps=13"],  # the FP model: model.* is what it evaluates
    ["run=null", "model.sampler.num_steps=13"],
])
def test_overrides_that_apply_pass(overrides):
    refuse_ignored_overrides(overrides)


@pytest.mark.parametrize("overrides", [["int_backend=gemm"], ["run=/r", "int_backend=onednn"], ["int_compile=bf16"]])
def test_int_backend_needs_an_export(overrides):
    with pytest.raises(UserError, match="does nothing without export="):
        refuse_ignored_overrides(overrides)
