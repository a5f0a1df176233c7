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
