"""Architecture descriptions: the UNet description's blocks are the blocks a forward pass runs, in its
order, and together hold every layer once; its skip splits and attention list match the model; models no
description knows are refused where a description is required."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dq.arch import Architecture, describe, described_classes
from dq.bkd import check_block_order, execution_order
from dq.errors import UnsupportedError
from dq.zoo.loading import EMBEDDED_MODEL_DIR, load_model_folder
from tests.conftest import make_tiny_text_unet, make_tiny_unet

# the BKD block list of the embedded model (results.json of `python train.py` before descriptions existed)
EMBEDDED_BLOCKS = (
    "time_embedding", "conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0",
    "down_blocks.1.resnets.0", "down_blocks.1.attentions.0", "down_blocks.1.downsamplers.0",
    "down_blocks.2.resnets.0", "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
    "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0",
    "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.1.upsamplers.0",
    "up_blocks.2.resnets.0", "up_blocks.2.resnets.1", "conv_out",
)


def _example(model: nn.Module) -> dict[str, torch.Tensor]:
    config = model.config
    batch = {"x_t": torch.randn(2, config.in_channels, config.sample_size, config.sample_size),
             "timestep": torch.tensor([10, 500]), "step": torch.tensor([0, 1])}
    if isinstance(model, UNet2DConditionModel):
        batch["cond"] = torch.randn(2, 3, config.cross_attention_dim)
    elif config.num_class_embeds:
        batch["cond"] = torch.tensor([1, 2])
    return batch


MODELS = {
    "pixel": lambda: make_tiny_unet(),
    "class": lambda: make_tiny_unet(num_class_embeds=11),
    "text": lambda: make_tiny_text_unet(),
    "embedded": lambda: load_model_folder(EMBEDDED_MODEL_DIR)[0],
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_unet_blocks_are_the_forward_order_and_hold_every_layer_once(kind):
    model = MODELS[kind]()
    arch = describe(model, required=True)
    assert arch.family == "unet2d"
    blocks = list(arch.blocks)
    assert execution_order(model, blocks, _example(model)) == blocks  # each runs once, in this order
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        owners = [b for b in blocks if layer == b or layer.startswith(b + ".")]
        assert len(owners) == 1, (layer, owners)
    assert arch.first_layers == ("conv_in",) and arch.last_layers == ("conv_out",)
    attention_types = {type(model.get_submodule(n)).__name__ for n in arch.attention}
    assert arch.attention and attention_types == {"Attention"}
    if kind == "embedded":
        assert arch.blocks == EMBEDDED_BLOCKS


def test_skip_splits_are_the_up_resnets_input_layers():
    model = make_tiny_unet()
    splits = describe(model).skip_splits
    up_resnets = [f"up_blocks.{i}.resnets.{j}" for i, b in enumerate(model.up_blocks) for j in range(len(b.resnets))]
    assert {name.rsplit(".", 1)[0] for name in splits} == set(up_resnets)
    for name, split in splits.items():
        layer = model.get_submodule(name)
        assert name.endswith((".conv1", ".conv_shortcut")) and 0 < split < layer.in_channels


def test_unknown_models_are_generic_or_refused():
    assert describe(nn.Sequential(nn.Linear(2, 2))) == Architecture("generic")
    with pytest.raises(UnsupportedError, match="no architecture description of Sequential"):
        describe(nn.Sequential(nn.Linear(2, 2)), required=True)
    assert {"UNet2DModel", "UNet2DConditionModel"} <= set(described_classes())
    model = make_tiny_unet()
    model.extra_head = nn.Linear(4, 4)  # a part the UNet description does not know
    with pytest.raises(UnsupportedError, match="extra_head"):
        describe(model)
    model = make_tiny_unet()
    model.down_blocks[0].side = nn.Conv2d(8, 8, 1)
    with pytest.raises(UnsupportedError, match="down_blocks.0"):
        describe(model)


def test_a_description_in_the_wrong_order_is_refused():
    model = make_tiny_unet()
    blocks = list(describe(model).blocks)
    blocks[2], blocks[3] = blocks[3], blocks[2]
    with pytest.raises(ValueError, match="the description is wrong"):
        check_block_order(model, blocks, _example(model))
