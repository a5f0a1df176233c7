"""Integer codes packed at their bit-width: pure functions on tensors.

Codes are unsigned integers in [0, 2^b − 1] (the weight grid of eq. 1-2). Packing layouts:
- b ≤ 4: two codes per byte, the first in the low nibble (an odd count pads one zero nibble);
- 5 ≤ b ≤ 8: one code per byte (uint8);
- 9 ≤ b ≤ 16: one code per two bytes (int16 holding the code − 2^15, so the whole range fits).
"""

from __future__ import annotations

import torch

from dq.errors import UserError


def packed_numel(numel: int, bits: int) -> int:
    """Number of elements of the packed tensor that holds `numel` codes of `bits` bits."""
    _check_bits(bits)
    return (numel + 1) // 2 if bits <= 4 else numel


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten `codes` (any integer dtype, values in [0, 2^bits − 1]) and pack them (layouts above).

    Returns uint8 [ceil(n/2)] for bits ≤ 4, uint8 [n] for bits ≤ 8, int16 [n] for bits ≤ 16.
    ValueError for a code outside the grid or a non-integer tensor.
    """
    _check_bits(bits)
    if torch.is_floating_point(codes) or codes.dtype == torch.bool:
        raise UserError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise UserError(
            f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{int(flat.min())}, {int(flat.max())}]"
        )
    if bits > 8:
        return (flat - 2**15).to(torch.int16)
    if bits > 4:
        return flat.to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The `numel` codes held in `packed` (as pack_codes wrote them), as int32 [numel].

    ValueError when the packed tensor's dtype or size does not fit (bits, numel).
    """
    _check_bits(bits)
    expected_dtype = torch.int16 if bits > 8 else torch.uint8
    if packed.dtype != expected_dtype or packed.ndim != 1 or packed.numel() != packed_numel(numel, bits):
        raise UserError(
            f"packed {bits}-bit codes for {numel} values must be {expected_dtype} [{packed_numel(numel, bits)}], "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits > 8:
        return packed.to(torch.int32) + 2**15
    if bits > 4:
        return packed.to(torch.int32)
    wide = packed.to(torch.int32)
    codes = torch.stack([wide & 0xF, wide >> 4], dim=1).reshape(-1)[:numel]
    if bits < 4 and numel and int(codes.max()) > 2**bits - 1:
        raise UserError(f"packed data holds codes above {2**bits - 1}, the top of a {bits}-bit grid")
    return codes


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise UserError(f"bits must be an int in [2, 16], got {bits!r}")
