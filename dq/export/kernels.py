"""Integer convolution and matrix-product kernels: uint8 activation codes × int8 weights → int32 sums,
rescaled once (Δx·Δw) before the bias.

Two backends compute the same thing here (`dq.export.backends` registers them, and the GPU ones):
- `onednn` (CPU): `torch.ops.onednn.qconv_pointwise.tensor` (linears as 1×1 convolutions), which takes the
  activation scale and zero point as *runtime tensors* (so each call can use its own TPQ row) and folds the
  zero point in exactly, padding included. Activations run channels-last, as the kernel wants them. It has
  shapes for torch.compile, which packs the weights once (`dq.export.compiled`).
- `gemm` (CUDA, and CPU for reference): im2col + `torch._int_mm` (int8 × int8 → int32).

Both see weights as W8 = (q_w − z_w) − c with a per-output-channel shift c chosen so that W8 fits int8
(c = 0 for ≤ 7-bit weights; 8-bit rows whose codes span past int8 get c ≠ 0); the shifted part is added back
exactly through a window sum of the activation codes:

    Σ (q_x − z_x)(q_w − z_w) = Σ (q_x − z_x)·W8 + c · Σ (q_x − z_x)

CPUs without VNNI (AVX2-only or AVX-512 without VNNI) multiply uint8 × int8 with `vpmaddubsw`, which adds
each pair of products into a *saturating* int16: 8-bit codes (up to 255) against weights past ±64 overflow
it, and the sums come out wrong (seen with oneDNN capped to AVX2 or AVX512_CORE: the embedded W4A4 export
fell from 50 to 25 dB PSNR against its fake-quant student). `int8_products_saturate` probes the kernels once
for this; where they saturate, a weight that could overflow runs as two planes W8 = 16·hi + lo
(hi ∈ [−8, 7], lo ∈ [0, 15]), which cannot, and the two sums are added back (exact in int32 for `gemm`,
one float rounding for `onednn`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import UserError


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise")


def _register_prepack_shape() -> None:
    """The shape of oneDNN's conv weight prepacking for torch.compile's tracing (torch ships none: Inductor's own
    quantization passes insert the op after tracing). Traced on constant int8 weights, it is folded into packed
    constants when the graph is frozen, so a compiled integer model packs its weights once."""
    def conv_shape(weight, w_scales, x_scale, x_zp, stride, padding, dilation, groups, x_shape=None):
        return torch.empty_like(weight)

    with contextlib.suppress(RuntimeError):  # a later torch that registers its own
        torch.library.register_fake("onednn::qconv_prepack")(conv_shape)


if onednn_available():
    _register_prepack_shape()


def shift_to_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 int8, c int32 [O]) with weight = W8 + c per output row; weight: integer [O, ...] whose rows span
    at most 255 values (q_w − z_w of a ≤ 8-bit grid). c = 0 for rows already inside [−128, 127]."""
    flat = weight.reshape(weight.shape[0], -1).to(torch.int32)
    hi, lo = flat.amax(dim=1), flat.amin(dim=1)
    if bool((hi - lo > 255).any()):
        raise UserError("integer weights span more than 255 values in a row: only ≤ 8-bit weights run in int8")
    shift = torch.where(hi > 127, hi - 127, torch.where(lo < -128, lo + 128, torch.zeros_like(hi)))
    w8 = (flat - shift[:, None]).to(torch.int8).reshape(weight.shape)
    return w8, shift


INT16_MAX = 32767


@functools.cache
def int8_products_saturate(backend: str) -> bool:
    """Whether this CPU's `backend` kernels add uint8 × int8 product pairs into a saturating int16 (no
    VNNI): one worst-case product (codes 255 against weights 127) checked against its exact sum."""
    if backend == "onednn":
        weight = torch.full((32, 32, 3, 3), 127, dtype=torch.int8)
        ones = torch.ones(32)
        packed = torch.ops.onednn.qconv_prepack(weight, ones, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
        codes = torch.full((1, 32, 4, 4), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        zero = torch.zeros(32, dtype=torch.int64)
        out = torch.ops.onednn.qconv_pointwise.tensor(
            codes, torch.tensor(1.0), torch.tensor(0), packed, ones, zero, None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
            torch.float32, "none", [], "",
        )
        # linears run as 1×1 convolutions over their rows (IntLinearKernel): probe that shape too
        packed_rows = torch.ops.onednn.qconv_prepack(torch.full((32, 64, 1, 1), 127, dtype=torch.int8), ones, 1.0, 0,
                                                     [1, 1], [0, 0], [1, 1], 1, None)
        rows = torch.full((16, 64, 1, 1), 255, dtype=torch.uint8)
        linear = torch.ops.onednn.qconv_pointwise.tensor(
            rows, torch.tensor(1.0), torch.tensor(0), packed_rows, ones, zero, None, [1, 1], [0, 0], [1, 1], 1, 1.0,
            0, torch.float32, "none", [], "",
        )
        return not (bool((out == 32 * 9 * 255 * 127).all()) and bool((linear == 64 * 255 * 127).all()))
    centred = torch.full((32, 64), 127, dtype=torch.int8)  # the code 255, centred on 128
    acc = torch._int_mm(centred, torch.full((32, 64), 127, dtype=torch.int8).t())
    return not bool((acc == 64 * 127 * 127).all())


def weight_planes(w8: torch.Tensor, act_bits: int, backend: str) -> list[tuple[torch.Tensor, int]]:
    """[(W8, 1)], or [(hi, 16), (lo, 1)] with W8 = 16·hi + lo where this CPU's kernels saturate int16 pairs
    and 2·(2^act_bits − 1)·max|W8| could overflow them."""
    if 2 * (2**act_bits - 1) * int(w8.to(torch.int16).abs().amax()) <= INT16_MAX or not int8_products_saturate(backend):
        return [(w8, 1)]
    hi = torch.div(w8.to(torch.int16), 16, rounding_mode="floor")
    lo = w8.to(torch.int16) - 16 * hi
    return [(hi.to(torch.int8), 16), (lo.to(torch.int8), 1)]


def _window_sum_conv(codes: torch.Tensor, zero_point: torch.Tensor, kernel: tuple[int, int], stride, padding,
                     dilation) -> torch.Tensor:
    """Σ over each conv window and every input channel of (q_x − z_x), float [B, 1, H', W'] (exact: integers
    far below 2^24); zero padding of (q_x − z_x) is the code z_x, as in the main product."""
    centred = codes.float().sum(dim=1, keepdim=True) - zero_point.float() * codes.shape[1]
    ones = torch.ones(1, 1, *kernel, dtype=centred.dtype, device=centred.device)
    return F.conv2d(centred, ones, None, stride, padding, dilation)


def _prepack_conv(plane: torch.Tensor, scale: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """oneDNN's packed int8 conv weight for activations with a zero point: packed for a nonzero one (its value
    is given at run time), the weight carries the zero-point compensation. Packed for zero point 0, oneDNN
    re-laid the weight out on every call with a nonzero one (18% of the convolutions' time, ddpm-cifar10)."""
    return torch.ops.onednn.qconv_prepack(plane.contiguous(), scale, 1.0, 1, list(stride), list(padding),
                                          list(dilation), 1, None)


class _IntKernel(nn.Module):
    """What the conv and linear kernels share: the weight planes (one, or two where int16 pairs saturate),
    and moving their prepared weights to a device.

    A module so that torch.compile sees its tensors as buffers (constants of a frozen graph), not part of the
    state_dict (the export file is the integer model's identity); casts and moves of the layer that holds it
    leave it alone but for `move_to`, which rebuilds its weights for a device."""

    backend: str
    takes_float = False  # these take the uint8 codes (dq.export.backends: a backend may take the float input)

    def _init_planes(self, w8: torch.Tensor, shift: torch.Tensor, weight_scale: torch.Tensor, act_bits: int) -> None:
        self.out_channels = w8.shape[0]
        self.act_bits, self.weight_count = act_bits, w8.numel()
        self.register_buffer("weight_scale", weight_scale.float().contiguous(), persistent=False)
        self.register_buffer("shift", shift if bool(shift.any()) else None, persistent=False)
        self.register_buffer("w_zero", torch.zeros(self.out_channels, dtype=torch.int64, device=w8.device),
                             persistent=False)
        if self.backend == "onednn":
            planes = weight_planes(w8, act_bits, self.backend)
            self.factors = [factor for _, factor in planes]
            for j, (plane, factor) in enumerate(planes):
                self.register_buffer(f"plane{j}", plane.contiguous(), persistent=False)
                self.register_buffer(f"plane_scale{j}", self.weight_scale * factor, persistent=False)  # ×16: exact
            self._packed: list[torch.Tensor] | None = None  # packed for eager calls, on the first one
        else:
            self._set_gemm_planes(_gemm_matrix(w8.reshape(self.out_channels, -1)), w8.device)

    @property
    def unregistered_bytes(self) -> int:
        """int8 weights in memory that are not among the module's buffers, one byte a weight and plane: the GEMM
        matrices, or the planes packed for oneDNN (by the first eager call, or as constants of a compiled
        graph): a oneDNN integer model holds its weights twice, plain and packed."""
        return self.weight_count * len(self.factors)

    def _set_gemm_planes(self, matrix: torch.Tensor, device: torch.device) -> None:
        """The GEMM matrices [N_pad, K_pad] of the whole W8 on `device`: two planes only on a CPU whose
        int8 products saturate (CUDA's int8 GEMM accumulates in int32)."""
        planes = weight_planes(matrix, self.act_bits, self.backend) if device.type == "cpu" else [(matrix, 1)]
        self.factors = [factor for _, factor in planes]
        self.matrix = [plane.to(device) for plane, _ in planes]
        self.colsum = [plane[: self.out_channels].sum(dim=1, dtype=torch.int32).to(device) for plane, _ in planes]

    @property
    def planes(self) -> list[torch.Tensor]:
        return [getattr(self, f"plane{j}") for j in range(len(self.factors))]

    @property
    def plane_scales(self) -> list[torch.Tensor]:
        """Δw of each plane (×16 for a high plane)."""
        return [getattr(self, f"plane_scale{j}") for j in range(len(self.factors))]

    def _prepack(self, plane: torch.Tensor, scale: torch.Tensor):
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        return self  # only move_to changes a kernel's weights

    def _packed_planes(self) -> list[torch.Tensor]:
        """The planes in oneDNN's layout. Under torch.compile the packing is traced on the plain planes (constants
        that a frozen graph folds); eager calls pack once and keep them."""
        if torch.compiler.is_compiling():
            return [self._prepack(plane, scale) for plane, scale in zip(self.planes, self.plane_scales)]
        if self._packed is None:
            self._packed = [self._prepack(plane, scale) for plane, scale in zip(self.planes, self.plane_scales)]
        return self._packed

    def _onednn_sum(self, run, bias: torch.Tensor | None) -> torch.Tensor:
        """onednn: run(packed, Δw of the plane, bias or None) over the planes, added (the bias once)."""
        out = None
        for packed, scale in zip(self._packed_planes(), self.plane_scales):
            part = run(packed, scale, bias if out is None else None)
            out = part if out is None else out + part
        return out

    def _int_sums(self, rows: torch.Tensor, x_zero_point: torch.Tensor) -> torch.Tensor:
        """gemm: Σ (q_x − z_x)·W8 as int32 [M, O] over the planes (16·hi + lo, exact in int32)."""
        acc = None
        for matrix, colsum, factor in zip(self.matrix, self.colsum, self.factors):
            part = _int_mm_centred(rows, x_zero_point, matrix, colsum, self.out_channels)
            part = part if factor == 1 else part * factor
            acc = part if acc is None else acc + part
        return acc

    def move_to(self, device: torch.device) -> _IntKernel:
        if self.backend == "onednn":
            if device.type != "cpu":
                raise UserError("the onednn integer backend runs on the CPU only; load the export with backend=gemm")
            return self
        whole = self.matrix[0] if len(self.matrix) == 1 else self.matrix[0] * 16 + self.matrix[1]  # exact in int8
        self._set_gemm_planes(whole.cpu(), device)
        self.weight_scale, self.w_zero = self.weight_scale.to(device), self.w_zero.to(device)  # buffers: reassigned
        if self.shift is not None:
            self.shift = self.shift.to(device)
        return self


class IntConvKernel(_IntKernel):
    """One integer Conv2d (one input-channel part of it): W8 [O, C, kh, kw], Δw [O], shift c [O]; act_bits:
    the widest activation codes it will see (decides whether saturating CPUs need two weight planes)."""

    def __init__(self, w8: torch.Tensor, shift: torch.Tensor, weight_scale: torch.Tensor, stride, padding,
                 dilation, backend: str, act_bits: int = 8) -> None:
        super().__init__()
        self.backend = backend
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.kernel = tuple(w8.shape[2:])
        self.in_channels = w8.shape[1]
        self._init_planes(w8, shift, weight_scale, act_bits)

    def _prepack(self, plane, scale):
        return _prepack_conv(plane, scale, self.stride, self.padding, self.dilation)

    def forward(self, codes: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """codes uint8 [B, C, H, W] (channels-last preferred); x_scale float 0-dim; x_zero_point int 0-dim.
        Returns out_dtype (float32 or bfloat16) [B, O, H', W'] = Δx·Δw·Σ(q_x − z_x)(q_w − z_w) + bias, scaled
        and biased in float32 and rounded once to out_dtype."""
        if self.backend == "onednn":
            codes_cl = codes.contiguous(memory_format=torch.channels_last)
            dtype = out_dtype if self.shift is None else torch.float32  # the correction is added in float32
            out = self._onednn_sum(lambda packed, scale, b: torch.ops.onednn.qconv_pointwise.tensor(
                codes_cl, x_scale, x_zero_point, packed, scale, self.w_zero, b, self.stride, self.padding,
                self.dilation, 1, 1.0, 0, dtype, "none", [], "",
            ), bias)
        else:
            out = self._gemm(codes, x_scale, x_zero_point, bias)
        if self.shift is not None:
            window = _window_sum_conv(codes, x_zero_point, self.kernel, self.stride, self.padding, self.dilation)
            out = out + window * (x_scale * self.weight_scale * self.shift).view(1, -1, 1, 1)
        return out.to(out_dtype)

    def _gemm(self, codes, x_scale, x_zero_point, bias):
        batch = codes.shape[0]
        padded = _pad_codes(codes, self.padding, x_zero_point)
        rows_h, rows_w = conv_output_size(*codes.shape[2:], self.kernel, self.stride, self.padding, self.dilation)
        cols = _im2col(padded, self.kernel, self.stride, self.dilation, rows_h, rows_w)  # [B·H'·W', C·kh·kw]
        out = self._int_sums(cols, x_zero_point).float() * (x_scale * self.weight_scale)
        if bias is not None:
            out = out + bias
        return out.view(batch, rows_h, rows_w, self.out_channels).permute(0, 3, 1, 2)


class IntLinearKernel(_IntKernel):
    """One integer Linear: W8 [O, C], Δw [O], shift c [O]; act_bits as for `IntConvKernel`."""

    def __init__(self, w8: torch.Tensor, shift: torch.Tensor, weight_scale: torch.Tensor, backend: str,
                 act_bits: int = 8) -> None:
        super().__init__()
        self.backend = backend
        self._init_planes(w8, shift, weight_scale, act_bits)

    def _prepack(self, plane, scale):  # as a 1×1 convolution's weight (see forward)
        return _prepack_conv(plane[:, :, None, None], scale, [1, 1], [0, 0], [1, 1])

    def forward(self, codes: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """codes uint8 [..., C] → out_dtype [..., O] = Δx·Δw·Σ(q_x − z_x)(q_w − z_w) + bias (as for conv)."""
        lead = codes.shape[:-1]
        flat = codes.reshape(-1, codes.shape[-1])
        if self.backend == "onednn":
            # a 1×1 convolution over M "pixels": the same integer product as oneDNN's linear, and Inductor's
            # fusion of a following add into the linear's sum post-op (which gave wrong whole-model results
            # under torch.compile, torch 2.13) does not apply to it
            pixels = flat.contiguous()[:, :, None, None]
            dtype = out_dtype if self.shift is None else torch.float32
            out = self._onednn_sum(lambda packed, scale, b: torch.ops.onednn.qconv_pointwise.tensor(
                pixels, x_scale, x_zero_point, packed, scale, self.w_zero, b, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
                dtype, "none", [], "",
            ), bias).reshape(flat.shape[0], self.out_channels)
        else:
            out = self._int_sums(flat, x_zero_point).float() * (x_scale * self.weight_scale)
            if bias is not None:
                out = out + bias
        if self.shift is not None:
            rowsum = flat.float().sum(dim=1, keepdim=True) - x_zero_point.float() * flat.shape[1]
            out = out + rowsum * (x_scale * self.weight_scale * self.shift)
        return out.to(out_dtype).reshape(*lead, self.out_channels)


# ------------------------------------------------------------------------------------ gemm helpers


def conv_output_size(height: int, width: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(H', W') of a zero-padded convolution."""
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip((height, width), kernel, stride, padding, dilation))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _gemm_matrix(w8: torch.Tensor) -> torch.Tensor:
    """W8 [O, K] → int8 [N_pad, K_pad], rows = output channels (K and O padded with zeros to multiples of 8,
    as CUDA's _int_mm needs); the product takes its transpose, the layout cuBLASLt's int8 GEMM supports."""
    out_channels, k = w8.shape
    matrix = torch.zeros(_round_up(out_channels, 8), _round_up(k, 8), dtype=torch.int8, device=w8.device)
    matrix[:out_channels, :k] = w8
    return matrix


def _pad_codes(codes: torch.Tensor, padding, zero_point: torch.Tensor) -> torch.Tensor:
    """Pad uint8 codes [B, C, H, W] with the zero point's code (the real value 0), as zero padding is."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return codes
    padded = codes.new_empty(codes.shape[0], codes.shape[1], codes.shape[2] + 2 * ph, codes.shape[3] + 2 * pw)
    padded.copy_(zero_point.to(codes.dtype).expand_as(padded))
    padded[:, :, ph : ph + codes.shape[2], pw : pw + codes.shape[3]] = codes
    return padded


def _im2col(x: torch.Tensor, kernel, stride, dilation, rows_h: int, rows_w: int) -> torch.Tensor:
    """[B, C, H, W] (any dtype) → [B·H'·W', C·kh·kw], columns ordered (c, i, j) like a conv weight's."""
    kh, kw = kernel
    dh, dw = dilation
    windows = x.unfold(2, dh * (kh - 1) + 1, stride[0]).unfold(3, dw * (kw - 1) + 1, stride[1])
    windows = windows[..., ::dh, ::dw][:, :, :rows_h, :rows_w]  # [B, C, H', W', kh, kw]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


def _int_mm_centred(codes: torch.Tensor, zero_point: torch.Tensor, matrix: torch.Tensor, colsum: torch.Tensor,
                    out_channels: int) -> torch.Tensor:
    """Σ_k (q_x − z_x)[m, k] · W8[k, o] as int32 [M, O], through int8 × int8 → int32.

    The codes are centred on 128 (so any ≤ 8-bit code fits int8) and the (128 − z_x)·colsum(W8) term is
    added back; M, K are padded as CUDA's _int_mm needs (M > 16; M, K multiples of 8)."""
    m, k = codes.shape
    centred = (codes.to(torch.int16) - 128).to(torch.int8)
    pad_m = max(32, _round_up(m, 8)) - m
    if pad_m or matrix.shape[1] != k:
        centred = F.pad(centred, (0, matrix.shape[1] - k, 0, pad_m))
    acc = torch._int_mm(centred, matrix.t())[:m, :out_channels]
    return acc + (128 - zero_point.to(torch.int32)) * colsum
