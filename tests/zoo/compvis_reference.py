"""A test-only re-implementation of the CompVis latent-diffusion model classes in plain PyTorch.

It exists only to test `dq.zoo.convert_compvis` against the CompVis layout: the classes here have the parameter
names (state_dict keys), module nesting and forward math of github.com/CompVis/latent-diffusion

    CompVisUNet            ldm/modules/diffusionmodules/openaimodel.py UNetModel (+ ldm/modules/attention.py
                           SpatialTransformer), without num_classes / label_emb, checkpointing and dims != 2
    CompVisEncoder/Decoder ldm/modules/diffusionmodules/model.py Encoder / Decoder (vanilla attention, no temb)
    CompVisVQModel         ldm/models/autoencoder.py VQModel(Interface) with VectorQuantizer2 (legacy)
    CompVisAutoencoderKL   ldm/models/autoencoder.py AutoencoderKL
    CompVisClassEmbedder   ldm/modules/encoders/modules.py ClassEmbedder

so that a test can build one of them with random weights, write a LatentDiffusion-style checkpoint and YAML
config (`compvis_checkpoint`, `compvis_yaml`), convert them and compare the converted diffusers model's outputs
with these. `TINY_BEDROOM`, `TINY_CHURCH` and `TINY_CIN` are small descriptions mirroring the LDM paper's
LSUN-Bedrooms (VQ-f4), LSUN-Churches (KL-f8) and ImageNet (VQ-f8, class cross-attention) configs; `build`
turns one into (modules, yaml, checkpoint) with every parameter randomised. Dropout is accepted but must be 0.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EMA_OFFSET = 0.01  # the LitEma copies written by compvis_checkpoint(ema=True) are the weights + this
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"
KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
CLASS_EMBEDDER_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"

# ============================================================================================ openaimodel UNet


class GroupNorm32(nn.GroupNorm):
    """openaimodel's normalization(): GroupNorm(32, ch), eps 1e-5, computed in float32."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """openaimodel's sinusoidal embedding: [cos | sin], frequencies exp(-log(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(
        timesteps.device
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Downsample(nn.Module):
    """openaimodel Downsample: a stride-2 3x3 conv `op` (padding 1), or 2x2 average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = (
            nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """openaimodel Upsample: nearest x2, then (optionally) a 3x3 conv `conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # norm + SiLU, then resample h and x, then the conv
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _qkv_attention(qkv: torch.Tensor, heads: int, legacy_order: bool) -> torch.Tensor:
    """QKVAttentionLegacy (heads split before q/k/v) or QKVAttention (q/k/v split first); q and k are each
    scaled by ch**-1/4."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    if legacy_order:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(b * heads, ch, t) for part in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)


class AttentionBlock(nn.Module):
    def __init__(
        self, channels: int, num_heads: int = 1, num_head_channels: int = -1, new_order: bool = False
    ):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.legacy_order = not new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(_qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order))
        return (x + h).reshape(b, c, *spatial)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """attention.FeedForward with glu=True (what BasicTransformerBlock uses): net = GEGLU, Dropout, Linear."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # b n (h d) -> (b h) n d
            b, n, hd = t.shape
            return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn = (torch.einsum("bid,bjd->bij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bij,bjd->bid", attn, v)
        bh, n, d = out.shape
        out = out.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """attention.SpatialTransformer: GroupNorm(32, eps 1e-6), 1x1 conv proj_in/proj_out around the blocks."""

    def __init__(
        self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, context_dim: int | None = None
    ):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, hgt, wid = x.shape
        h = self.proj_in(self.norm(x))
        c = h.shape[1]
        h = h.reshape(b, c, hgt * wid).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        h = h.transpose(1, 2).reshape(b, c, hgt, wid)
        return self.proj_out(h) + x


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class CompVisUNet(nn.Module):
    """openaimodel.UNetModel, constructed from the unet_config params of a CompVis YAML."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: list[int],
        dropout: float = 0.0,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
    ):
        super().__init__()
        assert dims == 2 and num_classes is None and n_embed is None and not use_fp16 and dropout == 0
        assert (context_dim is not None) == use_spatial_transformer
        assert num_heads != -1 or num_head_channels != -1
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        heads = num_heads  # openaimodel overwrites its num_heads in the loop when num_head_channels is set

        def attention(ch: int, upsample_heads: bool) -> nn.Module:
            nonlocal heads
            if num_head_channels == -1:
                dim_head = ch // heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim
                )
            attn_heads = num_heads_upsample if upsample_heads else heads
            return AttentionBlock(ch, attn_heads, dim_head, new_order=use_new_attention_order)

        def resblock(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, 0.0, ch_out, use_scale_shift_norm=use_scale_shift_norm, **updown)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, upsample_heads=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), attention(ch, upsample_heads=False), resblock(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, upsample_heads=True))
                if level and i == num_res_blocks:
                    layers.append(
                        resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        skips, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


# ============================================================================================ first stage


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """model.py ResnetBlock with temb_channels=0 (no temb_proj) and a 1x1 nin_shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """model.py AttnBlock: single-head attention over positions with 1x1-conv q, k, v and proj_out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hgt, wid = x.shape
        q, k, v = (conv(h).reshape(b, c, hgt * wid) for conv in (self.q, self.k, self.v))
        weight = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * (int(c) ** -0.5), dim=2)
        h = torch.einsum("bij,bcj->bci", weight, v).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class _AEDownsample(nn.Module):
    """model.py Downsample: zero-pad right/bottom by 1, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class _AEUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CompVisEncoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: list[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        **ignored: Any,
    ):
        super().__init__()
        assert resamp_with_conv and dropout == 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult, res = (1, *ch_mult), resolution
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_mult[level]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                down.downsample = _AEDownsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i in range(self.num_res_blocks):
                h = down.block[i](h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class CompVisDecoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: list[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int | None = None,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        **ignored: Any,  # double_z
    ):
        super().__init__()
        assert resamp_with_conv and dropout == 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        ups: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = _AEUpsample(block_in)
                res *= 2
            ups.insert(0, up)  # up[i] is level i
        self.up = nn.ModuleList(ups)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i in range(self.num_res_blocks + 1):
                h = up.block[i](h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(_swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class VectorQuantizer(nn.Module):
    """VectorQuantizer2 (legacy, no remap): nearest codebook entry by squared euclidean distance."""

    def __init__(self, n_e: int, e_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim)
        codebook = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, hgt, wid = z.shape
        z_q = self.embedding(self.indices(z)).reshape(b, hgt, wid, self.e_dim).permute(0, 3, 1, 2)
        return z + (z_q - z).detach()  # the straight-through estimator, as in CompVis


class CompVisVQModel(nn.Module):
    """autoencoder.VQModel(Interface): encode -> pre-quantization latents, decode quantizes first."""

    def __init__(self, ddconfig: dict[str, Any], n_embed: int, embed_dim: int, **ignored: Any):
        super().__init__()
        self.encoder = CompVisEncoder(**ddconfig)
        self.decoder = CompVisDecoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class CompVisAutoencoderKL(nn.Module):
    """autoencoder.AutoencoderKL; encode_mean is the mean of DiagonalGaussianDistribution(moments)."""

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int, **ignored: Any):
        super().__init__()
        assert ddconfig["double_z"]
        self.encoder = CompVisEncoder(**ddconfig)
        self.decoder = CompVisDecoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(x).chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_mean(x))


class CompVisClassEmbedder(nn.Module):
    """encoders.modules.ClassEmbedder: labels [B] -> embedding(labels[:, None]) of shape [B, 1, embed_dim]."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels[:, None])


# ============================================================================================ checkpoint, YAML


def compvis_schedule_buffers(
    linear_start: float, linear_end: float, timesteps: int
) -> dict[str, torch.Tensor]:
    """The persistent buffers DDPM.register_schedule stores for the "linear" schedule (v_posterior=0)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cum = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cum[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - cum)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cum,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cum.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cum).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cum).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cum).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cum - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cum),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cum),
    }
    return {name: value.float() for name, value in buffers.items()}


def compvis_ema_unet(unet: CompVisUNet) -> CompVisUNet:
    """A copy of the UNet holding what compvis_checkpoint(ema=True) writes as its LitEma weights."""
    ema = copy.deepcopy(unet)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(EMA_OFFSET)
    return ema


def compvis_checkpoint(
    unet: CompVisUNet,
    first_stage: CompVisVQModel | CompVisAutoencoderKL,
    cond_stage: nn.Module | None = None,
    scale_factor: float | None = None,
    ema: bool = False,
    schedule: dict[str, Any] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"state_dict": ...} as a LatentDiffusion Lightning checkpoint holds it, in its key order: the UNet under
    "model.diffusion_model.", with ema=True the LitEma buffers ("model_ema.decay", "model_ema.num_updates",
    "model_ema.<'diffusion_model.' + key, dots removed>" = weights + EMA_OFFSET), the noise-schedule buffers when
    `schedule` (linear_start, linear_end, timesteps) is given, "scale_factor" (a 0-dim buffer, written only by
    scale_by_std models) when given, the first stage under "first_stage_model." with some loss.* entries as in
    checkpoints trained with an LPIPS loss, and the cond stage under "cond_stage_model."."""
    state: dict[str, torch.Tensor] = {}
    unet_state = unet.state_dict()
    for key, value in unet_state.items():
        state["model.diffusion_model." + key] = value.detach().clone()
    if ema:
        state["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        state["model_ema.num_updates"] = torch.tensor(12345, dtype=torch.int32)
        for key, p in unet.named_parameters():
            state["model_ema." + ("diffusion_model." + key).replace(".", "")] = (
                p.detach().clone() + EMA_OFFSET
            )
    if schedule is not None:
        state.update(
            compvis_schedule_buffers(schedule["linear_start"], schedule["linear_end"], schedule["timesteps"])
        )
    if scale_factor is not None:
        state["scale_factor"] = torch.tensor(float(scale_factor))
    gen = torch.Generator().manual_seed(1234)
    loss = {
        "loss.logvar": torch.tensor(0.0),
        "loss.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1, generator=gen),
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=gen) * 0.02,
        "loss.discriminator.main.0.bias": torch.zeros(64),
    }
    ae_state = first_stage.state_dict()
    for key, value in ae_state.items():
        if loss is not None and not key.startswith(("encoder.", "decoder.")):  # VQModel/AutoencoderKL order
            state.update({"first_stage_model." + k: v for k, v in loss.items()})
            loss = None
        state["first_stage_model." + key] = value.detach().clone()
    if cond_stage is not None:
        for key, value in cond_stage.state_dict().items():
            state["cond_stage_model." + key] = value.detach().clone()
    return {"state_dict": state}


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the config is YAML/OmegaConf friendly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def compvis_yaml(description: dict[str, Any]) -> dict[str, Any]:
    """The LatentDiffusion config (as configs/latent-diffusion/*.yaml lay it out) for a description: a dict with
    "diffusion" (LatentDiffusion params: linear_start, linear_end, timesteps, scale_by_std, conditioning_key,
    cond_stage_key, ...), "unet" (UNetModel params), "first_stage" ({"target", "params": {embed_dim, n_embed
    (VQ), ddconfig}}) and "cond_stage" (None for "__is_unconditional__", or {"target", "params"})."""
    desc = copy.deepcopy(description)
    unet = desc["unet"]
    first = desc["first_stage"]
    first["params"].setdefault("lossconfig", {"target": "torch.nn.Identity"})
    params: dict[str, Any] = {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "image",
        "image_size": unet["image_size"],
        "channels": unet["in_channels"],
        "monitor": "val/loss_simple_ema",
    }
    params.update(desc.get("diffusion", {}))
    params["unet_config"] = {"target": UNET_TARGET, "params": unet}
    params["first_stage_config"] = first
    params["cond_stage_config"] = desc.get("cond_stage") or "__is_unconditional__"
    return _plain(
        {
            "model": {
                "base_learning_rate": 1.0e-06,
                "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                "params": params,
            }
        }
    )


# ============================================================================================ descriptions

TINY_BEDROOM: dict[str, Any] = {  # lsun_bedrooms-ldm-vq-4: VQ-f4, 16-channel heads (4 and 6), none at ds 1
    "diffusion": {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000},
    "unet": {
        "image_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 32,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 3],
        "num_head_channels": 16,
    },
    "first_stage": {
        "target": VQ_TARGET,
        "params": {
            "embed_dim": 3,
            "n_embed": 16,
            "ddconfig": {
                "double_z": False,
                "z_channels": 3,
                "resolution": 32,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 2, 2],
                "num_res_blocks": 2,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        },
    },
    "cond_stage": None,
    "stored_scale_factor": None,
}

TINY_CHURCH: dict[
    str, Any
] = {  # lsun_churches-ldm-kl-8: KL-f8, 2 heads at every width, FiLM, resblock up/down
    "diffusion": {
        "linear_start": 0.0015,
        "linear_end": 0.0155,
        "timesteps": 1000,
        "loss_type": "l1",
        "cond_stage_key": "image",
        "cond_stage_trainable": False,
        "concat_mode": False,
        "scale_by_std": True,
    },
    "unet": {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1, 2, 4],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 2],
        "num_heads": 2,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
    },
    "first_stage": {
        "target": KL_TARGET,
        "params": {
            "embed_dim": 4,
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 1, 2, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        },
    },
    "cond_stage": None,
    "stored_scale_factor": 0.7191,  # scale_by_std stores the computed factor in the checkpoint
}

TINY_CIN: dict[
    str, Any
] = {  # cin-ldm-vq-f8: VQ-f8 with attention at the deepest level, class cross-attention
    "diffusion": {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "timesteps": 1000,
        "cond_stage_key": "class_label",
        "cond_stage_trainable": True,
        "conditioning_key": "crossattn",
    },
    "unet": {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 1,
        "channel_mult": [1, 2, 2],
        "num_heads": 1,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 16,
    },
    "first_stage": {
        "target": VQ_TARGET,
        "params": {
            "embed_dim": 4,
            "n_embed": 16,
            "ddconfig": {
                "double_z": False,
                "z_channels": 4,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 1, 2, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [8],
                "dropout": 0.0,
            },
        },
    },
    "cond_stage": {
        "target": CLASS_EMBEDDER_TARGET,
        "params": {"embed_dim": 16, "n_classes": 11, "key": "class_label"},
    },
    "stored_scale_factor": None,
}

DESCRIPTIONS = {"bedroom": TINY_BEDROOM, "church": TINY_CHURCH, "cin": TINY_CIN}


def variant(description: dict[str, Any], **unet_overrides: Any) -> dict[str, Any]:
    """A deep copy of a description with some UNet params replaced (e.g. use_new_attention_order=True)."""
    desc = copy.deepcopy(description)
    desc["unet"].update(unet_overrides)
    return desc


# ============================================================================================ building


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Overwrite every parameter (CompVis zero-inits several output convs): norm weights ~ 1 + N(0, 0.1), norm
    biases ~ N(0, 0.1), embedding tables ~ N(0, 1), all other weights and biases ~ N(0, 0.05)."""
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(sub, nn.GroupNorm | nn.LayerNorm):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                elif isinstance(sub, nn.Embedding):
                    p.copy_(noise)
                else:
                    p.copy_(0.05 * noise)
    return module


def build_modules(description: dict[str, Any]) -> dict[str, nn.Module | None]:
    """{"unet", "first_stage", "cond_stage"} as the description's YAML would instantiate them (default init)."""
    desc = copy.deepcopy(description)
    first = desc["first_stage"]
    ae_class = CompVisAutoencoderKL if first["target"] == KL_TARGET else CompVisVQModel
    cond = desc.get("cond_stage")
    return {
        "unet": CompVisUNet(**desc["unet"]),
        "first_stage": ae_class(**first["params"]),
        "cond_stage": CompVisClassEmbedder(**cond["params"]) if cond else None,
    }


def build(
    description: dict[str, Any], seed: int = 0, ema: bool = False
) -> tuple[dict[str, nn.Module | None], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(modules, yaml dict, checkpoint) for a description, every parameter random (seeded), modules in eval mode.
    The checkpoint holds the schedule buffers, the description's stored_scale_factor and, with ema=True, an EMA
    copy = weights + EMA_OFFSET (compvis_ema_unet(modules["unet"]) reproduces it)."""
    generator = torch.Generator().manual_seed(seed)
    modules = build_modules(description)
    for module in modules.values():
        if module is not None:
            randomize_(module, generator).eval()
    first = modules["first_stage"]
    if isinstance(first, CompVisVQModel):
        # spread the codebook like the latents (per channel), so that many entries get used
        res = first.encoder.resolution
        with torch.no_grad():
            probe = first.encode(torch.randn(4, first.encoder.in_channels, res, res, generator=generator))
            mean, std = probe.mean(dim=(0, 2, 3)), probe.std(dim=(0, 2, 3))
            codebook = first.quantize.embedding.weight
            codebook.copy_(mean + codebook * std)
    diffusion = compvis_yaml(description)["model"]["params"]
    schedule = {k: diffusion[k] for k in ("linear_start", "linear_end", "timesteps")}
    checkpoint = compvis_checkpoint(
        modules["unet"],
        modules["first_stage"],
        modules["cond_stage"],
        scale_factor=description.get("stored_scale_factor"),
        ema=ema,
        schedule=schedule,
    )
    return modules, compvis_yaml(description), checkpoint
