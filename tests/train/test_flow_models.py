"""python train.py on model folders of the flow-matching transformers (SD3, Flux, Sana): transformer/,
a flow-matching scheduler/, a VAE with SD3's shift_factor, text conditioning from a prompt-embeddings file
(packed with the pooled row for SD3 / Flux), CFG, the flow_euler sampler; the run's student loads back."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

import dq
from dq.arch import sample_shape
from dq.jobs.train import train
from tests.arch.test_flow_transformers import MODELS, _cond
from tests.train.conftest import compose_config, fast_overrides


def _write_folder(kind: str, root):
    MODELS[kind]().save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "scheduler")
    torch.manual_seed(3)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1).save_pretrained(root / "vae")
    save_file({"prompt_embeds": _cond(kind, 6).contiguous(), "uncond_embeds": _cond(kind, 1, seed=9).contiguous()},
              str(root / "embeds.safetensors"))
    return root


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_train_runs_a_flow_transformer_folder_end_to_end(kind, tmp_path):
    folder = _write_folder(kind, tmp_path / kind)
    overrides = [*fast_overrides(folder, tmp_path / "run", tmp_path / "cache"),
                 f"+model.conditioning.prompt_embeds_file={folder / 'embeds.safetensors'}",
                 "model.sampler.name=flow_euler", "model.sampler.spacing=uniform", "model.sampler.guidance_scale=2.0"]
    results = train(compose_config(overrides))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and (tmp_path / "run" / "samples.png").is_file()
    assert saved["num_steps"] == 4 and len(saved["block_final_losses"]) == saved["num_blocks"] >= 5
    assert saved["psnr_vs_fp"] > 10.0  # the 4-step W4A4 student stays close to its FP model
    student = dq.load_student(tmp_path / "run" / "student")
    assert type(student).__name__ == type(MODELS[kind]()).__name__ and sample_shape(student) == (4, 8, 8)
