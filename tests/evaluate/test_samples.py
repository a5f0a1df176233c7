"""Sample folders: contiguous runs of missing indices, identity checks, npz layout."""

import numpy as np
import pytest
import torch

from dq.evaluation.samples import (
    check_identity,
    contiguous_runs,
    read_samples,
    write_identity,
    write_npz,
    write_samples,
)


def test_contiguous_runs_split_at_gaps_and_at_the_batch_size():
    assert contiguous_runs([5, 0, 1, 2, 7, 8], max_length=2) == [(0, 2), (2, 3), (5, 6), (7, 9)]
    assert contiguous_runs([], max_length=4) == []


def test_written_samples_read_back_exactly(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    write_samples(tmp_path, images, first_index=0)
    assert torch.equal(read_samples(tmp_path, 5), images)
    with pytest.raises(ValueError, match=r"lacks 1 of 6 samples \(first missing: \[5\]\)"):
        read_samples(tmp_path, 6)
    write_npz(tmp_path / "s.npz", images)
    with np.load(tmp_path / "s.npz") as npz:
        assert np.array_equal(npz["arr_0"], images.permute(0, 2, 3, 1).numpy())


def test_identity_mismatch_names_the_differing_fields(tmp_path):
    identity = {"model": "abc", "sampler": {"name": "ddim"}, "seed": 0, "conditioning": {}}
    write_identity(tmp_path, identity)
    check_identity(tmp_path, identity)
    with pytest.raises(ValueError, match=r"differing: \['model'\]"):
        check_identity(tmp_path, {**identity, "model": "xyz"})


def test_unreadable_pngs_are_deleted_and_sampled_again(tiny_unet, ddpm_scheduler, tmp_path, caplog):
    import logging

    from dq.evaluation.samples import generate_missing, sample_path
    from dq.sampling import SamplerConfig

    sampler = SamplerConfig(name="ddim", num_steps=3, eta=0.0, spacing="uniform")
    kwargs = dict(seed=0, batch_size=4)
    assert generate_missing(tmp_path, tiny_unet, ddpm_scheduler.config, sampler, range(6), **kwargs) == 6
    expected = read_samples(tmp_path, 6)
    truncated, flipped = sample_path(tmp_path, 1), sample_path(tmp_path, 4)
    truncated.write_bytes(truncated.read_bytes()[:30])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dq.evaluation.samples"):
        made = generate_missing(tmp_path, tiny_unet, ddpm_scheduler.config, sampler, range(6), **kwargs)
    assert made == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "2 unreadable sample PNG(s)" in warnings[0] and "000001.png" in warnings[0]
    assert torch.equal(read_samples(tmp_path, 6), expected)
