"""Quantized Conv2d / Linear carrying the Weight Dilation pre-scale (quantized attention: dq.quant.attention).

A quantized layer computes  Y = q_w(s·W) ⊛ q_x(X / s)  (eq. 10): `weight` holds the dilated weight s·W,
the buffer `wd_scale` holds s [C_in] (ones when WD is off), and the input quantizer sees X / s.
With `split_at`, the input channels [0, split_at) and [split_at, C_in) get separate activation
quantizers (up-path skip concatenations [h, skip], Q-Diffusion's "split").
A QuantLinear may carry a full-precision low-rank branch (QuantConfig.lowrank_rank):
Y = q_w(W') q_x(X') + λ · X' Aᵀ Bᵀ, with X' the layer's transformed, unquantized input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import UserError
from dq.quant import ops
from dq.quant.config import QuantConfig
from dq.quant.dilation import apply_dilation, dilation_scale
from dq.quant.quantizers import TemporalActQuantizer, TokenActQuantizer, WeightQuantizer
from dq.quant.rotation import block_size, random_signs, rotate


def new_act_quantizer(bits: int, config: QuantConfig, per_token: bool = False) -> TemporalActQuantizer:
    """A TPQ activation quantizer by the config: per tensor, or per token (`per_token`, Linear inputs only)."""
    if per_token:
        return TokenActQuantizer(bits, config.num_steps, config.num_groups, lsq_grad_scale=config.lsq_grad_scale)
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
        cls, layer: nn.Module, weight_bits: int, act_bits: int, config: QuantConfig, split_at: int | None = None,
        token_wise: bool = False,
    ):
        """The quantized twin of a float layer, sharing its Parameter objects (so in-place conversion keeps
        optimizer references and tied weights); WD is applied to the weight when the config asks for it, and
        with `token_wise` (a Linear but the first, last and modulation layers) the input rotation (config.rotation)
        folded into it and the low-rank branch (config.lowrank_rank)."""
        if not isinstance(layer, cls.float_type):  # a subclass only when it computes as its base (quantize_model)
            raise TypeError(f"{cls.__name__}.from_float expects a {cls.float_type.__name__}, got {type(layer).__name__}")
        quant = cls.__new__(cls)
        nn.Module.__init__(quant)
        state = {k: v for k, v in layer.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        quant.__dict__.update(state)
        quant._parameters = dict(layer._parameters)
        quant._buffers = dict(layer._buffers)
        quant._modules = dict(layer._modules)
        quant._setup_quant(weight_bits, act_bits, config, split_at, token_wise)
        return quant

    def _setup_quant(self, weight_bits: int, act_bits: int, config: QuantConfig, split_at: int | None,
                     token_wise: bool = False) -> None:
        """WD, then for a token-wise Linear the rotation (config.rotation), the weight and input quantizers, and
        for a token-wise Linear the low-rank branch (config.lowrank_rank)."""
        groups = getattr(self, "groups", 1)
        in_channels = self.weight.shape[1] * groups
        if split_at is not None and not 0 < split_at < in_channels:
            raise UserError(f"split_at must be in (0, {in_channels}), got {split_at}")
        if split_at is not None and groups != 1:
            raise UserError(f"a grouped convolution (groups={groups}) cannot take a split input")
        self.split_at = split_at
        self.register_buffer("wd_scale", torch.ones(in_channels, dtype=self.weight.dtype, device=self.weight.device))
        # A grouped convolution keeps s = 1: in a depthwise one (Sana's GLU feed-forward) every weight row reads a
        # single input channel, which then holds its own row's max and min, so eq. 11 gives s = 1 anyway.
        # on the meta device (dq.plan builds students from configs alone) there are no values to read: the
        # layer gets its shapes, and WD and the weight quantizer's initialisation are left out
        meta = self.weight.is_meta
        if config.weight_dilation and groups == 1 and not meta:
            with torch.no_grad():
                s = dilation_scale(self.weight, config.dilation_max_scale)
                self.weight.copy_(apply_dilation(self.weight, s))
                self.wd_scale.copy_(s)
        # the input rotation (dq.quant.rotation) after WD: y = (x/s · R)(s·W · R)ᵀ; the rotated weight is stored
        rotate_input = token_wise and config.rotation
        self.rotation_block = block_size(in_channels, config.rotation_block) if rotate_input else 1
        signs = random_signs(in_channels).to(self.weight) if self.rotation_block > 1 else None
        self.register_buffer("rotation_signs", signs)
        if signs is not None and not meta:
            with torch.no_grad():
                # in float32 for half-precision weights: a bf16 matmul would add its rounding to every weight
                self.weight.copy_(rotate(self.weight.float(), signs.float(), self.rotation_block))
        lowrank = config.lowrank_rank if token_wise and self.channel_axis == -1 else 0
        if not lowrank:
            self.lowrank_down = self.lowrank_up = self.lowrank_scale = None
        elif config.lowrank_mode == "keep":  # SVDQuant's split: the top-r part leaves the quantized weight
            self._setup_lowrank(lowrank, self.weight, meta)
        centred = config.weight_zero_point == "centred" and weight_bits == 8  # int8 without a shift correction
        self.weight_quantizer = WeightQuantizer(self.weight.shape[0], weight_bits, config.lsq_grad_scale, centred)
        self.weight_quantizer.to(self.weight.device)
        if not meta:
            self.weight_quantizer.init_from(self.weight, config.weight_init)
        if lowrank and config.lowrank_mode == "decay":  # the branch starts as the weight's quantization error
            with torch.no_grad():
                error = None if meta else self.weight - self.weight_quantizer(self.weight)
            self._setup_lowrank(lowrank, error, meta)
        per_token = config.act_granularity == "token" and self.channel_axis == -1
        self.act_quantizer = new_act_quantizer(act_bits, config, per_token).to(self.weight.device)
        self.skip_act_quantizer = new_act_quantizer(act_bits, config).to(self.weight.device) if split_at else None

    def _setup_lowrank(self, rank: int, source: torch.Tensor | None, meta: bool) -> None:
        """The branch's A [r, C_in] and B [C_out, r] from the top-r singular part of `source` (√σ on each side),
        and λ = 1. With `source` the weight itself ("keep"), the weight keeps only the rest."""
        out_features, in_features = self.weight.shape
        rank = min(rank, out_features, in_features)
        if meta:
            down = torch.empty(rank, in_features, device="meta", dtype=self.weight.dtype)
            up = torch.empty(out_features, rank, device="meta", dtype=self.weight.dtype)
        else:
            with torch.no_grad():
                u, sigma, vh = torch.linalg.svd(source.detach().double(), full_matrices=False)
                root = sigma[:rank].sqrt()
                up64, down64 = u[:, :rank] * root, root[:, None] * vh[:rank]
                if source is self.weight:
                    self.weight.copy_((self.weight.double() - up64 @ down64).to(self.weight.dtype))
                down, up = down64.to(self.weight.dtype), up64.to(self.weight.dtype)
        self.lowrank_down = nn.Parameter(down)
        self.lowrank_up = nn.Parameter(up)
        self.register_buffer("lowrank_scale", torch.ones((), dtype=torch.float32, device=self.weight.device))

    def drop_lowrank(self) -> None:
        """Remove the low-rank branch (a decayed one adds nothing: λ = 0)."""
        for name in ("lowrank_down", "lowrank_up"):
            self._parameters.pop(name, None)
        self._buffers.pop("lowrank_scale", None)
        self.lowrank_down = self.lowrank_up = self.lowrank_scale = None

    def _layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """X' = X / s (WD), then the rotation where the layer has one: the input the quantizer sees."""
        x = x / ops.channel_view(self.wd_scale, x.ndim, self.channel_axis % x.ndim)
        if self.rotation_signs is not None:  # a Linear's input: channels last
            x = rotate(x, self.rotation_signs, self.rotation_block)
        return x

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize_layer_input(self._layer_input(x))

    def _quantize_layer_input(self, x: torch.Tensor) -> torch.Tensor:
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
        if getattr(self, "lowrank_down", None) is None:
            return F.linear(self._quantize_input(x), self.weight_quantizer(self.weight), self.bias)
        x = self._layer_input(x)
        y = F.linear(self._quantize_layer_input(x), self.weight_quantizer(self.weight), self.bias)
        branch = F.linear(F.linear(x, self.lowrank_down), self.lowrank_up)
        return y + self.lowrank_scale.to(y.dtype) * branch
