"""A tiny 16x16 grey model folder (the digits backend's image size), a student run dir made from it, and
Hydra composition of conf/evaluate.yaml."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dq.arch import describe
from dq.quant import QuantConfig, calibrate_activations, quantize_model, save_quant_state
from dq.sampling import SamplerConfig, sample
from tests.conftest import write_model_folder

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
STEPS = 4


def make_unet16(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="session")
def model16_dir(tmp_path_factory) -> Path:
    return write_model_folder(make_unet16(), tmp_path_factory.mktemp("model16"))


@pytest.fixture(scope="session")
def student_run_dir(tmp_path_factory, model16_dir) -> Path:
    """What train.py leaves behind (config.yaml, student.safetensors, results.json) for a W8A8 student."""
    run = tmp_path_factory.mktemp("run")
    scheduler = DDPMScheduler.from_pretrained(model16_dir / "scheduler")
    unet = make_unet16()
    student = quantize_model(unet, QuantConfig(weight_bits=8, act_bits=8, num_steps=STEPS, num_groups=STEPS),
                             describe(unet))
    sampler = SamplerConfig(name="ddim", num_steps=STEPS)
    with calibrate_activations(student):
        sample(student, scheduler.config, sampler, 4, batch_size=4, progress=False)
    save_quant_state(student, run / "student.safetensors")
    model = {"source": "local", "path": str(model16_dir), "sampler": sampler.to_dict()}
    config = {"model": model, "method": {"name": "dilatequant"}, "quant": {"name": "w8a8"}, "seed": 0}
    OmegaConf.save(OmegaConf.create(config), run / "config.yaml")
    (run / "results.json").write_text(json.dumps({"method": "dilatequant", "quant": "w8a8", "weight_bits": 8,
                                                  "act_bits": 8, "psnr_vs_fp": 30.0}))
    return run


def eval_overrides(model_dir: Path, out: Path, cache: Path, num_samples: int = 12) -> list[str]:
    """A run of a few seconds: the tiny model, 4 DDIM steps, 12 samples, digits backend."""
    return [
        "model=local",
        f"model.path={model_dir}",
        f"model.sampler.num_steps={STEPS}",
        f"output_dir={out}",
        f"eval.num_samples={num_samples}",
        "eval.batch_size=5",
        "eval.is_splits=2",
        "eval.grid_rows=3",
        f"eval.fp_cache_dir={cache}",
        "progress_bar=false",
    ]


def compose_eval(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)
