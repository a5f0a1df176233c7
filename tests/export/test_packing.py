import pytest
import torch

from dq.export.packing import pack_codes, packed_numel, unpack_codes


@pytest.mark.parametrize("bits", list(range(2, 17)))
@pytest.mark.parametrize("numel", [1, 7, 64])
def test_round_trip_every_bit_width(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits * 100 + numel))
    codes[0] = 2**bits - 1  # the top of the grid survives
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_numel(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes.to(torch.int32))


def test_four_bit_codes_take_half_a_byte():
    codes = torch.tensor([1, 2, 15, 0, 7])
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.tolist() == [1 | 2 << 4, 15, 7]


@pytest.mark.parametrize("bits,dtype", [(4, torch.uint8), (6, torch.uint8), (8, torch.uint8), (12, torch.int16)])
def test_container_dtypes(bits, dtype):
    assert pack_codes(torch.zeros(4, dtype=torch.int64), bits).dtype == dtype


def test_bad_codes_and_sizes_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 1)
    with pytest.raises(ValueError, match="uint8 \\[2\\]"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="above 7"):
        unpack_codes(torch.tensor([0xF], dtype=torch.uint8), 3, 1)
