"""Quantized Conv2d / Linear carrying the Weight Dilation pre-scale, and quantized diffusers attention.

A quantized layer computes  Y = q_w(s·W) ⊛ q_x(X / s)  (eq. 10): `weight` holds the dilated weight s·W,
the buffer `wd_scale` holds s [C_in] (ones when WD is off), and the input quantizer sees X / s.
With `split_at`, the input channels [0, split_at) and [split_at, C_in) get separate activation
quantizers (up-path skip concatenations [h, skip], Q-Diffusion's "split").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import UserError
from dq.quant import ops
from dq.quant.config import QuantConfig
from dq.quant.dilation import apply_dilation, dilation_scale
from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer


def _act_quantizer(bits: int, config: QuantConfig) -> TemporalActQuantizer:
    return TemporalActQuantizer(
        bits,
        config.num_steps,
        config.num_groups,
        init_method=config.act_init,
        percentile=config.act_percentile,
        lsq_grad_scale=config.lsq_grad_scale,
    )


class _QuantLayerMixin:
    """Shared set-up and input path of QuantConv2d and QuantLinear (channel axis differs)."""

    channel_axis: int
    float_type: type[nn.Module]
    weight: nn.Parameter

    @classmethod
    def from_float(
        cls, layer: nn.Module, weight_bits: int, act_bits: int, config: QuantConfig, split_at: int | None = None
    ):
        """The quantized twin of a float layer, sharing its Parameter objects (so in-place conversion keeps
        optimizer references and tied weights); WD is applied to the weight when the config asks for it."""
        if type(layer) is not cls.float_type:
            raise TypeError(f"{cls.__name__}.from_float expects a plain {cls.float_type.__name__}, got {type(layer).__name__}")
        if getattr(layer, "groups", 1) != 1:
            raise UserError(
                f"grouped convolutions (groups={layer.groups}) are not supported by Weight Dilation; "
                "exclude this layer with QuantConfig.exclude"
            )
        quant = cls.__new__(cls)
        nn.Module.__init__(quant)
        state = {k: v for k, v in layer.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        quant.__dict__.update(state)
        quant._parameters = dict(layer._parameters)
        quant._buffers = dict(layer._buffers)
        quant._modules = dict(layer._modules)
        quant._setup_quant(weight_bits, act_bits, config, split_at)
        return quant

    def _setup_quant(self, weight_bits: int, act_bits: int, config: QuantConfig, split_at: int | None) -> None:
        in_channels = self.weight.shape[1]
        if split_at is not None and not 0 < split_at < in_channels:
            raise UserError(f"split_at must be in (0, {in_channels}), got {split_at}")
        self.split_at = split_at
        self.register_buffer("wd_scale", torch.ones(in_channels, dtype=self.weight.dtype, device=self.weight.device))
        if config.weight_dilation:
            with torch.no_grad():
                s = dilation_scale(self.weight, config.dilation_max_scale)
                self.weight.copy_(apply_dilation(self.weight, s))
                self.wd_scale.copy_(s)
        self.weight_quantizer = WeightQuantizer(self.weight.shape[0], weight_bits, config.lsq_grad_scale)
        self.weight_quantizer.to(self.weight.device)
        self.weight_quantizer.init_from(self.weight, config.weight_init)
        self.act_quantizer = _act_quantizer(act_bits, config).to(self.weight.device)
        self.skip_act_quantizer = _act_quantizer(act_bits, config).to(self.weight.device) if split_at else None

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x / ops.channel_view(self.wd_scale, x.ndim, self.channel_axis % x.ndim)
        if self.skip_act_quantizer is None:
            return self.act_quantizer(x)
        head, skip = torch.split(x, [self.split_at, x.shape[self.channel_axis] - self.split_at], self.channel_axis)
        return torch.cat([self.act_quantizer(head), self.skip_act_quantizer(skip)], dim=self.channel_axis)


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d with a per-out-channel weight quantizer, a TPQ input quantizer and the WD pre-scale."""

    channel_axis = 1
    float_type = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_input(x), self.weight_quantizer(self.weight), self.bias)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """nn.Linear with a per-out-channel weight quantizer, a TPQ input quantizer and the WD pre-scale."""

    channel_axis = -1
    float_type = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.weight_quantizer(self.weight), self.bias)


class QuantAttnProcessor(nn.Module):
    """Attention processor for diffusers `Attention` with quantized matmul inputs.

    q, k, v are quantized at `qkv_bits` (per tensor, TPQ tables) and the softmax output at `softmax_bits`;
    the projections to_q/to_k/to_v/to_out are QuantLinear layers set by the converter. Being an nn.Module
    assigned to `attn.processor`, its quantizers live in the model's state_dict.
    """

    def __init__(self, qkv_bits: int, softmax_bits: int, config: QuantConfig) -> None:
        super().__init__()
        self.q_quantizer = _act_quantizer(qkv_bits, config)
        self.k_quantizer = _act_quantizer(qkv_bits, config)
        self.v_quantizer = _act_quantizer(qkv_bits, config)
        self.probs_quantizer = _act_quantizer(softmax_bits, config)

    @classmethod
    def from_quantizers(cls, q: nn.Module, k: nn.Module, v: nn.Module, probs: nn.Module) -> QuantAttnProcessor:
        """A processor with the given quantizer modules (any module mapping a tensor to its quantized value,
        e.g. the integer runtime's fixed-table quantizers)."""
        processor = cls.__new__(cls)
        nn.Module.__init__(processor)
        processor.q_quantizer, processor.k_quantizer, processor.v_quantizer = q, k, v
        processor.probs_quantizer = probs
        return processor

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_layout = hidden_states.ndim == 4
        if image_layout:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        query = attn.head_to_batch_dim(self.q_quantizer(query))  # [B·heads, L_q, d]
        key = attn.head_to_batch_dim(self.k_quantizer(key))
        value = attn.head_to_batch_dim(self.v_quantizer(value))

        scores = torch.bmm(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(value.dtype)
        probs = self.probs_quantizer(probs)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if image_layout:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
