"""QuantConfig: what a quantized student is (bits, precision policy, WD, TPQ, split). It serializes to a
plain dict, so every saved student records how it was made, and it validates itself on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dq.config_values import known_fields
from dq.errors import UserError

ACT_INIT_METHODS = ("minmax", "percentile", "mse")
WEIGHT_INIT_METHODS = ("minmax", "mse")
ACT_GRANULARITIES = ("tensor", "token")
LOWRANK_MODES = ("decay", "keep")


@dataclass(frozen=True)
class QuantConfig:
    """The quantization recipe of a student model (docs/method.md §1-§3).

    weight_bits, act_bits: bits of every quantized Conv2d/Linear weight (per out-channel) and input
      activation (per tensor, one (Δ, z) per TPQ group).
    first_layer_bits, last_layer_bits: bits of conv_in / conv_out (weights and input); None = the
      configured weight_bits/act_bits ("standard setting": 8).
    modulation_bits: bits of a transformer's adaLN modulation linears (weights and input; the layers its
      architecture description names); None = weight_bits/act_bits. Keep them in float with `exclude`.
      Default 8: on the embedded DiT at W4A4, +0.9 to +1.2 dB PSNR vs FP over 4-bit modulation.
    attn_bits: bits of the attention matmul inputs q, k, v (None = act_bits); softmax_bits: of the
      attention probabilities.
    include, exclude: fnmatch patterns on module names (as `named_modules` gives them); a layer is
      quantized if it matches some include pattern and no exclude pattern.
    weight_dilation, dilation_max_scale: Weight Dilation on/off and its optional cap (§2).
    num_steps, num_groups: T sampling steps of the schedule the student serves and G TPQ groups (§3).
    split_skip: separate activation quantizers for the two halves of up-path skip concatenations.
    act_init, act_percentile, weight_init: how (Δ, z) are initialised from data (MSE activations and
      min-max weights: the choice of bench/defaults_sweep.py).
    lsq_grad_scale: scale the gradients of Δ and z as LSQ does.
    weight_zero_point: "learned" (per output channel, trained: the paper's) or "centred": 8-bit weights get
      z_w = 128, fixed, so q_w − z_w fits int8 and the integer model's kernels need no per-row shift correction
      (weights of fewer bits keep a learned z_w).
    act_granularity: "tensor" (one (Δ, z) per TPQ group, the paper) or "token": every Linear input is
      quantized per token at run time, each token's grid from its own range shrunk by a learned clip ratio,
      one per TPQ group (`dq.quant.TokenActQuantizer`); convolutions and attention matmuls stay per tensor.
    attn_granularity: "tensor" or "token": the attention's q and k quantized per token (per token and head in
      SD3/Flux joint attention) with learned clip ratios, as Linear inputs under act_granularity "token"
      (their per-row scales factor out of q kᵀ); v and the softmax output stay per tensor.
    promote_layers, promote_bits: fnmatch patterns of layers whose input activations take promote_bits
      (weights keep their bits): mixed precision by sensitivity, the layers `bench/sensitivity.py` ranks first.
    rotation, rotation_block: rotate the inputs of the token-wise Linear layers (every Linear but the
      first, last and modulation layers) by a signed block-Hadamard matrix of at most `rotation_block`
      channels, folded into the weights (`dq.quant.rotation`).
    lowrank_rank, lowrank_mode: a full-precision low-rank branch of rank r beside the quantized product of the
      same Linear layers (0 = none): y = q(x') q(W')ᵀ + λ · x' Aᵀ Bᵀ, fed the unquantized input x' (after WD and
      the rotation). "keep": A, B start as the top-r singular part of W' and the quantized weight holds the
      rest (SVDQuant's split); the branch stays at inference (r·(C_in + C_out) float weights per layer).
      "decay": A, B start as the top-r singular part of the weight's quantization error, λ falls from 1 to 0
      while the layer's block trains (method.distill.lowrank_decay_end), and the branch is dropped after
      training: inference pays nothing (an auxiliary branch, as QVGen trains one).
    """

    # The defaults are the recipe `python train.py` runs (conf/quant/w4a4.yaml + conf/method/dilatequant.yaml;
    # a test checks that they agree); num_steps / num_groups come from the sampler there.
    weight_bits: int = 4
    act_bits: int = 4
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    modulation_bits: int | None = 8
    attn_bits: int | None = None
    softmax_bits: int = 8
    quantize_attention: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    weight_dilation: bool = True
    dilation_max_scale: float | None = None
    num_steps: int = 25
    num_groups: int = 25
    split_skip: bool = True
    act_init: str = "mse"
    act_percentile: float = 99.99
    weight_init: str = "minmax"
    lsq_grad_scale: bool = False
    weight_zero_point: str = "learned"
    act_granularity: str = "tensor"
    attn_granularity: str = "tensor"
    promote_layers: tuple[str, ...] = ()
    promote_bits: int = 8
    rotation: bool = False
    rotation_block: int = 128
    lowrank_rank: int = 0
    lowrank_mode: str = "keep"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # tuples keep the config hashable and comparable after a JSON round trip (which gives lists)
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "promote_layers", tuple(self.promote_layers))
        for name in ("weight_bits", "act_bits", "softmax_bits", "first_layer_bits", "last_layer_bits",
                     "modulation_bits", "attn_bits", "promote_bits"):
            value = getattr(self, name)
            if value is None and name not in ("weight_bits", "act_bits", "softmax_bits"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
                raise UserError(f"QuantConfig.{name} must be an int in [2, 16], got {value!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise UserError(f"QuantConfig.num_steps must be a positive int, got {self.num_steps!r}")
        if not isinstance(self.num_groups, int) or not 1 <= self.num_groups <= self.num_steps:
            raise UserError(
                f"QuantConfig.num_groups must be an int in [1, num_steps={self.num_steps}], got {self.num_groups!r}"
            )
        if self.dilation_max_scale is not None and not self.dilation_max_scale >= 1.0:
            raise UserError(f"QuantConfig.dilation_max_scale must be >= 1 or None, got {self.dilation_max_scale!r}")
        if self.act_init not in ACT_INIT_METHODS:
            raise UserError(f"QuantConfig.act_init must be one of {ACT_INIT_METHODS}, got {self.act_init!r}")
        if self.weight_init not in WEIGHT_INIT_METHODS:
            raise UserError(f"QuantConfig.weight_init must be one of {WEIGHT_INIT_METHODS}, got {self.weight_init!r}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise UserError(f"QuantConfig.act_percentile must be in (50, 100], got {self.act_percentile!r}")
        for name in ("act_granularity", "attn_granularity"):
            if getattr(self, name) not in ACT_GRANULARITIES:
                raise UserError(f"QuantConfig.{name} must be one of {ACT_GRANULARITIES} (train.py's 'auto' is resolved "
                                f"by the denoiser before this), got {getattr(self, name)!r}")
        if not isinstance(self.rotation, bool):
            raise UserError(f"QuantConfig.rotation must be true or false, got {self.rotation!r}")
        if (isinstance(self.rotation_block, bool) or not isinstance(self.rotation_block, int)
                or self.rotation_block < 2 or self.rotation_block & (self.rotation_block - 1)):
            raise UserError(f"QuantConfig.rotation_block must be a power of two >= 2, got {self.rotation_block!r}")
        if isinstance(self.lowrank_rank, bool) or not isinstance(self.lowrank_rank, int) or self.lowrank_rank < 0:
            raise UserError(f"QuantConfig.lowrank_rank must be an int >= 0 (0: no branch), got {self.lowrank_rank!r}")
        if self.weight_zero_point not in ("learned", "centred"):
            raise UserError(f"QuantConfig.weight_zero_point must be 'learned' or 'centred', got {self.weight_zero_point!r}")
        if self.lowrank_mode not in LOWRANK_MODES:
            raise UserError(f"QuantConfig.lowrank_mode must be one of {LOWRANK_MODES}, got {self.lowrank_mode!r}")
        if not self.include:
            raise UserError("QuantConfig.include must hold at least one pattern ('*' quantizes every layer)")
        for pattern in (*self.include, *self.exclude, *self.promote_layers):
            if not isinstance(pattern, str) or not pattern:
                raise UserError(f"QuantConfig include, exclude and promote_layers patterns must be non-empty strings, got {pattern!r}")

    @property
    def qkv_bits(self) -> int:
        return self.attn_bits if self.attn_bits is not None else self.act_bits

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["promote_layers"] = list(self.promote_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Build from a plain mapping (JSON, YAML, OmegaConf container); unknown keys are an error."""
        return cls(**known_fields(cls, data, "QuantConfig field(s)"))

    def diff(self, other: QuantConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: {name: (self's, other's)}."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
