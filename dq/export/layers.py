"""The integer runtime's modules: activation quantizers that keep the per-step TPQ tables, and Conv2d /
Linear layers that run uint8 × int8 → int32 kernels (`dq.export.kernels`).

A quantized layer of the fake-quant student computes  Δx·Δw · Σ (q_x − z_x)(q_w − z_w) + b  with
q_x = clamp(round(x / (s·Δx)) + z_x, 0, 2^b − 1) (eq. 10 with WD's 1/s); here that sum is an integer
product. The WD 1/s and the current step's 1/Δx are applied in one in-place pass chain over the input (divide, round,
shift, clamp, cast), in the fake quantizer's order so that both give the same codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import UserError
from dq.export import backends
from dq.export.kernels import shift_to_int8
from dq.quant import ops
from dq.quant.quantizers import StepBlend, StepIndexed
from dq.quant.rotation import rotate


class IntActQuantizer(StepIndexed):
    """Per-tensor activation quantizer with one (Δ, z) row per TPQ group, for inference.

    `codes(x)` gives uint8 codes for an integer layer; calling the module fake-quantizes (quantize then
    dequantize in float), for the tensors that stay float (attention's q, k, v and softmax output).
    """

    def __init__(self, bits: int, scale: torch.Tensor, zero_point: torch.Tensor, step_to_group: torch.Tensor) -> None:
        num_groups = scale.numel()
        super().__init__(step_to_group.numel(), num_groups)
        if not torch.equal(step_to_group.long(), self.step_to_group):
            self.step_to_group.copy_(step_to_group.long())
        if bits > 8:
            raise UserError(f"integer execution takes activations of at most 8 bits, got {bits}")
        self.bits = bits
        self.register_buffer("scale", scale.float().reshape(num_groups).clone())
        self.register_buffer("zero_point", zero_point.reshape(num_groups).to(torch.int32).clone())
        self.register_buffer("zero_point_float", self.zero_point.float())

    def act_span(self) -> int:
        """The largest |q − z| its codes can take over all steps."""
        return int(max(int(self.zero_point.max()), ops.qmax(self.bits) - int(self.zero_point.min())))

    def row_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Δx 0-dim, z_x int32 0-dim, z_x float 0-dim) of the current call: one step for the whole batch,
        or one interpolated step (timestep-keyed TPQ, policy "interpolate"; z rounded after blending)."""
        if isinstance(self.step, StepBlend):
            if self.step.weight.numel() != 1:
                raise UserError("the integer model runs one sampling step per call; got per-sample interpolated steps")
            scale = self.blended_rows(self.scale)[0]
            zero_point = self.blended_rows(self.zero_point_float)[0].round()
            return scale, zero_point.to(torch.int32), zero_point
        rows = self.row()
        return (self.scale.index_select(0, rows).reshape(()), self.zero_point.index_select(0, rows).reshape(()),
                self.zero_point_float.index_select(0, rows).reshape(()))

    def row(self) -> torch.Tensor:
        """The TPQ group of the current call as an int64 tensor [1] on the tables' device (one step index for
        the whole batch). Never read on the host for an int step: a per-layer device sync in every forward."""
        rows = self.group_rows()
        if rows.numel() > 1:  # per-sample step indices (not dq's sampler): they must share one group
            first = rows[:1]
            if not bool((rows == first).all()):
                raise UserError(
                    "the integer model runs one sampling step per call; got per-sample step indices of "
                    f"several TPQ groups {sorted(set(rows.tolist()))}"
                )
        return rows[:1]

    def codes(self, x: torch.Tensor, wd: torch.Tensor | None, channel_axis: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 like x, Δx 0-dim, z_x int32 0-dim) of the current step; wd: WD's s [C] or None."""
        scale, zero_point, zero_point_float = self.row_params()
        x = x.float()  # bfloat16 glue (compile_int_model): codes are computed in float32 all the same
        # (x / s) / Δx in the fake quantizer's order, so both round every value alike (ties included)
        q = x / scale if wd is None else torch.div(x, ops.channel_view(wd, x.ndim, channel_axis % x.ndim)).div_(scale)
        q.round_().add_(zero_point_float).clamp_(0, ops.qmax(self.bits))
        return q.to(torch.uint8), scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize_step(x.float(), self.scale, self.zero_point_float, self.bits).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.scale.numel()}, steps={self.num_steps}"


class IntTokenActQuantizer(StepIndexed):
    """Per-token activation quantizer for inference (`dq.quant.TokenActQuantizer`): each token's grid from its
    own min and max and the current step's clip ratio, computed as the trainable quantizer computes it, so both
    give the same codes."""

    def __init__(self, bits: int, ratio: torch.Tensor, step_to_group: torch.Tensor) -> None:
        super().__init__(step_to_group.numel(), ratio.numel())
        if not torch.equal(step_to_group.long(), self.step_to_group):
            self.step_to_group.copy_(step_to_group.long())
        if bits > 8:
            raise UserError(f"integer execution takes activations of at most 8 bits, got {bits}")
        self.bits = bits
        self.register_buffer("scale", ratio.float().reshape(-1).clone())

    def act_span(self) -> int:
        return ops.qmax(self.bits)  # z of each token lies on the grid

    def ratio(self) -> torch.Tensor:
        """The current call's clip ratio [1]: one step (or one interpolated step) for the whole batch."""
        if isinstance(self.step, StepBlend):
            if self.step.weight.numel() != 1:
                raise UserError("the integer model runs one sampling step per call; got per-sample interpolated steps")
            return self.blended_rows(self.scale)
        rows = self.group_rows()
        if rows.numel() > 1 and not bool((rows == rows[:1]).all()):
            raise UserError("the integer model runs one sampling step per call; got per-sample step indices of "
                            f"several TPQ groups {sorted(set(rows.tolist()))}")
        return self.scale.index_select(0, rows[:1])

    def codes(self, x: torch.Tensor, wd: torch.Tensor | None, channel_axis: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 like x, Δx [..., 1], z_x int32 [..., 1]) per token of x [..., C]; wd: WD's s [C] or None."""
        x = x.float()
        if wd is not None:
            x = x / ops.channel_view(wd, x.ndim, channel_axis % x.ndim)
        scale, zero_point = ops.token_qparams(x, self.ratio(), self.bits)  # the trainable quantizer's own
        q = (x / scale).round_().add_(zero_point).clamp_(0, ops.qmax(self.bits))
        return q.to(torch.uint8), scale, zero_point.to(torch.int32)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per token, groups={self.scale.numel()}, steps={self.num_steps}"


class _IntLayer(nn.Module):
    """Shared input path: one or two input-channel parts (split skip), each with its own quantizer."""

    channel_axis: int

    def _init_common(self, quantizers: list[IntActQuantizer], splits: list[int], wd_scale: torch.Tensor | None,
                     bias: torch.Tensor | None, weight_bits: int) -> None:
        self.act_quantizers = nn.ModuleList(quantizers)
        self.splits = splits  # channel counts of the parts
        self.weight_bits = weight_bits
        self.register_buffer("wd_scale", None if wd_scale is None else wd_scale.float().clone())
        self.register_buffer("bias", None if bias is None else bias.float().clone())

    def _parts(self, x: torch.Tensor):
        wd = self.wd_scale
        if len(self.splits) == 1:
            yield x, wd, self.act_quantizers[0]
            return
        start = 0
        for width, quantizer in zip(self.splits, self.act_quantizers):
            part = x.narrow(self.channel_axis % x.ndim, start, width)
            yield part, None if wd is None else wd[start : start + width], quantizer
            start += width

    def _run(self, kernel, part: torch.Tensor, wd: torch.Tensor | None, quantizer, bias, dtype) -> torch.Tensor:
        """One kernel on one input part: the codes, or the float part for a kernel that quantizes it itself."""
        if kernel.takes_float:
            scale, _, zero_point = quantizer.row_params()
            return kernel(part, wd, scale, zero_point, ops.qmax(quantizer.bits), bias, dtype)
        codes, scale, zero_point = quantizer.codes(part, wd, self.channel_axis)
        if scale.ndim:  # per token: one row of the flattened product each
            scale, zero_point = scale.reshape(-1, 1), zero_point.reshape(-1, 1)
        return kernel(codes, scale, zero_point, bias, dtype)

    @property
    def backend(self) -> str:
        """The backends its kernels run (one, or several where parts went to different ones)."""
        return "+".join(dict.fromkeys(kernel.backend for kernel in self.kernels))

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        probe = fn(torch.zeros(()))
        for kernel in self.kernels:
            kernel.move_to(probe.device)
        return module


class IntConv2d(_IntLayer):
    """Conv2d running an integer kernel on the activation codes of the current step's TPQ row."""

    channel_axis = 1

    def __init__(self, w_int: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 wd_scale: torch.Tensor | None, quantizers: list[IntActQuantizer], splits: list[int],
                 stride, padding, dilation, weight_bits: int, backend: str | tuple[str, ...]) -> None:
        """backend: a backend name, or a chain (`dq.export.backends.backend_chain`): each input part runs the
        first that accepts it."""
        super().__init__()
        self._init_common(quantizers, splits, wd_scale, bias, weight_bits)
        self.out_channels, self.in_channels = w_int.shape[0], w_int.shape[1]
        self.kernels = nn.ModuleList()
        start = 0
        taps = w_int.shape[2] * w_int.shape[3]
        for width, quantizer in zip(splits, quantizers):
            w8, shift = shift_to_int8(w_int[:, start : start + width])
            needs = backends.LayerNeeds(quantizer.act_span(), _weight_max(w8, shift), width * taps, False)
            self.kernels.append(backends.conv_kernel(backend, needs, w8, shift, weight_scale, stride, padding,
                                                     dilation, quantizer.bits))
            start += width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for (part, wd, quantizer), kernel in zip(self._parts(x), self.kernels):
            y = self._run(kernel, part, wd, quantizer, self.bias if out is None else None, x.dtype)
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, w{self.weight_bits}, parts={self.splits}, "
                f"backend={self.backend}")


class IntLinear(_IntLayer):
    """Linear running an integer kernel on the activation codes of the current step's TPQ row."""

    channel_axis = -1

    def __init__(self, w_int: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 wd_scale: torch.Tensor | None, quantizer: IntActQuantizer | IntTokenActQuantizer, weight_bits: int,
                 backend: str | tuple[str, ...], rotation_signs: torch.Tensor | None = None, rotation_block: int = 1,
                 lowrank_down: torch.Tensor | None = None, lowrank_up: torch.Tensor | None = None) -> None:
        super().__init__()
        self._init_common([quantizer], [w_int.shape[1]], wd_scale, bias, weight_bits)
        self.out_features, self.in_features = w_int.shape
        self.register_buffer("rotation_signs", None if rotation_signs is None else rotation_signs.float().clone())
        self.rotation_block = rotation_block
        # a kept low-rank branch (QuantConfig.lowrank_mode "keep"): x' Aᵀ Bᵀ in float beside the integer product
        self.register_buffer("lowrank_down", None if lowrank_down is None else lowrank_down.float().clone())
        self.register_buffer("lowrank_up", None if lowrank_up is None else lowrank_up.float().clone())
        w8, shift = shift_to_int8(w_int)
        # per-token scales are a column of the product: only backends that take a scale per row accept them
        needs = backends.LayerNeeds(quantizer.act_span(), _weight_max(w8, shift), self.in_features,
                                    isinstance(quantizer, IntTokenActQuantizer))
        self.kernels = nn.ModuleList([backends.linear_kernel(backend, needs, w8, shift, weight_scale, quantizer.bits)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wd = self.wd_scale
        if self.rotation_signs is not None or self.lowrank_down is not None:  # x' = x/s (rotated), as trained
            x = x if wd is None else x / wd
            if self.rotation_signs is not None:
                x = rotate(x, self.rotation_signs, self.rotation_block)
            wd = None
        y = self._run(self.kernels[0], x, wd, self.act_quantizers[0], self.bias, x.dtype)
        if self.lowrank_down is None:
            return y
        return y + F.linear(F.linear(x.to(self.lowrank_down.dtype), self.lowrank_down), self.lowrank_up).to(y.dtype)

    def extra_repr(self) -> str:
        rank = "" if self.lowrank_down is None else f", low rank {self.lowrank_down.shape[0]}"
        return f"{self.in_features}, {self.out_features}, w{self.weight_bits}, backend={self.backend}{rank}"


def _weight_max(w8: torch.Tensor, shift: torch.Tensor) -> int:
    """The largest |q_w − z_w| of a layer's weights (W8 + c)."""
    return int((w8.to(torch.int32) + shift.view(-1, *[1] * (w8.ndim - 1))).abs().max())
