"""Quantized attention: processors for diffusers' attention modules whose matmul inputs (q, k, v and the softmax
output) are fake-quantized with TPQ tables. Torch only: a processor receives the diffusers module as `attn` at
call time and reads its projections, norms and head split from it, so nothing here imports diffusers; which
modules of a model get one is the architecture description's business (dq.arch)."""

from __future__ import annotations

import torch
from torch import nn

from dq.errors import UserError
from dq.quant.config import QuantConfig
from dq.quant.layers import new_act_quantizer


def quantize_attention(module: nn.Module, config: QuantConfig) -> None:
    """Give a diffusers Attention module a QuantAttnProcessor (q/k/v at config.qkv_bits, the softmax output
    at config.softmax_bits), on the module's device."""
    if getattr(module, "add_k_proj", None) is not None:
        raise UserError(
            "attention with added key/value projections is not quantized by dq yet; add it to QuantConfig.exclude"
        )
    device = next(module.parameters()).device
    module.set_processor(QuantAttnProcessor(config.qkv_bits, config.softmax_bits, config).to(device))


class QuantAttnProcessor(nn.Module):
    """Attention processor for diffusers `Attention` with quantized matmul inputs.

    q, k, v are quantized at `qkv_bits` (per tensor, TPQ tables) and the softmax output at `softmax_bits`;
    the projections to_q/to_k/to_v/to_out are QuantLinear layers set by the converter. Being an nn.Module
    assigned to `attn.processor`, its quantizers live in the model's state_dict.
    """

    def __init__(self, qkv_bits: int, softmax_bits: int, config: QuantConfig) -> None:
        super().__init__()
        self.q_quantizer = new_act_quantizer(qkv_bits, config)
        self.k_quantizer = new_act_quantizer(qkv_bits, config)
        self.v_quantizer = new_act_quantizer(qkv_bits, config)
        self.probs_quantizer = new_act_quantizer(softmax_bits, config)

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


def quantize_joint_attention(module: nn.Module, config: QuantConfig) -> None:
    """Give an SD3 joint `Attention` or a Flux `FluxAttention` module a QuantJointAttnProcessor (q/k/v of both
    streams at config.qkv_bits, the softmax output at config.softmax_bits), on the module's device."""
    if getattr(module, "fused_projections", False):
        raise UserError("attention with fused qkv projections is not quantized by dq; unfuse them first")
    device = next(module.parameters()).device
    module.set_processor(QuantJointAttnProcessor(config.qkv_bits, config.softmax_bits, config).to(device))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding of x [B, L, H, d] with cos, sin [L, d], the pairs (x[2i], x[2i+1]) rotated;
    the same operations as diffusers' apply_rotary_emb(x, (cos, sin), sequence_dim=1)."""
    cos, sin = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class QuantJointAttnProcessor(QuantAttnProcessor):
    """Joint attention of SD3 (`Attention` with added q/k/v projections: image tokens, then text tokens) and
    Flux (`FluxAttention`: text tokens, then image tokens, rotary embedding; a single-stream block's has no
    added projections and no output projection), with quantized matmul inputs: q, k, v after their norms and
    the rotary embedding, one quantizer each over both streams, and the softmax output."""

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(d)) v with quantized inputs; q, k, v and the result [B, H, L, d]."""
        query, key, value = self.q_quantizer(query), self.k_quantizer(key), self.v_quantizer(value)
        scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        probs = self.probs_quantizer(scores.float().softmax(dim=-1).to(value.dtype))
        return torch.matmul(probs, value)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if attention_mask is not None:
            raise UserError("dq's quantized joint attention takes no attention mask")
        flux = type(attn).__name__ == "FluxAttention"
        batch = hidden_states.shape[0]
        heads = attn.heads

        def split(x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:  # [B, L, H·d] -> [B, L, H, d], normed
            x = x.unflatten(-1, (heads, -1))
            return norm(x) if norm is not None else x

        query = split(attn.to_q(hidden_states), attn.norm_q)
        key = split(attn.to_k(hidden_states), attn.norm_k)
        value = split(attn.to_v(hidden_states), None)
        joint = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if joint:
            context = (split(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
                       split(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
                       split(attn.add_v_proj(encoder_hidden_states), None))
            order = (lambda img, txt: (txt, img)) if flux else (lambda img, txt: (img, txt))
            query, key, value = (torch.cat(order(x, c), dim=1) for x, c in zip((query, key, value), context))
        if image_rotary_emb is not None:  # Flux: (cos, sin) [L, d] over the joint sequence
            query = apply_rotary(query, *image_rotary_emb)
            key = apply_rotary(key, *image_rotary_emb)
        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[2] * query.shape[3]).to(query.dtype)
        if not joint:  # a Flux single-stream block projects the attention output itself
            return out if flux else attn.to_out[1](attn.to_out[0](out))
        text_len = encoder_hidden_states.shape[1]
        if flux:
            text, image = out[:, :text_len], out[:, text_len:]
        else:
            image, text = out[:, : out.shape[1] - text_len], out[:, out.shape[1] - text_len:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        if not getattr(attn, "context_pre_only", False):  # SD3's last block keeps its text tokens as they are
            text = attn.to_add_out(text.contiguous())
        return image, text
