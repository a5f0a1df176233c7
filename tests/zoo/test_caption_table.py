"""A class table of captions (class_embedder/embeddings.safetensors, weight [K + 1, L, D]): each label becomes
a caption of L tokens, packed with an all-ones attention mask for a PixArt-shaped denoiser, through the same
loading path as dq's embedded PixArt."""

import pytest
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf
from safetensors.torch import save_file

from dq.errors import UserError
from dq.sampling import sample, unet_forward
from dq.zoo import load_model
from tests.arch.test_transformers import SAMPLER, tiny_pixart

NUM_CLASSES, TOKENS = 4, 3


def _folder(root, table: torch.Tensor):
    tiny_pixart().save_pretrained(root / "transformer")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    (root / "class_embedder").mkdir()
    save_file({"weight": table.contiguous()}, str(root / "class_embedder" / "embeddings.safetensors"))
    return root


def _config(root):
    return OmegaConf.create({"source": "local", "path": str(root),
                             "conditioning": {"num_classes": NUM_CLASSES, "uncond_class": NUM_CLASSES},
                             "sampler": {"name": "ddim", "num_steps": 4, "eta": 0.0, "spacing": "uniform",
                                         "guidance_scale": 2.0}})


def test_caption_rows_are_packed_with_a_mask_and_condition_the_model(tmp_path):
    table = torch.randn(NUM_CLASSES + 1, TOKENS, 12, generator=torch.Generator().manual_seed(0))
    bundle = load_model(_config(_folder(tmp_path, table)))
    conditioning = bundle.conditioning
    assert conditioning.prompt_embeds.shape == (NUM_CLASSES, TOKENS + 1, 12)  # + the packed mask row
    torch.testing.assert_close(conditioning.prompt_embeds[:, :TOKENS], table[:NUM_CLASSES])
    assert torch.equal(conditioning.prompt_embeds[:, TOKENS, :TOKENS], torch.ones(NUM_CLASSES, TOKENS))
    torch.testing.assert_close(conditioning.uncond_embeds[0, :TOKENS], table[NUM_CLASSES])
    cond, uncond = conditioning.for_indices(torch.arange(6))
    torch.testing.assert_close(cond[:, :TOKENS], table[torch.arange(6) % NUM_CLASSES])
    model = bundle.unet
    x, t = torch.randn(6, 2, 8, 8), torch.full((6,), 500)
    with torch.no_grad():
        by_label = unet_forward(model, x, t, cond)
        direct = model(x, timestep=t, encoder_hidden_states=table[torch.arange(6) % NUM_CLASSES]).sample[:, :2]
    torch.testing.assert_close(by_label, direct)
    images = sample(model, bundle.scheduler.config, SAMPLER, 6, seed=0, batch_size=6, progress=False,
                    cond=cond, uncond=uncond)
    assert images.shape == (6, 2, 8, 8) and torch.isfinite(images).all()


def test_a_table_of_the_wrong_rank_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"\[num_classes \+ 1, L, D\]"):
        load_model(_config(_folder(tmp_path, torch.randn(NUM_CLASSES + 1, TOKENS, 12, 2))))
