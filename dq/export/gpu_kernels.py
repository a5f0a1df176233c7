"""The GPU backends' kernels (`dq.export.backends`): `triton` (the implicit-GEMM kernel of
`dq.export.triton_kernels`, quantization fused) and `fp8` (centred ≤ 4-bit codes through `torch._scaled_mm`).
Both also run on CPU tensors (Triton's interpreter; the CPU's `_scaled_mm`), where the tests check them
against the int64 reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dq.export import triton_kernels
from dq.export.kernels import IntConvKernel, IntLinearKernel, _round_up, conv_output_size


class _SinglePlane:
    """Both backends sum in int32 (Triton) or exactly in float32 (fp8): one weight plane, no saturation."""

    out_channels: int

    def _set_gemm_planes(self, matrix: torch.Tensor, device: torch.device) -> None:
        self.factors = [1]
        self.matrix = [matrix.to(device)]
        self.colsum = [matrix[: self.out_channels].sum(dim=1, dtype=torch.int32).to(device)]
        self._prepare(device)

    def _prepare(self, device: torch.device) -> None:
        pass


class TritonConvKernel(_SinglePlane, IntConvKernel):
    """A Conv2d on its float input: quantize, int8 product and rescale in one Triton kernel."""

    takes_float = True

    def forward(self, x: torch.Tensor, wd: torch.Tensor | None, x_scale: torch.Tensor, x_zero: torch.Tensor,
                qmax: int, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = self.rows(x, wd, x_scale, x_zero, qmax, bias)
        height, width = conv_output_size(*x.shape[2:], self.kernel, self.stride, self.padding, self.dilation)
        return rows.view(x.shape[0], height, width, self.out_channels).permute(0, 3, 1, 2).to(out_dtype)

    def rows(self, x, wd, x_scale, x_zero, qmax, bias, int_out: bool = False) -> torch.Tensor:
        """[B·H'·W', O]: float32 outputs, or the exact int32 sums Σ(q − z)(q_w − z_w) with int_out."""
        return triton_kernels.implicit_gemm(
            x, wd, x_scale, x_zero, self.matrix[0], self.colsum[0], self.shift, self.weight_scale, bias, qmax,
            (self.kernel, self.stride, self.padding, self.dilation), int_out)


class TritonLinearKernel(_SinglePlane, IntLinearKernel):
    """A Linear on its float input [..., K]: a 1×1 convolution over its rows, in the same kernel."""

    takes_float = True

    def forward(self, x: torch.Tensor, wd: torch.Tensor | None, x_scale: torch.Tensor, x_zero: torch.Tensor,
                qmax: int, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(x, wd, x_scale, x_zero, qmax, bias).to(out_dtype).reshape(*x.shape[:-1], self.out_channels)

    def rows(self, x, wd, x_scale, x_zero, qmax, bias, int_out: bool = False) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return triton_kernels.implicit_gemm(
            flat[:, :, None, None], wd, x_scale, x_zero, self.matrix[0], self.colsum[0], self.shift,
            self.weight_scale, bias, qmax, ((1, 1), (1, 1), (0, 0), (1, 1)), int_out)


class _Fp8Sums(_SinglePlane):
    """Σ(q_x − z_x)·W8 through `torch._scaled_mm`: both operands are integers of at most 16 in magnitude, exact
    in e4m3, and the float32 sums are exact below 2^24 (the backend accepts only layers that stay below it and
    is usable only where a probe checked the device's sums exact)."""

    def _prepare(self, device: torch.device) -> None:
        matrix = self.matrix[0]
        padded = F.pad(matrix, (0, _round_up(matrix.shape[1], 16) - matrix.shape[1],
                                0, _round_up(matrix.shape[0], 16) - matrix.shape[0]))
        self.fp8_matrix = padded.to(torch.float32).to(torch.float8_e4m3fn)
        self.unit = torch.ones((), device=device)

    @property
    def unregistered_bytes(self) -> int:
        return 2 * self.weight_count  # the int8 matrix and its e4m3 copy

    def _int_sums(self, rows: torch.Tensor, x_zero_point: torch.Tensor) -> torch.Tensor:
        m, k = rows.shape
        centred = rows.float() - x_zero_point.float()  # |q − z| ≤ 16 (accepted layers): exact in e4m3
        centred = F.pad(centred, (0, self.fp8_matrix.shape[1] - k, 0, _round_up(m, 16) - m))
        sums = torch._scaled_mm(centred.to(torch.float8_e4m3fn), self.fp8_matrix.t(), self.unit, self.unit,
                                out_dtype=torch.float32)
        return sums[:m, : self.out_channels]


class Fp8ConvKernel(_Fp8Sums, IntConvKernel):
    """A Conv2d as im2col of its codes and one FP8 product (CUDA has no integer convolution)."""

    takes_float = False


class Fp8LinearKernel(_Fp8Sums, IntLinearKernel):
    takes_float = False
