import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dq.sampling import SamplerConfig
from dq.zoo import load_model, load_model_folder

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def model_folder(tmp_path, tiny_unet, ddpm_scheduler):
    folder = tmp_path / "model"
    tiny_unet.save_pretrained(folder / "unet")
    ddpm_scheduler.save_pretrained(folder / "scheduler")
    return folder


def local_cfg(path):
    return OmegaConf.create({"source": "local", "path": str(path), "sampler": {"name": "ddim", "num_steps": 5}})


def test_local_folder_written_by_save_pretrained_loads(model_folder, tiny_unet, ddpm_scheduler):
    loaded = load_model(local_cfg(model_folder))
    unet, scheduler, sampler = loaded.unet, loaded.scheduler, loaded.sampler
    assert type(unet) is type(tiny_unet) and not unet.training
    for name, tensor in tiny_unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], tensor), name
    assert type(scheduler) is type(ddpm_scheduler)
    assert scheduler.config.num_train_timesteps == 1000
    assert sampler == SamplerConfig(name="ddim", num_steps=5)


def test_hydra_model_local_override(model_folder):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=local", f"model.path={model_folder}"])
    loaded = load_model(cfg.model)
    unet, sampler = loaded.unet, loaded.sampler
    assert unet.config.sample_size == 8
    assert (sampler.name, sampler.num_steps, sampler.spacing) == ("ddim", 100, "quad")


def test_hydra_model_local_without_path_fails_clearly():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=local"])
    with pytest.raises(ValueError, match=r"model=local needs model.path=/dir"):
        load_model(cfg.model)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), r"missing \['unet/diffusion_pytorch_model.safetensors'\]"),
        (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), r"missing \['scheduler/scheduler_config.json'\]"),
        (lambda f: (f / "unet" / "config.json").write_text("{not json"), r"unet/config.json is not valid JSON"),
        (lambda f: _edit_json(f / "unet" / "config.json", _class_name="VQModel"), r"_class_name 'VQModel'"),
        (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", _class_name="os.system"), r"not a diffusers scheduler"),
    ],
    ids=["no-weights", "no-scheduler", "bad-json", "not-a-unet", "bad-scheduler-class"],
)
def test_broken_folder_fails_naming_the_problem(model_folder, breakage, message):
    breakage(model_folder)
    with pytest.raises(ValueError, match=message):
        load_model_folder(model_folder)


def test_pickle_weights_are_refused(model_folder):
    weights = model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="pickle weights are not loaded"):
        load_model_folder(model_folder)


def test_missing_folder_fails(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(local_cfg(tmp_path / "nowhere"))


def test_bad_source_and_sampler_fail(model_folder):
    with pytest.raises(ValueError, match="model.source"):
        load_model({"source": "hub", "sampler": {}})
    cfg = local_cfg(model_folder)
    cfg.sampler.spacing = "cosine"
    with pytest.raises(ValueError, match="spacing"):
        load_model(cfg)


def _edit_json(path, **changes):
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))


def test_transformer_folder_of_a_dit_pipeline_loads(tmp_path, ddpm_scheduler):
    from tests.arch.test_transformers import tiny_dit

    dit = tiny_dit()
    dit.save_pretrained(tmp_path / "dit" / "transformer")  # DiTPipeline's layout
    ddpm_scheduler.save_pretrained(tmp_path / "dit" / "scheduler")
    loaded = load_model(local_cfg(tmp_path / "dit"))
    assert type(loaded.unet).__name__ == "DiTTransformer2DModel"
    for a, b in zip(loaded.unet.state_dict().values(), dit.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_embedded_model_is_refused():
    with pytest.raises(ValueError, match="model.embedded must be one of"):
        load_model({"source": "embedded", "embedded": "vit", "sampler": {"num_steps": 4}})
