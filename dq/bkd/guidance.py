"""Classifier-free guidance in calibration (docs/method.md §4).

A guided sampler evaluates the denoiser twice a step: on the condition and on the unconditional input (the
null class, the empty prompt), with the same TPQ row. The calibration tuples store both (`cond`, `uncond`),
but a student distilled on `cond` alone never sees the unconditional half it will run at deployment.

`with_guidance_rows(tuples, fraction, seed)` returns the tuples with `cond` replaced by `uncond` on a share
`fraction` of the rows of every sampling step (chosen by a generator seeded with `seed`, so a run and its
resume pick the same rows); everything that reads `cond` then sees the mix: the TPQ initialisation, the
block caches (student inputs and teacher targets alike), BKD and the end-to-end stage. fraction = 0.5 is
the sampler's own proportion (one conditional and one unconditional call per step). Tuples whose text
embeddings sit in a table (dq.calibration.tuples) get the same rows switched by their index, with no copy of
the embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


def guidance_rows(steps: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """bool [N]: the rows that take the unconditional input, round(fraction * n_s) of the n_s rows of each
    sampling step s (steps: int64 [N]), drawn without replacement by a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(int(seed) + 7_919)
    mask = torch.zeros(len(steps), dtype=torch.bool)
    steps = steps.cpu()
    for step in torch.unique(steps):  # sorted: the draw does not depend on the row order of the steps
        rows = torch.nonzero(steps == step).flatten()
        take = round(fraction * len(rows))
        mask[rows[torch.randperm(len(rows), generator=generator)[:take]]] = True
    return mask


def with_guidance_rows(tuples: Mapping[str, torch.Tensor], fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """The calibration tuples with `cond` replaced by `uncond` on the rows of guidance_rows (a new dict; the
    tensors given are not changed). Tuples without `uncond` (no guidance) come back as they are."""
    out = dict(tuples)
    if "uncond_index" in tuples and "cond_index" in tuples and fraction > 0:  # a conditioning table: swap rows
        mask = guidance_rows(tuples["step"], fraction, seed).to(tuples["cond_index"].device)
        out["cond_index"] = torch.where(mask, tuples["uncond_index"], tuples["cond_index"])
        log.info("calibration: %d of %d rows take the unconditional input (uncond_fraction %g)", int(mask.sum()),
                 len(mask), fraction)
        return out
    if fraction <= 0 or "uncond" not in tuples or "cond" not in tuples:
        if fraction > 0:
            log.debug("method.distill.uncond_fraction=%g: the calibration holds no unconditional inputs (the sampler "
                     "uses no guidance); every row stays conditional", fraction)
        return out
    cond, uncond = tuples["cond"], tuples["uncond"]
    if uncond.shape != cond.shape or uncond.dtype != cond.dtype:
        raise ValueError(f"uncond {tuple(uncond.shape)} {uncond.dtype} does not match cond {tuple(cond.shape)} {cond.dtype}")
    mask = guidance_rows(tuples["step"], fraction, seed).to(cond.device)
    out["cond"] = torch.where(mask.view(-1, *([1] * (cond.ndim - 1))), uncond, cond)
    log.info("calibration: %d of %d rows take the unconditional input (uncond_fraction %g)", int(mask.sum()),
             len(mask), fraction)
    return out
