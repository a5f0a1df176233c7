"""Which kernels run an integer layer: the backends, what each declares, and how `auto` chooses.

A backend declares the device types it runs on, whether it is usable here (and if not, why) and which layers it
computes exactly; its kernels say whether they take the layer's *float* input (and quantize it inside the
kernel) or the uint8 codes (`takes_float`). Every backend computes the same integer sums Σ(q_x − z_x)(q_w − z_w); they differ only in
speed, so one model may mix them layer by layer.

| backend | devices | input | layers | `auto` |
|---|---|---|---|---|
| `onednn` | cpu | codes | per-tensor activations | on a CPU |
| `fp8` | cuda (compute capability ≥ 8.9); cpu when named | codes | \\|q_x − z_x\\|, \\|W\\| ≤ 16 (≤ 4-bit) | when named |
| `triton` | cuda; cpu under TRITON_INTERPRET=1 when named | float (quantize fused) | per-tensor activations | when named |
| `gemm` | cpu, cuda | codes | all | on a GPU; everywhere the last resort |

On a GPU `auto` stays `gemm` until `triton` and `fp8` have been timed there (`bench/gpu_table.sh`): they are
checked bit-exact on the CPU only. The order a model falls back through, per device, is PREFERENCE.

`fp8` runs centred 4-bit codes, which e4m3 holds exactly, through `torch._scaled_mm` with float32 sums (exact
for integers below 2^24); it is usable on a device only where a probe product at the largest sums it accepts
comes out exactly the int64 result (a GPU that accumulates FP8 products in fewer bits fails the probe).

A named backend runs the layers it accepts; each other layer runs the first usable backend of the device's
PREFERENCE that accepts it (so `gemm` is the last resort everywhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dq.errors import UserError
from dq.export import kernels
from dq.export.triton_kernels import interpreting, triton_importable


@dataclass(frozen=True)
class LayerNeeds:
    """What a layer's product asks of a backend: the largest |q_x − z_x| of its activation codes, the largest
    |W8| of its weights, its reduction length K, and whether its activation grid is per token."""

    act_span: int
    weight_max: int
    reduction: int
    per_token: bool


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    why_unusable: Callable[[torch.device], str | None]  # None where usable on that device
    accepts: Callable[[LayerNeeds], bool]
    conv: Callable[..., torch.nn.Module]  # (w8, shift, Δw, stride, padding, dilation, act_bits) → kernel
    linear: Callable[..., torch.nn.Module]  # (w8, shift, Δw, act_bits) → kernel


REGISTRY: dict[str, Backend] = {}
AUTO_ORDER = {"cpu": ("onednn", "gemm"), "cuda": ("gemm",)}
PREFERENCE = {"cpu": ("onednn", "gemm"), "cuda": ("fp8", "triton", "gemm")}  # the fallbacks of a named backend


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def why_unusable(name: str, device: torch.device) -> str | None:
    backend = REGISTRY[name]
    if device.type not in backend.devices:
        return f"the {name} integer backend runs on {' or '.join(backend.devices)}, not {device.type}"
    return backend.why_unusable(device)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` → the first usable backend of the device's order; a named one checked usable (UserError, one line,
    otherwise)."""
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("gemm",)):
            if why_unusable(candidate, device) is None:
                return candidate
        raise UserError(f"no integer backend runs on {device}")
    if name not in REGISTRY:
        raise UserError(f"integer backend must be one of {('auto', *REGISTRY)}, got {name!r}")
    reason = why_unusable(name, device)
    if reason is not None:
        raise UserError(reason)
    return name


def backend_chain(name: str, device: torch.device) -> tuple[str, ...]:
    """The resolved backend `name` first, then the device's PREFERENCE: each layer runs the first that is usable
    and accepts it."""
    if name == "gemm":  # it takes every layer: no fallback to look for (nor probes to run)
        return (name,)
    device = torch.device(device)
    rest = [b for b in PREFERENCE.get(device.type, ()) if b != name and why_unusable(b, device) is None]
    chain = (name, *rest)
    return chain if "gemm" in chain else (*chain, "gemm")


def pick(chain: tuple[str, ...] | str, needs: LayerNeeds) -> Backend:
    chain = (chain, "gemm") if isinstance(chain, str) else chain
    for name in chain:
        if REGISTRY[name].accepts(needs):
            return REGISTRY[name]
    return REGISTRY["gemm"]


def conv_kernel(chain, needs: LayerNeeds, w8, shift, weight_scale, stride, padding, dilation, act_bits):
    return pick(chain, needs).conv(w8, shift, weight_scale, stride, padding, dilation, act_bits)


def linear_kernel(chain, needs: LayerNeeds, w8, shift, weight_scale, act_bits):
    return pick(chain, needs).linear(w8, shift, weight_scale, act_bits)


# ------------------------------------------------------------------------------------------ the backends


def _onednn_unusable(device: torch.device) -> str | None:
    return None if kernels.onednn_available() else "this torch has no oneDNN integer kernels (backend=gemm runs)"


def _triton_unusable(device: torch.device) -> str | None:
    if not triton_importable():
        return "the triton integer backend needs the triton package (pip install triton)"
    if device.type == "cuda" and interpreting():
        return "TRITON_INTERPRET=1 runs Triton kernels on the CPU only; unset it to run them on a GPU"
    if device.type == "cpu" and not interpreting():
        return ("the triton integer backend runs on a GPU; on the CPU only in Triton's interpreter "
                "(TRITON_INTERPRET=1 before triton is imported: for tests, slow)")
    return None


FP8_LIMIT = 2**24  # float32 sums of integers are exact below it


@functools.cache
def fp8_sums_exact(device: str) -> bool:
    """Whether `torch._scaled_mm` on `device` gives the exact integer sums of e4m3 integer operands up to the
    largest that `fp8` accepts: a random product and a worst-case one (K = 65536 of 15 × 15: 14,745,600)
    against int64 results."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-15, 16, (32, 4096), generator=gen)
    b = torch.randint(-16, 17, (32, 4096), generator=gen)
    worst = torch.full((16, 65536), 15)
    for left, right in ((a, b), (worst, worst)):
        expected = left @ right.t()
        got = torch._scaled_mm(left.to(device, torch.float8_e4m3fn), right.to(device, torch.float8_e4m3fn).t(),
                               torch.ones((), device=device), torch.ones((), device=device), out_dtype=torch.float32)
        if not torch.equal(got.cpu().to(torch.int64), expected):
            return False
    return True


def _fp8_unusable(device: torch.device) -> str | None:
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return "this torch has no float8 matrix products"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "the fp8 integer backend needs a GPU with FP8 tensor cores (compute capability 8.9 or later)"
    if not fp8_sums_exact(str(device)):
        return f"torch._scaled_mm on {device} does not sum FP8 integer products exactly (checked at load)"
    return None


def _fp8_accepts(needs: LayerNeeds) -> bool:
    return needs.act_span <= 16 and needs.weight_max <= 16 and needs.reduction * needs.act_span * needs.weight_max < FP8_LIMIT


def _kernels(module: Callable[[], object], conv: str, linear: str, name: str):
    """(conv, linear) factories of one backend: its kernel classes, looked up in `module()` when first built (the
    GPU backends' module imports only when used)."""
    def make_conv(w8, shift, weight_scale, stride, padding, dilation, act_bits):
        return getattr(module(), conv)(w8, shift, weight_scale, stride, padding, dilation, name, act_bits)

    def make_linear(w8, shift, weight_scale, act_bits):
        return getattr(module(), linear)(w8, shift, weight_scale, name, act_bits)

    return make_conv, make_linear


def _cpu_module():
    return kernels


def _gpu_module():
    from dq.export import gpu_kernels

    return gpu_kernels


def _per_tensor(needs: LayerNeeds) -> bool:
    return not needs.per_token


register(Backend("onednn", ("cpu",), _onednn_unusable, _per_tensor,
                 *_kernels(_cpu_module, "IntConvKernel", "IntLinearKernel", "onednn")))
register(Backend("gemm", ("cpu", "cuda"), lambda device: None, lambda needs: True,
                 *_kernels(_cpu_module, "IntConvKernel", "IntLinearKernel", "gemm")))
register(Backend("triton", ("cuda", "cpu"), _triton_unusable, _per_tensor,
                 *_kernels(_gpu_module, "TritonConvKernel", "TritonLinearKernel", "triton")))
register(Backend("fp8", ("cuda", "cpu"), _fp8_unusable, _fp8_accepts,
                 *_kernels(_gpu_module, "Fp8ConvKernel", "Fp8LinearKernel", "fp8")))
