"""Convert a CompVis latent-diffusion checkpoint (a `.ckpt` + its YAML config) to a diffusers model folder that
dq loads with `model=local model.path=DIR` (or the ldm_* model configs).

    python -m dq.zoo.convert_compvis --ckpt cin256-v2.ckpt \\
        --config configs/latent-diffusion/cin256-v2.yaml --out models/ldm_imagenet

The folder gets `unet/` (UNet2DModel for an unconditional UNet, UNet2DConditionModel for a cross-attention
one), `scheduler/` (the training noise schedule, as a DDIMScheduler config with CompVis' DDIM step offset), `vae/` (VQModel or AutoencoderKL,
its `scaling_factor` = the checkpoint's `scale_factor`) and, for a class-conditional LDM, `class_embedder/
embeddings.safetensors`; `conversion.json` records the source files (sha256), the weights used (EMA or raw)
and the layer counts. It covers the openaimodel UNet of the LDM configs (ResBlocks with or without scale-shift
norm and resblock up/down-sampling, legacy attention blocks with either head layout, spatial transformers
with a class or text context) and the VQ / KL first stages. Text encoders are not converted (Stable
Diffusion v1 exists in diffusers format: model=sd_v1_4).

Safety: the checkpoint is read with `torch.load(weights_only=True)`, which never runs code from the file.
Lightning checkpoints that pickle other objects beside the weights (callbacks, hyper-parameters) are refused
unless `--trust-pickle` is given for a file you trust. Every key of the UNet, the first stage and the class
table must be consumed and every diffusers parameter filled, or the conversion stops naming the keys.

Attention heads: an unconditional openaimodel UNet with a fixed number of heads (`num_heads`) has per-layer
head sizes that UNet2DModel's single `attention_head_dim` cannot express (LSUN-Church: 8 heads at 192-768
channels). The converter then writes `unet/attention_heads.json`, which `dq.zoo.loading` applies when it
loads the folder (diffusers alone would read that UNet with other head counts).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel, VQModel
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from dq import cli
from dq.arch import set_attention_heads
from dq.errors import MissingFileError, OutputExistsError, UnsupportedError, UserError
from dq.io import file_sha256, staged_dir
from dq.zoo.components import CLASS_EMBEDDINGS_FILE
from dq.zoo.loading import ATTENTION_HEADS_FILE

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
VQ_TARGETS = ("ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.VQModel")
KL_TARGETS = ("ldm.models.autoencoder.AutoencoderKL",)
CLASS_EMBEDDER_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> StateDict:
    """The flat state dict of a CompVis checkpoint (`.ckpt`/`.pt` with or without a "state_dict" entry, or
    `.safetensors`). ValueError for a missing, unreadable or non-checkpoint file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupted files
            raise UserError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:
        if not trust_pickle and "weights_only" in str(err):
            raise UserError(
                f"{path} pickles objects other than tensors (e.g. Lightning callbacks), which weights_only loading "
                "refuses; if you trust the file, pass --trust-pickle to read it with weights_only=False. "
                f"torch said: {str(err).splitlines()[0]}"
            ) from err
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?): {err}") from err
    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors (found {type(payload).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_config(path: str | Path) -> dict[str, Any]:
    """`model.params` of a CompVis LatentDiffusion YAML config, as plain containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"config {path} does not exist")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable YAML config: {err}") from err
    params = (config.get("model") or {}).get("params") if isinstance(config, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params:
        raise UserError(f"{path} is not a CompVis LatentDiffusion config (no model.params.unet_config)")
    target = params["unet_config"].get("target")
    if target != UNET_TARGET:
        raise UserError(f"{path}: unet_config.target is {target!r}; only {UNET_TARGET} is converted")
    return params


def select_unet_weights(state: StateDict, use_ema: bool | None) -> tuple[StateDict, bool]:
    """The UNet's weights without their prefix, and whether they are the EMA copy. use_ema=None takes the EMA
    copy when the checkpoint has one (what the CompVis samplers use), True requires it, False refuses it."""
    raw = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not raw:
        raise UserError(f"the checkpoint has no UNet weights (no key starts with {UNET_PREFIX!r})")
    # LitEma keeps one buffer per parameter, named after it with the dots removed
    ema_names = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in raw}
    has_ema = any(name in state for name in ema_names.values())
    if use_ema is False or (use_ema is None and not has_ema):
        return raw, False
    if not has_ema:
        raise UserError("--ema was asked for but the checkpoint has no model_ema.* weights")
    missing = [k for k, name in ema_names.items() if name not in state and raw[k].is_floating_point()]
    # buffers (none in openaimodel) would not be in the EMA; a missing parameter means a broken EMA
    if missing:
        raise UserError(f"the checkpoint's EMA lacks {len(missing)} UNet weights, e.g. {missing[:3]}")
    return {k: state[ema_names[k]] for k in raw}, True


# ---------------------------------------------------------------------------------------------- UNet


@dataclass
class UNetLayout:
    """What the openaimodel UNet params describe, level by level."""

    params: dict[str, Any]
    levels: int = 0
    res_blocks: int = 0
    channels: list[int] = field(default_factory=list)
    attention: list[bool] = field(default_factory=list)  # per level
    heads: list[int] = field(default_factory=list)  # per level (middle block: the last level's)
    spatial_transformer: bool = False
    updown: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> UNetLayout:
        params = dict(params)
        for unsupported in ("num_classes", "adm_in_channels"):
            if params.get(unsupported) is not None:
                raise UnsupportedError(f"openaimodel UNets with {unsupported} are not converted")
        if params.get("use_linear_in_transformer") or params.get("disable_self_attentions"):
            raise UnsupportedError("linear-projection / self-attention-free transformers (SD 2.x) are not converted")
        res_blocks = params["num_res_blocks"]
        if not isinstance(res_blocks, int):
            raise UnsupportedError(f"num_res_blocks must be one int, got {res_blocks!r}")
        mult = list(params["channel_mult"])
        base = int(params["model_channels"])
        attention_at = set(params.get("attention_resolutions") or [])
        num_heads, head_channels = int(params.get("num_heads", -1)), int(params.get("num_head_channels", -1))
        if num_heads == -1 and head_channels == -1:
            raise UserError("the UNet config sets neither num_heads nor num_head_channels")
        if int(params.get("num_heads_upsample", -1)) not in (-1, num_heads):
            raise UnsupportedError("num_heads_upsample different from num_heads is not converted")
        layout = cls(params, len(mult), res_blocks)
        layout.spatial_transformer = bool(params.get("use_spatial_transformer", False))
        layout.updown = bool(params.get("resblock_updown", False))
        if layout.spatial_transformer and params.get("context_dim") is None:
            raise UserError("use_spatial_transformer needs context_dim")
        for level, m in enumerate(mult):
            ch = base * int(m)
            layout.channels.append(ch)
            layout.attention.append(2**level in attention_at)
            heads = num_heads if head_channels == -1 else ch // head_channels
            if ch % heads:
                raise UserError(f"{ch} channels do not split into {heads} heads at level {level}")
            layout.heads.append(heads)
        return layout


def _unet_config(layout: UNetLayout) -> tuple[type[nn.Module], dict[str, Any], dict[str, int]]:
    """(diffusers class, its config, per-attention head overrides for attention_heads.json)."""
    p = layout.params
    common = {
        "sample_size": int(p.get("image_size", 32)),
        "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]),
        "block_out_channels": tuple(layout.channels),
        "layers_per_block": layout.res_blocks,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
        "resnet_time_scale_shift": "scale_shift" if p.get("use_scale_shift_norm") else "default",
    }
    if layout.spatial_transformer:
        if layout.updown:
            raise UnsupportedError("resblock_updown with spatial transformers has no diffusers block")
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(layout.attention))
        config = {
            **common,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": int(p["context_dim"]),
            "attention_head_dim": tuple(layout.heads),  # diffusers' legacy name: the number of heads per block
            "transformer_layers_per_block": int(p.get("transformer_depth", 1)),
            "use_linear_projection": False,
            "upcast_attention": False,
        }
        return UNet2DConditionModel, config, {}
    down_plain, up_plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if layout.updown else ("DownBlock2D", "UpBlock2D")
    config = {
        **common,
        "down_block_types": tuple("AttnDownBlock2D" if a else down_plain for a in layout.attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else up_plain for a in reversed(layout.attention)),
        "downsample_type": "resnet" if layout.updown else "conv",
        "upsample_type": "resnet" if layout.updown else "conv",
        "attn_norm_num_groups": 32,  # openaimodel normalises before every attention block (also with scale-shift)
    }
    # UNet2DModel has one head size for all attention layers; where the checkpoint's differ, record the heads
    attended = [ch // h for ch, h, a in zip(layout.channels, layout.heads, layout.attention) if a]
    head_sizes = set(attended) | {layout.channels[-1] // layout.heads[-1]}
    config["attention_head_dim"] = head_sizes.pop() if len(head_sizes) == 1 else None
    overrides: dict[str, int] = {}
    if config["attention_head_dim"] is None:
        for level, (heads, attn) in enumerate(zip(layout.heads, layout.attention)):
            if attn:
                up_level = layout.levels - 1 - level
                for r in range(layout.res_blocks):
                    overrides[f"down_blocks.{level}.attentions.{r}"] = heads
                for r in range(layout.res_blocks + 1):
                    overrides[f"up_blocks.{up_level}.attentions.{r}"] = heads
        overrides["mid_block.attentions.0"] = layout.heads[-1]
    return UNet2DModel, config, overrides


def diffusers_unet_from_params(params: Mapping[str, Any]) -> nn.Module:
    """The diffusers UNet (random weights, head counts applied) of an openaimodel UNet's YAML params: the
    architecture a conversion produces, for benchmarks without the checkpoint."""
    unet_class, config, heads = _unet_config(UNetLayout.from_params(params))
    unet = unet_class(**config)
    if heads:
        set_attention_heads(unet, heads)
    return unet.eval()


def _resblock_map(src: str, dst: str) -> dict[str, str]:
    return {
        f"{src}.in_layers.0": f"{dst}.norm1",
        f"{src}.in_layers.2": f"{dst}.conv1",
        f"{src}.emb_layers.1": f"{dst}.time_emb_proj",
        f"{src}.out_layers.0": f"{dst}.norm2",
        f"{src}.out_layers.3": f"{dst}.conv2",
        f"{src}.skip_connection": f"{dst}.conv_shortcut",
    }


def unet_module_map(layout: UNetLayout) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """CompVis module prefix -> diffusers module prefix for plain modules, and -> (diffusers prefix, heads)
    for attention blocks."""
    plain = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    attention: dict[str, tuple[str, int]] = {}

    def add_resblock(src: str, dst: str) -> None:
        plain.update(_resblock_map(src, dst))

    index = 1
    for level in range(layout.levels):
        for r in range(layout.res_blocks):
            add_resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{r}")
            if layout.attention[level]:
                attention[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{r}", layout.heads[level])
            index += 1
        if level != layout.levels - 1:
            if layout.updown:
                add_resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0")
            else:
                plain[f"input_blocks.{index}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            index += 1
    add_resblock("middle_block.0", "mid_block.resnets.0")
    attention["middle_block.1"] = ("mid_block.attentions.0", layout.heads[-1])
    add_resblock("middle_block.2", "mid_block.resnets.1")
    index = 0
    for up, level in enumerate(reversed(range(layout.levels))):
        for r in range(layout.res_blocks + 1):
            add_resblock(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{r}")
            sub = 1
            if layout.attention[level]:
                attention[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{r}", layout.heads[level])
                sub = 2
            if level != 0 and r == layout.res_blocks:
                if layout.updown:
                    add_resblock(f"output_blocks.{index}.{sub}", f"up_blocks.{up}.upsamplers.0")
                else:
                    plain[f"output_blocks.{index}.{sub}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            index += 1
    return plain, attention


def _split_qkv(weight: torch.Tensor, heads: int, legacy_order: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of a fused 1x1 qkv projection [3C, ...]. The legacy layout interleaves per head (q_h, k_h, v_h
    for each head); the new one stacks all q, then all k, then all v."""
    if not legacy_order:
        return weight.chunk(3, dim=0)
    per_head = weight.reshape(heads, 3, weight.shape[0] // (3 * heads), *weight.shape[1:])
    return tuple(per_head[:, i].reshape(-1, *weight.shape[1:]) for i in range(3))


def _attention_block(src: str, dst: str, state: StateDict, heads: int, legacy_order: bool) -> StateDict:
    """A legacy openaimodel AttentionBlock (norm, fused qkv Conv1d, proj_out Conv1d) as a diffusers Attention."""
    out = {
        f"{dst}.group_norm.weight": state[f"{src}.norm.weight"],
        f"{dst}.group_norm.bias": state[f"{src}.norm.bias"],
        f"{dst}.to_out.0.weight": state[f"{src}.proj_out.weight"].flatten(1),
        f"{dst}.to_out.0.bias": state[f"{src}.proj_out.bias"],
    }
    for kind in ("weight", "bias"):
        tensor = state[f"{src}.qkv.{kind}"]
        for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(tensor, heads, legacy_order)):
            out[f"{dst}.{name}.{kind}"] = part.flatten(1) if kind == "weight" else part
    return out


def convert_unet_state(state: StateDict, layout: UNetLayout) -> StateDict:
    """The diffusers state dict of an openaimodel UNet state (keys without the model.diffusion_model. prefix)."""
    plain, attention = unet_module_map(layout)
    legacy_order = not layout.params.get("use_new_attention_order", False)
    converted: StateDict = {}
    used: set[str] = set()
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module in plain:
            converted[f"{plain[module]}.{leaf}"] = tensor
            used.add(key)
    for src, (dst, heads) in attention.items():
        keys = [k for k in state if k.startswith(src + ".")]
        used.update(keys)
        if layout.spatial_transformer:  # SpatialTransformer and Transformer2DModel share their parameter names
            converted.update({dst + k[len(src) :]: state[k] for k in keys})
        else:
            converted.update(_attention_block(src, dst, state, heads, legacy_order))
    leftover = sorted(set(state) - used)
    if leftover:
        raise UserError(f"{len(leftover)} UNet keys have no place in the converted model, e.g. {leftover[:5]}")
    return converted


# ---------------------------------------------------------------------------------------------- first stage


def _autoencoder_config(first_stage: Mapping[str, Any], scaling_factor: float) -> tuple[type[nn.Module], dict[str, Any]]:
    target = first_stage.get("target")
    params = first_stage.get("params") or {}
    dd = params.get("ddconfig")
    if dd is None:
        raise UserError("first_stage_config.params has no ddconfig")
    if target not in VQ_TARGETS + KL_TARGETS:
        raise UnsupportedError(f"first stage {target!r} is not converted (VQ and KL autoencoders are)")
    mult = list(dd["ch_mult"])
    resolution, attn_res = int(dd["resolution"]), set(dd.get("attn_resolutions") or [])
    attn = [resolution // 2**level in attn_res for level in range(len(mult))]
    common = {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        "block_out_channels": tuple(int(dd["ch"]) * int(m) for m in mult),
        "layers_per_block": int(dd["num_res_blocks"]),
        "act_fn": "silu",
        "norm_num_groups": 32,
        "sample_size": resolution,
        "scaling_factor": float(scaling_factor),
    }
    if target in VQ_TARGETS:
        return VQModel, {
            **common,
            "latent_channels": int(dd["z_channels"]),
            "num_vq_embeddings": int(params["n_embed"]),
            "vq_embed_dim": int(params["embed_dim"]),
        }
    if not dd.get("double_z", True):
        raise UserError("a KL first stage needs double_z: true")
    if int(params["embed_dim"]) != int(dd["z_channels"]):
        raise UnsupportedError("KL first stages with embed_dim != z_channels have no diffusers AutoencoderKL")
    return AutoencoderKL, {**common, "latent_channels": int(dd["z_channels"])}


def _ae_resnet(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.{a}": f"{dst}.{b}" for a, b in
            (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut"))}


def _ae_attention(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.{a}": f"{dst}.{b}" for a, b in
            (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))}


def convert_autoencoder_state(state: StateDict, config: Mapping[str, Any]) -> StateDict:
    """The diffusers state dict of a CompVis VQ/KL autoencoder state (keys without first_stage_model.)."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    names = {n: n for n in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                            "quant_conv", "post_quant_conv", "quantize.embedding")}
    names.update({"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"})
    attention = set()
    for part in ("encoder", "decoder"):
        names.update(_ae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0"))
        names.update(_ae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1"))
        names.update(_ae_attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"))
        attention.add(f"{part}.mid.attn_1")
    for level in range(levels):
        for j in range(layers):
            names.update(_ae_resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}"))
            names.update(_ae_attention(f"encoder.down.{level}.attn.{j}", f"encoder.down_blocks.{level}.attentions.{j}"))
            attention.add(f"encoder.down.{level}.attn.{j}")
        names[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        up = levels - 1 - level  # the decoder's up list is indexed by level and runs from the deepest one
        for j in range(layers + 1):
            names.update(_ae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}"))
            names.update(_ae_attention(f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{up}.attentions.{j}"))
            attention.add(f"decoder.up.{level}.attn.{j}")
        names[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    converted, leftover = {}, []
    for key, tensor in state.items():
        if key.startswith("loss."):  # the training losses (LPIPS, discriminator) are not part of the model
            continue
        module, _, leaf = key.rpartition(".")
        if module not in names:
            leftover.append(key)
            continue
        owner = module.rpartition(".")[0]
        if owner in attention and leaf == "weight" and tensor.ndim == 4:  # 1x1 convs become linear layers
            tensor = tensor.flatten(1)
        converted[f"{names[module]}.{leaf}"] = tensor
    if leftover:
        raise UserError(f"{len(leftover)} first-stage keys have no place in the converted model, e.g. {leftover[:5]}")
    return converted


# ---------------------------------------------------------------------------------------------- the folder


def _load_strict(model: nn.Module, state: StateDict, what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {keys[:4]}" for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys
        )
        raise UserError(f"the converted {what} does not fit its diffusers model ({detail})")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _scheduler_config(params: Mapping[str, Any]) -> dict[str, Any]:
    parameterization = params.get("parameterization", "eps")
    prediction = {"eps": "epsilon", "v": "v_prediction"}.get(parameterization)
    if prediction is None:
        raise UnsupportedError(f"parameterization {parameterization!r} is not converted (eps and v are)")
    if params.get("beta_schedule", "linear") != "linear":
        raise UnsupportedError(f"beta_schedule {params['beta_schedule']!r} is not converted")
    # CompVis' "linear" schedule is linear in sqrt(beta): diffusers calls it scaled_linear. Its DDIM sampler
    # steps on range(0, T, T // S) + 1 and ends on alphas_cumprod[0]: steps_offset 1, set_alpha_to_one False
    return {
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 1e-4)),
        "beta_end": float(params.get("linear_end", 2e-2)),
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def convert(
    ckpt: str | Path,
    config: str | Path,
    out: str | Path,
    use_ema: bool | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the diffusers folder of a CompVis LDM checkpoint; returns the folder."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; --out must be a folder to write")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    params = read_config(config)
    state = read_checkpoint(ckpt, trust_pickle=trust_pickle)

    layout = UNetLayout.from_params(params["unet_config"]["params"])
    unet_state, ema_used = select_unet_weights(state, use_ema)
    unet_class, unet_config, heads = _unet_config(layout)
    unet = unet_class(**unet_config)
    _load_strict(unet, convert_unet_state(unet_state, layout), "UNet")

    first_stage = params.get("first_stage_config")
    if not isinstance(first_stage, Mapping):
        raise UserError("the config has no first_stage_config (pixel-space models are not LDMs)")
    if "scale_factor" in state:  # scale_by_std: measured on the first training batch, stored as a buffer
        scaling = float(state["scale_factor"])
    else:
        scaling = float(params.get("scale_factor", 1.0))
    vae_class, vae_config = _autoencoder_config(first_stage, scaling)
    vae = vae_class(**vae_config)
    ae_state = {k[len(FIRST_STAGE_PREFIX) :]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    if not ae_state:
        raise UserError(f"the checkpoint has no first-stage weights (no key starts with {FIRST_STAGE_PREFIX!r})")
    _load_strict(vae, convert_autoencoder_state(ae_state, vae_config), "first stage")

    class_table = _class_embeddings(params, state, unet_config.get("cross_attention_dim"))
    scheduler = DDIMScheduler(**_scheduler_config(params))
    if "betas" in state:  # LatentDiffusion stores its schedule: the config must describe the same one
        stored, built = state["betas"].double(), scheduler.betas.double()
        if stored.shape != built.shape or not torch.allclose(stored, built, rtol=1e-5, atol=1e-8):
            raise UserError("the checkpoint's stored betas differ from the schedule its config describes")

    # written beside `out` and renamed into place at the end: an interrupted conversion never leaves a
    # half-written folder that would load (say, a class-conditional model without its class table)
    with staged_dir(out) as staging:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        if heads:
            set_attention_heads(unet, heads)  # validates the names and head counts before they are written
            (staging / "unet" / ATTENTION_HEADS_FILE).write_text(json.dumps({"attention_heads": heads}, indent=2) + "\n")
        vae.save_pretrained(staging / "vae", safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        if class_table is not None:
            (staging / CLASS_EMBEDDINGS_FILE).parent.mkdir(parents=True, exist_ok=True)
            save_file({"weight": class_table.float().contiguous()}, str(staging / CLASS_EMBEDDINGS_FILE))
        record = {
            "source": {"ckpt": str(Path(ckpt).resolve()), "ckpt_sha256": file_sha256(ckpt),
                       "config": str(Path(config).resolve()), "config_sha256": file_sha256(config)},
            "unet": {"class": unet_class.__name__, "weights": "ema" if ema_used else "raw",
                     "parameters": sum(p.numel() for p in unet.parameters())},
            "vae": {"class": vae_class.__name__, "scaling_factor": scaling},
            "class_embedder": None if class_table is None else list(class_table.shape),
            "attention_heads_file": bool(heads),
        }
        (staging / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"wrote {out}: {unet_class.__name__} ({record['unet']['parameters'] / 1e6:.1f}M parameters, "
        f"{record['unet']['weights']} weights), {vae_class.__name__} (scaling_factor {scaling:g})"
        + (f", class table {list(class_table.shape)}" if class_table is not None else "")
    )
    return out


def _class_embeddings(params: Mapping[str, Any], state: StateDict, context_dim: int | None) -> torch.Tensor | None:
    cond = params.get("cond_stage_config")
    if cond in (None, "__is_unconditional__", "__is_first_stage__"):
        return None
    target = cond.get("target") if isinstance(cond, Mapping) else None
    if target != CLASS_EMBEDDER_TARGET:
        raise UnsupportedError(
            f"cond_stage {target!r} is not converted (only {CLASS_EMBEDDER_TARGET}); text-to-image models: use "
            "their diffusers release (e.g. model=sd_v1_4)"
        )
    if params.get("conditioning_key") != "crossattn":
        raise UnsupportedError(f"class conditioning through {params.get('conditioning_key')!r} is not converted")
    key = COND_STAGE_PREFIX + "embedding.weight"
    if key not in state:
        raise UserError(f"the checkpoint has no {key} (the class-embedding table)")
    table = state[key]
    if context_dim is not None and table.shape[1] != context_dim:
        raise UserError(f"{key} has width {table.shape[1]}, the UNet's context_dim is {context_dim}")
    return table


@cli.entry
def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="CompVis checkpoint (.ckpt, .pt or .safetensors)")
    parser.add_argument("--config", required=True, help="its LatentDiffusion YAML (configs/latent-diffusion/*.yaml)")
    parser.add_argument("--out", required=True, help="the diffusers folder to write")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="require the EMA weights (default: EMA when the checkpoint has them)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False, help="use the raw weights")
    parser.add_argument("--trust-pickle", action="store_true", help="read a checkpoint with weights_only=False")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (its old contents are removed)")
    args = parser.parse_args(argv)
    convert(args.ckpt, args.config, args.out, args.use_ema, args.trust_pickle, args.overwrite)


if __name__ == "__main__":
    main()
