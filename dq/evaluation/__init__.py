"""Evaluation: samples on disk (sharded, resumable), the protocol every number carries, and the ablation
report. evaluate.py at the repository root is the command that runs them."""

from dq.evaluation.protocol import code_version, library_versions
from dq.evaluation.samples import (
    check_identity,
    generate_missing,
    identity_key,
    read_samples,
    write_grid,
    write_identity,
    write_npz,
)

__all__ = [
    "check_identity",
    "code_version",
    "generate_missing",
    "identity_key",
    "library_versions",
    "read_samples",
    "write_grid",
    "write_identity",
    "write_npz",
]
