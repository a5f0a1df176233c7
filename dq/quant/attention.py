"""Quantized attention: processors for diffusers' attention modules whose matmul inputs (q, k, v and the softmax
output) are fake-quantized with TPQ tables. Torch only: a processor receives the diffusers module as `attn` at
call time and reads its projections, norms and head split from it, so nothing here imports diffusers; which
modules of a model get one is the architecture description's business (dq.arch).

softmax(q kᵀ) v runs in chunks of queries whose fp32 scores fit a byte budget (`chunk_mb`, docs/memory.md), and
when gradients are needed each chunk is recomputed in the backward pass (torch.utils.checkpoint), so training
holds one chunk's scores at a time instead of the whole [B·heads, L_q, L_k] matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dq.errors import UserError
from dq.quant.config import QuantConfig
from dq.quant.layers import new_act_quantizer
from dq.quant.quantizers import StepIndexed

# the default budget of one chunk's fp32 attention scores; SD's 64x64 level at batch 32 (8 heads, 4,096 keys:
# 4 MiB a query row) then runs 64 queries a chunk
DEFAULT_ATTENTION_CHUNK_MB = 256.0


def query_chunk_rows(key: torch.Tensor, chunk_mb: float | None) -> int | None:
    """How many queries one chunk takes so that its fp32 scores [..., rows, L_k] fit chunk_mb MiB (at least
    one); None (no tiling) for chunk_mb None. key: [..., L_k, d]."""
    if chunk_mb is None:
        return None
    row_bytes = key[..., 0].numel() * 4  # one query's fp32 scores over every key, for every batch·head
    return max(1, int(chunk_mb * 2**20) // row_bytes)


@contextlib.contextmanager
def _step_of(quantizer: nn.Module, step) -> Iterator[None]:
    """Run with `quantizer`'s sampling step as it was in the forward pass: a chunk recomputed in backward runs
    after the caller's step_context has cleared it."""
    if not isinstance(quantizer, StepIndexed) or quantizer.step is step:
        yield
        return
    current, quantizer.step = quantizer.step, step
    try:
        yield
    finally:
        quantizer.step = current


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, probs_quantizer: nn.Module,
           mask: torch.Tensor | None = None, chunk_mb: float | None = DEFAULT_ATTENTION_CHUNK_MB) -> torch.Tensor:
    """probs_quantizer(softmax(q kᵀ · scale + mask)) v, tiled over queries; q [..., L_q, d], k [..., L_k, d],
    v [..., L_k, d_v], mask broadcastable to [..., L_q, L_k]; returns [..., L_q, d_v].

    Exact by construction: softmax is per query row, and the probabilities' quantizer is per tensor (one Δ, z
    per step for the whole tensor, whatever slice it sees; its LSQ gradient scale is given the whole tensor's
    size; an observer reduces min/max exactly over chunks). chunk_mb None: one chunk. A quantizer that drops
    elements at random (activation drop) runs on one chunk, so that its mask is drawn once, as untiled."""
    rows = query_chunk_rows(key, chunk_mb)
    if rows is None or rows >= query.shape[-2] or getattr(probs_quantizer, "drop_prob", 0.0) > 0.0:
        rows = query.shape[-2]
    quantize = probs_quantizer
    if getattr(probs_quantizer, "lsq_grad_scale", False):
        per_sample = query.shape[-2] * key.shape[-2]  # the elements of one [L_q, L_k] sample, chunks or not
        quantize = lambda probs: probs_quantizer(probs, numel_per_sample=per_sample)  # noqa: E731
    step = getattr(probs_quantizer, "step", None)

    def chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if m is not None:
            scores = scores + m
        with _step_of(probs_quantizer, step):
            probs = quantize(scores.float().softmax(dim=-1).to(v.dtype))
        return torch.matmul(probs, v)

    if rows == query.shape[-2]:
        return chunk(query, key, value, mask)
    # recompute in backward only where a gradient flows and no observer records its input (it would see it twice)
    recompute = torch.is_grad_enabled() and not getattr(probs_quantizer, "observing", False)
    outputs = []
    for start in range(0, query.shape[-2], rows):
        q = query[..., start:start + rows, :]
        m = mask[..., start:start + rows, :] if mask is not None and mask.shape[-2] > 1 else mask
        if recompute:
            outputs.append(checkpoint(chunk, q, key, value, m, use_reentrant=False))
        else:
            outputs.append(chunk(q, key, value, m))
    return torch.cat(outputs, dim=-2)


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

    q, k, v are quantized at `qkv_bits` (per tensor, TPQ tables; q and k per token under
    config.attn_granularity "token") and the softmax output at `softmax_bits`;
    the projections to_q/to_k/to_v/to_out are QuantLinear layers set by the converter. Being an nn.Module
    assigned to `attn.processor`, its quantizers live in the model's state_dict. chunk_mb: the byte budget of
    one query chunk's fp32 scores (`attend`; None: untiled), a memory setting, not part of the student's recipe
    (set it on a whole model with `set_attention_chunk`).
    """

    chunk_mb: float | None = DEFAULT_ATTENTION_CHUNK_MB

    def __init__(self, qkv_bits: int, softmax_bits: int, config: QuantConfig) -> None:
        super().__init__()
        per_token = config.attn_granularity == "token"  # q kᵀ keeps its integer form: per-row scales factor out
        self.q_quantizer = new_act_quantizer(qkv_bits, config, per_token)
        self.k_quantizer = new_act_quantizer(qkv_bits, config, per_token)
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

        out = attend(query, key, value, attn.scale, self.probs_quantizer, attention_mask, self.chunk_mb)
        hidden_states = attn.batch_to_head_dim(out)

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
        return attend(query, key, value, query.shape[-1] ** -0.5, self.probs_quantizer, None, self.chunk_mb)

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


def set_attention_chunk(model: nn.Module, chunk_mb: float | None) -> None:
    """Give every quantized attention processor of `model` this query-chunk budget (MiB of fp32 scores; None:
    untiled). Results do not depend on it (`attend`); memory does."""
    if chunk_mb is not None and (isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float))
                                 or not chunk_mb > 0):
        raise UserError(f"the attention chunk budget must be a positive number of MiB or None, got {chunk_mb!r}")
    for module in model.modules():
        if isinstance(module, QuantAttnProcessor):
            module.chunk_mb = None if chunk_mb is None else float(chunk_mb)
