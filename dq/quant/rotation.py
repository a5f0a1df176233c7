"""Online block-Hadamard rotation of a Linear layer's input (docs/method.md, "Transformer activation options").

A Linear computes y = x Wᵀ. For an orthogonal R, y = (x R)(W R)ᵀ: the rotated weight W R is folded into the
layer once, offline, and only x R is computed at run time, before the input quantizer. R spreads an outlier
channel over many channels, so a per-tensor or per-token grid wastes fewer of its few 4-bit levels.

R = D · blockdiag(H_b, …, H_b): D a fixed diagonal of random signs (seeded by the width, so every layer of one
width shares it and a rebuilt student gets the same), H_b the orthonormal Sylvester–Hadamard matrix of
size b, the largest power of two that divides the width, capped by `max_block`. The signs matter: H_b's
first column is constant, so without them a block's first output would be its channels' mean times √b
(a new outlier wherever activations share an offset).
"""

from __future__ import annotations

import functools
import math

import torch

from dq.errors import UserError


def block_size(width: int, max_block: int) -> int:
    """The largest power of two that divides `width` and is at most `max_block` (1: nothing to rotate)."""
    if max_block < 2 or max_block & (max_block - 1):
        raise UserError(f"the rotation block must be a power of two >= 2, got {max_block}")
    return math.gcd(width, max_block)


@functools.lru_cache(maxsize=64)
def _hadamard(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later in autograd whatever asked
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return (h / math.sqrt(size)).to(device=device, dtype=dtype)


def hadamard(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester–Hadamard matrix [size, size] (size a power of two), made once per size, device
    and dtype (every rotated layer's forward asks for it: no copy to the device each time)."""
    if size < 1 or size & (size - 1):
        raise UserError(f"a Hadamard matrix needs a power-of-two size, got {size}")
    return _hadamard(size, torch.device(device), dtype)


def random_signs(width: int) -> torch.Tensor:
    """The fixed ±1 diagonal [width] of a width's rotation (seeded by the width)."""
    generator = torch.Generator().manual_seed(width)
    return torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x R along the last axis: x [..., C] times the signs [C], then each block of b channels times H_b."""
    width = x.shape[-1]
    if signs.shape != (width,) or width % block:
        raise UserError(f"a rotation of {signs.numel()} channels in blocks of {block} cannot take {tuple(x.shape)}")
    mixed = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], width // block, block)
    return (mixed @ hadamard(block, x.device, x.dtype)).reshape(x.shape)
