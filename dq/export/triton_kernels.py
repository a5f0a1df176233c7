"""Triton kernels of the integer runtime: one implicit-GEMM kernel that quantizes the float input as it loads
it and multiplies the codes in int8 with int32 sums (convolutions, and linears as 1×1 convolutions over rows).

For each output pixel m = (b, h', w') and output channel n, over k = (c, i, j) of the window:

    q = clamp(round((x / s_c) / Δx) + z, 0, 2^b − 1)        (x = 0 outside the image: zero padding, q = z)
    Σ_k (q − z)·W8[n, k] = Σ_k (q − 128)·W8[n, k] + (128 − z)·colsum(W8)[n]
    out[m, n] = Δx·Δw[n] · (that sum + c[n]·Σ_k (q − z)) + bias[n]

(q − 128) fits int8 for any ≤ 8-bit code, so the product is one int8 × int8 → int32 `tl.dot`; c is the
per-row shift of 8-bit weights whose codes span past int8 (`dq.export.kernels.shift_to_int8`), added here in
int32. The quantization divides and rounds half-to-even exactly as the float quantizer does (correctly
rounded division, ties to even), so the codes are the fake-quant student's. The scale and zero point are
read from device tensors, never from the host: a forward is capturable by CUDA graphs.

On CUDA the kernel is compiled; on the CPU it runs in Triton's interpreter (slowly: for tests), which
TRITON_INTERPRET=1 turns on, set before triton is first imported, which is when torch is (its own functions are
built for one or the other): `TRITON_INTERPRET=1 python ...`.
"""

from __future__ import annotations

import functools

import torch

from dq.export.kernels import conv_output_size

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton backend is then unusable (dq.export.backends says why)
    triton = tl = None


def triton_importable() -> bool:
    return triton is not None


def _implicit_gemm(x_ptr, wd_ptr, scale_ptr, zero_ptr, w_ptr, colsum_ptr, shift_ptr, wscale_ptr, bias_ptr, out_ptr,
                   M, N, K, W_STRIDE, H, W, OH, OW,
                   sxb, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   QMAX: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_WD: tl.constexpr,
                   HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    b = rm // (OH * OW)
    top = (rm // OW) % OH * stride_h - pad_h
    left = rm % OW * stride_w - pad_w
    scale = tl.load(scale_ptr)
    zero = tl.load(zero_ptr)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    rowsum = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        c = rk // (KH * KW)
        ih = top[:, None] + ((rk // KW) % KH)[None, :] * dil_h
        iw = left[:, None] + (rk % KW)[None, :] * dil_w
        valid = m_ok[:, None] & k_ok[None, :]
        inside = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_ptr + b[:, None] * sxb + c[None, :] * sxc + ih * sxh + iw * sxw, mask=inside, other=0.0)
        x = x.to(tl.float32)
        if HAS_WD:
            x = tl.math.div_rn(x, tl.load(wd_ptr + c, mask=k_ok, other=1.0)[None, :])
        v = tl.math.div_rn(x, scale)
        low = tl.math.floor(v)
        frac = v - low
        odd = (low - 2.0 * tl.math.floor(low * 0.5)) != 0.0
        q = low + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)  # round half to even
        q = tl.minimum(tl.maximum(q + zero, 0.0), QMAX)
        q = tl.where(valid, q, 128.0)  # outside the matrix: a centred 0
        w = tl.load(w_ptr + rn[None, :] * W_STRIDE + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc += tl.dot((q - 128.0).to(tl.int8), w)
        if HAS_SHIFT:
            rowsum += tl.sum(tl.where(valid, q - zero, 0.0), axis=1)  # |Σ| ≤ K·255: exact in float32 below 2^24
    colsum = tl.load(colsum_ptr + rn, mask=n_ok, other=0)
    total = acc + (128 - zero.to(tl.int32)) * colsum[None, :]
    if HAS_SHIFT:
        total += rowsum.to(tl.int32)[:, None] * tl.load(shift_ptr + rn, mask=n_ok, other=0)[None, :]
    out = out_ptr + rm[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if INT_OUT:
        tl.store(out, total, mask=mask)
    else:
        y = total.to(tl.float32) * (scale * tl.load(wscale_ptr + rn, mask=n_ok, other=0.0))[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(out, y, mask=mask)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: on CPU tensors, and then on no GPU in this process. Decided
    by TRITON_INTERPRET=1 when triton was first imported (importing torch imports it), not by the variable now."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@functools.cache
def _kernel():
    """The kernel: compiled for CUDA, or interpreted (CPU tensors) under TRITON_INTERPRET=1."""
    return triton.jit(_implicit_gemm)


def implicit_gemm(x: torch.Tensor, wd: torch.Tensor | None, x_scale: torch.Tensor, x_zero: torch.Tensor,
                  matrix: torch.Tensor, colsum: torch.Tensor, shift: torch.Tensor | None, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, qmax: int, geometry: tuple, int_out: bool = False) -> torch.Tensor:
    """out [B·H'·W', N] (rows ordered b, h', w'): float32, or the int32 sums Σ(q − z)(q_w − z_w) with int_out.

    x: float [B, C, H, W] (any strides; a linear's rows as [M, K, 1, 1]); wd: WD's s [C] or None; x_scale,
    x_zero: float32 0-dim device tensors (Δx, z); matrix: int8 [N_pad ≥ N, K_pad ≥ K] rows = output channels,
    k ordered (c, i, j); colsum int32 [N]; shift int32 [N] or None; geometry: (kernel, stride, padding,
    dilation), each an (h, w) pair."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    batch, channels, height, width = x.shape
    oh, ow = conv_output_size(height, width, *geometry)
    m, n, k = batch * oh * ow, colsum.shape[0], channels * kh * kw
    out = torch.empty(m, n, dtype=torch.int32 if int_out else torch.float32, device=x.device)
    block_m, block_n, block_k = (32, 32, 32) if x.device.type == "cpu" else (64, 64, 32)
    dummy = colsum  # a pointer for absent optional tensors (never read: the constexpr flag is off)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _kernel()[grid](
        x, dummy if wd is None else wd, x_scale, x_zero, matrix, colsum, dummy if shift is None else shift,
        weight_scale, dummy if bias is None else bias, out,
        m, n, k, matrix.stride(0), height, width, oh, ow, *x.stride(), sh, sw, ph, pw, dh, dw,
        QMAX=float(qmax), KH=kh, KW=kw, HAS_WD=wd is not None, HAS_SHIFT=shift is not None,
        HAS_BIAS=bias is not None, INT_OUT=int_out, BM=block_m, BN=block_n, BK=block_k,
    )
    return out
