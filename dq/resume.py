"""Resuming a train.py run safely: which checkpoint, and whether it was written by the same configuration.

A run's identity is what its trained student depends on: the model (weights hash), the calibration tuples
(their cache key: model, sampler, N, trajectories, seed, conditioning), the QuantConfig, the method's
training settings and the seed. It is stored in every checkpoint (`checkpoint["dq_run"]`); a resume whose
identity differs is refused, naming the differing keys, before any work starts.

`phase(name)` marks the run's phases (calibration, prepare, train, fidelity, write) in the log; the tests
set DQ_FAULT_KILL_AT=<name> to SIGKILL the process there and check that a resume ends with the same results.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dq.errors import CorruptFileError, MismatchError, MissingFileError

IDENTITY_KEY = "dq_run"
FAULT_ENV = "DQ_FAULT_KILL_AT"
# method.distill keys that change where or how fast the computation runs, not what it computes
PLACEMENT_KEYS = ("cache_device", "cache_gpu_fraction", "capture_batch_size", "target_cache_mb", "replay_cache_mb")

log = logging.getLogger(__name__)


_passes: dict[str, int] = {}


def phase(name: str, detail: str = "") -> None:
    """Log the start of a phase; a fault-injection point (see fault_point)."""
    log.info("phase %s%s", name, f" ({detail})" if detail else "")
    fault_point(name)


def fault_point(name: str) -> None:
    """For the resume tests: DQ_FAULT_KILL_AT=<name> SIGKILLs this process the first time it passes the
    point `name`, DQ_FAULT_KILL_AT=<name>:<n> the n-th time. Unset (always, outside tests): nothing."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted.split(":")[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    count = wanted.split(":")[1] if ":" in wanted else "1"
    if str(_passes[name]) == count:
        os.kill(os.getpid(), signal.SIGKILL)


def run_identity(*, model: str, calibration_key: str, quant: Mapping[str, Any], method: Mapping[str, Any],
                 seed: int) -> dict[str, Any]:
    """The identity stored in checkpoints (plain JSON-like data)."""
    distill = {k: v for k, v in dict(method.get("distill", {})).items() if k not in PLACEMENT_KEYS}
    return {"model": model, "calibration": calibration_key, "quant": dict(quant),
            "method": {**dict(method), "distill": distill}, "seed": int(seed)}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (a key present in one only counts)."""
    keys: list[str] = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += differences(a, b, f"{prefix}{key}.")
        elif _normal(a) != _normal(b):
            keys.append(f"{prefix}{key}")
    return keys


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from: None (start afresh), `last` (checkpoint_dir/last.ckpt when a run has
    written one, else None), or a path that must exist."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = checkpoint_dir / "last.ckpt"
        if last.is_file():
            return last
        log.info("ckpt_path=last: no checkpoint in %s yet; starting from the beginning", checkpoint_dir)
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingFileError(f"ckpt_path {path} does not exist (give a train.py checkpoint, or `last` with "
                               "hydra.run.dir set to the run's dir)")
    return path


def check_checkpoint(path: Path, identity: Mapping[str, Any]) -> None:
    """CorruptFileError when `path` is not a readable train.py checkpoint; MismatchError naming the keys when
    it was written under another configuration."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise CorruptFileError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupted?): "
                               f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}") from err
    if not isinstance(checkpoint, dict) or "bkd" not in checkpoint:
        raise CorruptFileError(f"checkpoint {path} has no BKD state: it was not written by dq's train.py")
    saved = checkpoint.get(IDENTITY_KEY)
    if saved is None:
        raise MismatchError(f"checkpoint {path} records no run identity (written by an older dq): start afresh "
                            "without ckpt_path")
    differing = differences(saved, identity)
    if differing:
        shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more" if len(differing) > 8 else "")
        raise MismatchError(f"checkpoint {path} was written by another configuration; differing: {shown}. "
                            "Resume with the run's own overrides, or start afresh in a new run dir")
